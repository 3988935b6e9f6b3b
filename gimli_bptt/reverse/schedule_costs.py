# SPDX-License-Identifier: Apache-2.0
"""What a checkpoint schedule costs: the executor simulated, and the closed forms of its forward steps and slots.

:func:`simulate` runs a schedule of :mod:`gimli_bptt.reverse.schedules` under that module's
executor model and slot convention (``s_0`` takes a slot, ``s_J`` none, the first sweep
``0 -> J`` counts), rejects any operation that breaks it, and measures the forward steps and
the peak slots. :func:`min_forward_steps` is the optimum any schedule can reach (Griewank &
Walther), :func:`every_k_forward_steps` and :func:`every_k_slots` the every-k schedule's costs;
the tests check each schedule's simulated costs against them.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

from .schedules import OP_KINDS, Op, beta, check_int, repetition_number


class ScheduleStats(NamedTuple):
    """What :func:`simulate` measured on a valid schedule.

    Attributes:
        forward_steps: Total forward steps run, the first sweep ``0 -> J`` included.
        max_slots_used: Largest number of states held in slots at any one time.
        recomputed_steps: ``forward_steps - num_steps``.
    """

    forward_steps: int
    max_slots_used: int
    recomputed_steps: int


def min_forward_steps(num_steps: int, num_slots: int) -> int:
    """Returns the fewest forward steps any valid schedule needs (closed form).

    Counts the first sweep ``0 -> J`` too, under the schedules' convention (``s_0`` occupies a
    slot).  Equals ``t(J + 1, S) = r (J + 1) - beta(S + 1, r - 1)`` where ``r`` is the least
    integer with ``beta(S, r) >= J + 1``.  Gives ``J`` when ``num_slots >= num_steps`` and
    ``J (J + 1) / 2`` when ``num_slots == 1``.

    Args:
        num_steps: Number of inner steps ``J`` (``>= 1``).
        num_slots: Number of checkpoint slots ``S`` (``>= 1``).

    Returns:
        The minimal total number of forward steps.

    Raises:
        TypeError: If an argument is not an ``int``.
        ValueError: If an argument is below 1.
    """
    check_int("num_steps", num_steps, 1)
    check_int("num_slots", num_slots, 1)
    length = num_steps + 1
    snaps = min(num_slots, length)
    r = repetition_number(length, snaps)
    return r * length - beta(snaps + 1, r - 1)


def every_k_slots(num_steps: int, k: int) -> int:
    """Returns the exact peak slot usage of :func:`every_k_schedule`.

    With ``n = ceil(J / k)`` segments, segment ``i`` (0-based, length ``L_i``) is reversed while
    the ``i + 1`` segment starts ``s_0, s_k, ..., s_{ik}`` are held plus ``max(0, L_i - 2)``
    temporaries (the segment's last state stays in the current register).  The peak is therefore
    ``max(n + max(0, L - 2), n - 1 + max(0, k - 2))`` for ``n >= 2`` (``L`` the last segment's
    length), and ``max(1, J - 1)`` for ``n == 1``.

    Args:
        num_steps: Number of inner steps ``J`` (``>= 1``).
        k: Checkpoint spacing (``>= 1``).

    Returns:
        The peak number of occupied slots.

    Raises:
        TypeError: If an argument is not an ``int``.
        ValueError: If an argument is below 1.
    """
    check_int("num_steps", num_steps, 1)
    check_int("k", k, 1)
    n = -(-num_steps // k)
    last = num_steps - (n - 1) * k
    if n == 1:
        return 1 + max(0, last - 2)
    return max(n + max(0, last - 2), n - 1 + max(0, k - 2))


def every_k_forward_steps(num_steps: int, k: int) -> int:
    """Returns the forward-step count of :func:`every_k_schedule`: ``2 J - ceil(J / k)``.

    The first sweep costs ``J``; each segment of length ``L`` is recomputed from its start up to
    its last state, ``L - 1`` steps.

    Args:
        num_steps: Number of inner steps ``J`` (``>= 1``).
        k: Checkpoint spacing (``>= 1``).

    Returns:
        The total number of forward steps.

    Raises:
        TypeError: If an argument is not an ``int``.
        ValueError: If an argument is below 1.
    """
    check_int("num_steps", num_steps, 1)
    check_int("k", k, 1)
    return 2 * num_steps - -(-num_steps // k)


def simulate(schedule: Sequence[Op], num_steps: int, num_slots: int) -> ScheduleStats:
    """Validates ``schedule`` under the executor model of :mod:`gimli_bptt.reverse.schedules` and measures it.

    Args:
        schedule: The ops, in order.
        num_steps: Number of inner steps ``J`` (``>= 1``).
        num_slots: Number of checkpoint slots (``>= 1``).

    Returns:
        The forward-step count, peak slot usage and recomputed-step count.

    Raises:
        TypeError: If an argument or an op has the wrong type.
        ValueError: If an op breaks a rule (the message names the op index and the rule), or
            the schedule ends before every step ``J-1 .. 0`` is reversed.
    """
    check_int("num_steps", num_steps, 1)
    check_int("num_slots", num_slots, 1)
    current: int | None = 0
    stored: set[int] = set()
    next_reverse = num_steps - 1
    reached_end = False
    forward = 0
    peak = 0
    for idx, op in enumerate(schedule):
        if not isinstance(op, Op):
            raise TypeError(f"op {idx}: schedule entries must be Op, got {type(op).__name__} {op!r}")
        kind, step, to = op
        where = f"op {idx} {op!r}"
        if kind not in OP_KINDS:
            raise ValueError(f"{where}: unknown kind {kind!r}, expected one of {OP_KINDS}")
        if isinstance(step, bool) or not isinstance(step, int) or isinstance(to, bool) or not isinstance(to, int):
            raise ValueError(f"{where}: step and to must be ints")
        if not 0 <= step <= num_steps:
            raise ValueError(f"{where}: step {step} outside 0..{num_steps}")
        if kind != "advance" and to != -1:
            raise ValueError(f"{where}: only 'advance' takes a target, got to={to}")
        if kind == "advance":
            if current != step:
                raise ValueError(f"{where}: advance needs current to hold s_{step}, it holds {_held(current)}")
            if not step < to <= num_steps:
                raise ValueError(f"{where}: advance target must satisfy {step} < to <= {num_steps}, got {to}")
            if to == num_steps:
                if reached_end:
                    raise ValueError(f"{where}: advance to J={num_steps} may happen only once")
                reached_end = True
            forward += to - step
            current = to
        elif kind == "store":
            if current != step:
                raise ValueError(f"{where}: store needs current to hold s_{step}, it holds {_held(current)}")
            if step in stored:
                raise ValueError(f"{where}: s_{step} is already stored")
            if len(stored) >= num_slots:
                raise ValueError(f"{where}: no free slot, all {num_slots} slots are in use")
            stored.add(step)
            peak = max(peak, len(stored))
        elif kind == "restore":
            if step not in stored:
                raise ValueError(f"{where}: restore of s_{step}, which is not stored")
            current = step
        elif kind == "free":
            if step not in stored:
                raise ValueError(f"{where}: free of s_{step}, which is not stored")
            stored.remove(step)
        else:  # reverse
            if not reached_end:
                raise ValueError(f"{where}: reverse before the advance to J={num_steps}")
            if step != next_reverse:
                expected = f"step {next_reverse}" if next_reverse >= 0 else "no further reverse"
                raise ValueError(f"{where}: reverses must go J-1 .. 0 in order, expected {expected}")
            if current != step:
                raise ValueError(f"{where}: reverse needs current to hold s_{step}, it holds {_held(current)}")
            next_reverse -= 1
            current = None
    if next_reverse >= 0:
        raise ValueError(
            f"schedule ended with steps {next_reverse}..0 not reversed (every step J-1..0 must be reversed)"
        )
    return ScheduleStats(forward, peak, forward - num_steps)


def _held(current: int | None) -> str:
    """Describes the current register for error messages.

    Args:
        current: The held state index, or ``None``.

    Returns:
        ``"s_i"`` or ``"nothing"``.
    """
    return "nothing" if current is None else f"s_{current}"


__all__ = ["ScheduleStats", "every_k_forward_steps", "every_k_slots", "min_forward_steps", "simulate"]
