# SPDX-License-Identifier: Apache-2.0
"""Checkpoint schedules for the reverse sweep: store-all, every-k and the optimal binomial one ("revolve").

The reverse sweep of a hypergradient walks inner steps ``j = J-1, ..., 0`` and at each ``j``
needs the inner state ``s_j`` (parameters + optimizer state).  This module only *plans*: every
function returns a flat list of :class:`Op` that an executor (:class:`~gimli_bptt.reverse.tape.Tape`)
carries out literally; what a schedule costs is :mod:`gimli_bptt.reverse.schedule_costs`'s.

Executor model (the semantics that :func:`~gimli_bptt.reverse.schedule_costs.simulate` checks):

* There is one *current* register and ``num_slots`` checkpoint slots.  Initially the current
  register holds ``s_0`` and every slot is free.
* ``Op("advance", i, k)``: current must hold ``s_i`` with ``i < k <= J``; runs forward steps
  ``i, ..., k-1``; current becomes ``s_k``.  Costs ``k - i`` forward steps.  Advancing to
  ``k = J`` happens exactly once, during the first forward sweep, before any ``"reverse"``
  (the executor evaluates the validation gradient at ``s_J`` right there).
* ``Op("store", i)``: current must hold ``s_i``; copies it into a free slot (error if no slot
  is free or ``s_i`` is already stored).  Current still holds ``s_i``.
* ``Op("restore", i)``: current becomes a copy of the slot holding ``s_i``; the slot keeps it.
* ``Op("free", i)``: releases the slot holding ``s_i``.
* ``Op("reverse", i)``: current must hold ``s_i`` and steps ``i+1, ..., J-1`` must already be
  reversed; reverses step ``i`` (no forward step is counted for it); current then holds nothing.

Slot convention: ``s_0`` is *not* kept anywhere for free.  Every schedule needs ``s_0`` again
after advancing away from it (to reverse step 0), so each schedule starts with
``Op("store", 0)`` and ``s_0`` occupies one of the ``num_slots`` slots for the whole sweep.
``s_J`` is never stored.  All schedules produced here free every slot before they end.
The forward count of a schedule includes the first sweep ``0 -> J``, so it is at least ``J``;
``recomputed_steps = forward_steps - J``.

Under this convention the problem is Griewank & Walther's reversal of ``J + 1`` steps with
``num_slots`` snapshots (the extra last "step" is the validation gradient at ``s_J``), so the
optimum is ``t(J + 1, S) = r (J + 1) - beta(S + 1, r - 1)`` with ``beta(s, r) = C(s + r, s)``
and ``r`` the least integer with ``beta(S, r) >= J + 1`` (the repetition number).
"""
from __future__ import annotations

import math
from typing import NamedTuple

#: The operation kinds an :class:`Op` may carry.
OP_KINDS: tuple[str, ...] = ("advance", "store", "restore", "free", "reverse")


class Op(NamedTuple):
    """One executor operation.

    Attributes:
        kind: One of ``"advance"``, ``"store"``, ``"restore"``, ``"free"``, ``"reverse"``.
        step: The state index ``i`` the op refers to.
        to: Only for ``"advance"``: the target state index ``k``; ``-1`` otherwise.
    """

    kind: str
    step: int
    to: int = -1


def check_int(name: str, value: object, minimum: int) -> None:
    """Checks that ``value`` is an ``int`` (not ``bool``) and at least ``minimum``.

    Args:
        name: The argument name used in error messages.
        value: The value to check.
        minimum: The smallest allowed value.

    Raises:
        TypeError: If ``value`` is not an ``int``.
        ValueError: If ``value < minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def beta(s: int, r: int) -> int:
    """Returns ``beta(s, r) = C(s + r, s)``, with ``beta(s, r) = 0`` for ``r < 0``.

    Args:
        s: Number of snapshots (``>= 0``).
        r: Repetition number.

    Returns:
        The largest number of steps reversible with ``s`` snapshots and ``r`` repetitions.
    """
    if r < 0:
        return 0
    return math.comb(s + r, s)


def repetition_number(length: int, snaps: int) -> int:
    """Returns the least ``r >= 0`` with ``beta(snaps, r) >= length``.

    Args:
        length: Number of steps to reverse (``>= 1``).
        snaps: Number of snapshots (``>= 1``).

    Returns:
        The repetition number ``r``.
    """
    r, beta = 0, 1
    while beta < length:
        r += 1
        beta = beta * (snaps + r) // r
    return r


def store_all_schedule(num_steps: int) -> list[Op]:
    """Returns the full-tape schedule: store every ``s_0 .. s_{J-1}``, then reverse.

    Uses ``J`` slots and exactly ``J`` forward steps (no recomputation).

    Args:
        num_steps: Number of inner steps ``J`` (``>= 1``).

    Returns:
        The schedule.

    Raises:
        TypeError: If ``num_steps`` is not an ``int``.
        ValueError: If ``num_steps < 1``.
    """
    check_int("num_steps", num_steps, 1)
    ops: list[Op] = []
    for i in range(num_steps):
        ops.append(Op("store", i))
        ops.append(Op("advance", i, i + 1))
    for i in range(num_steps - 1, -1, -1):
        ops.append(Op("restore", i))
        ops.append(Op("reverse", i))
        ops.append(Op("free", i))
    return ops


def _segments(num_steps: int, k: int) -> list[tuple[int, int]]:
    """Splits ``0 .. J`` into every-``k`` segments ``[b, e)``.

    Args:
        num_steps: Number of inner steps ``J``.
        k: Segment length.

    Returns:
        The segments, in forward order; only the last one may be shorter than ``k``.
    """
    return [(b, min(b + k, num_steps)) for b in range(0, num_steps, k)]


def every_k_schedule(num_steps: int, k: int) -> list[Op]:
    """Returns the every-``k`` schedule (uniform checkpoints, recompute within each segment).

    The first sweep stores ``s_0, s_k, s_2k, ...``.  The reverse sweep handles segments
    ``[b, e)`` from last to first: restore ``s_b``, advance one step at a time to ``s_{e-1}``
    storing ``s_{b+1} .. s_{e-2}`` temporarily, reverse ``e-1`` from the current register, then
    restore/reverse/free the rest down to ``b`` (freeing ``s_b`` too).  Forward steps:
    :func:`~gimli_bptt.reverse.schedule_costs.every_k_forward_steps`; peak slots:
    :func:`~gimli_bptt.reverse.schedule_costs.every_k_slots`.  ``k = 1`` gives the
    store-all forward count ``J`` with ``J`` slots.

    Args:
        num_steps: Number of inner steps ``J`` (``>= 1``).
        k: Checkpoint spacing (``>= 1``).

    Returns:
        The schedule.

    Raises:
        TypeError: If an argument is not an ``int``.
        ValueError: If an argument is below 1.
    """
    check_int("num_steps", num_steps, 1)
    check_int("k", k, 1)
    segs = _segments(num_steps, k)
    ops: list[Op] = []
    for b, e in segs:
        ops.append(Op("store", b))
        ops.append(Op("advance", b, e))
    for b, e in reversed(segs):
        if e - b == 1:
            ops.append(Op("restore", b))
            ops.append(Op("reverse", b))
            ops.append(Op("free", b))
            continue
        ops.append(Op("restore", b))
        for i in range(b + 1, e):
            ops.append(Op("advance", i - 1, i))
            if i < e - 1:
                ops.append(Op("store", i))
        ops.append(Op("reverse", e - 1))
        for i in range(e - 2, b - 1, -1):
            ops.append(Op("restore", i))
            ops.append(Op("reverse", i))
            ops.append(Op("free", i))
    return ops


def _binomial_split(length: int, snaps: int) -> int:
    """Returns an optimal distance to the next checkpoint for a revolve subproblem.

    For reversing ``length`` steps from a stored start with ``snaps`` snapshots (start included,
    ``snaps >= 2``, ``length >= 2``), with ``r`` the repetition number any split ``m`` with
    ``beta(snaps, r-2) <= m <= beta(snaps, r-1)`` and
    ``beta(snaps-1, r-1) <= length - m <= beta(snaps-1, r)`` is optimal (both halves then sit on
    the linear piece of the cost with repetition numbers ``r-1`` and ``r``); the largest such
    ``m`` is returned.

    Args:
        length: Steps to reverse (``>= 2``).
        snaps: Snapshots available, the start's included (``>= 2``).

    Returns:
        The split ``m`` with ``1 <= m <= length - 1``.
    """
    r = repetition_number(length, snaps)
    hi = min(beta(snaps, r - 1), length - beta(snaps - 1, r - 1), length - 1)
    return max(hi, 1)


def binomial_schedule(num_steps: int, num_slots: int) -> list[Op]:
    """Returns the optimal (binomial, "revolve") schedule for ``J`` steps and ``S`` slots.

    Reaches :func:`~gimli_bptt.reverse.schedule_costs.min_forward_steps` forward steps and never holds more than ``num_slots``
    states (``s_0`` included).  Built with an explicit stack, so depth is bounded and
    ``num_steps = 100_000`` is fine.  With one slot it stores ``s_0`` and re-advances from it for
    every reverse (``J (J + 1) / 2`` forward steps); with ``num_slots >= num_steps`` it never
    recomputes (``J`` forward steps).

    Args:
        num_steps: Number of inner steps ``J`` (``>= 1``).
        num_slots: Number of checkpoint slots ``S`` (``>= 1``).

    Returns:
        The schedule.

    Raises:
        TypeError: If an argument is not an ``int``.
        ValueError: If an argument is below 1.
    """
    check_int("num_steps", num_steps, 1)
    check_int("num_slots", num_slots, 1)
    end = num_steps  # index J: reached once, never stored, its "reverse" is implicit
    ops: list[Op] = [Op("store", 0)]
    current: int | None = 0

    def goto(a: int, k: int) -> None:
        """Emits a restore of ``s_a`` (if needed) and an advance ``a -> k`` (if ``k > a``)."""
        nonlocal current
        if current != a:
            ops.append(Op("restore", a))
        if k > a:
            ops.append(Op("advance", a, k))
        current = k

    def reverse(i: int) -> None:
        """Emits the reverse of step ``i`` (nothing for the implicit step ``J``)."""
        nonlocal current
        if i != end:
            ops.append(Op("reverse", i))
            current = None

    # Classic revolve on J + 1 steps: task ("r", a, length, snaps) reverses a .. a+length-1
    # with s_a stored and `snaps` snapshots counting s_a; ("f", i) frees s_i.
    splits: dict[tuple[int, int], int] = {}
    stack: list[tuple[str, int, int, int]] = [("r", 0, num_steps + 1, min(num_slots, num_steps + 1))]
    while stack:
        kind, a, length, snaps = stack.pop()
        if kind == "f":
            ops.append(Op("free", a))
            continue
        if length == 1:
            goto(a, a)
            reverse(a)
        elif snaps == 1:
            for i in range(length - 1, -1, -1):
                goto(a, a + i)
                reverse(a + i)
        else:
            key = (length, snaps)
            m = splits.get(key)
            if m is None:
                m = splits[key] = _binomial_split(length, snaps)
            goto(a, a + m)
            stack.append(("r", a, m, snaps))
            # A right part of one step is reversed straight from the current register:
            # storing it (or s_J) would only cost a copy and a slot.
            if length - m > 1:
                ops.append(Op("store", a + m))
                stack.append(("f", a + m, 0, 0))
            stack.append(("r", a + m, length - m, snaps - 1))
    ops.append(Op("free", 0))
    return ops


__all__ = [
    "OP_KINDS",
    "Op",
    "beta",
    "binomial_schedule",
    "check_int",
    "every_k_schedule",
    "repetition_number",
    "store_all_schedule",
]
