# SPDX-License-Identifier: Apache-2.0
"""The checkpoint schedules (gimli_bptt.reverse.schedules), their costs (.schedule_costs) and the slots of a
budget (.plan): schedule validity, optimality against brute force, validation."""
from __future__ import annotations

import heapq
from functools import cache
from typing import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gimli_bptt.reverse.plan import slots_for_budget
from gimli_bptt.reverse.schedule_costs import (
    ScheduleStats,
    every_k_forward_steps,
    every_k_slots,
    min_forward_steps,
    simulate,
)
from gimli_bptt.reverse.schedules import Op, binomial_schedule, every_k_schedule, store_all_schedule

# --------------------------------------------------------------------------------------------
# Brute-force references, written independently of the module.
# --------------------------------------------------------------------------------------------


@cache
def _reverse_cost(n: int, free: int) -> int:
    """Fewest forward steps to reverse steps a .. a+n-1 once s_a sits in a slot.

    The end state s_{a+n} is not needed.  ``free`` further slots are free.  Either never store
    anything (re-advance from s_a for every reverse: 0 + 1 + ... + (n-1)), or advance m steps,
    store s_{a+m}, reverse the right part with one slot fewer, free s_{a+m}, reverse the left.

    Args:
        n: Number of steps to reverse.
        free: Free slots besides the one holding s_a.

    Returns:
        The minimal forward-step count.
    """
    if n == 1:
        return 0
    best = n * (n - 1) // 2
    if free > 0:
        for m in range(1, n):
            best = min(best, m + _reverse_cost(n - m, free - 1) + _reverse_cost(m, free))
    return best


@cache
def _sweep_cost(n: int, free: int) -> int:
    """Like :func:`_reverse_cost`, but s_{a+n} = s_J must be reached first (the first sweep).

    Either advance straight to J and then reverse the segment, or advance m steps, store
    s_{a+m}, solve the rest of the sweep with one slot fewer, free s_{a+m}, reverse the left.

    Args:
        n: Number of steps between the stored s_a and s_J.
        free: Free slots besides the one holding s_a.

    Returns:
        The minimal forward-step count, the first sweep included.
    """
    best = n + _reverse_cost(n, free)
    if free > 0:
        for m in range(1, n):
            best = min(best, m + _sweep_cost(n - m, free - 1) + _reverse_cost(m, free))
    return best


def dp_optimum(num_steps: int, num_slots: int) -> int:
    """Brute-force optimum: s_0 must be stored first (it is needed again), leaving S - 1 free.

    Args:
        num_steps: J.
        num_slots: S.

    Returns:
        The minimal total forward-step count.
    """
    for n in range(1, num_steps + 1):  # fill the caches bottom-up to keep recursion shallow
        _reverse_cost(n, num_slots - 1)
    return _sweep_cost(num_steps, num_slots - 1)


def exhaustive_optimum(num_steps: int, num_slots: int) -> tuple[int, list[Op]]:
    """Dijkstra over every op sequence of the executor language (tiny J only).

    Args:
        num_steps: J.
        num_slots: S.

    Returns:
        The minimal forward-step count and one schedule achieving it.
    """
    j = num_steps
    start = (0, frozenset(), j - 1, False)  # current, stored, next reverse, reached s_J
    dist = {start: 0}
    parent: dict[tuple, tuple[tuple, Op]] = {}
    heap = [(0, 0, start)]
    tie = 0
    while heap:
        d, _, state = heapq.heappop(heap)
        if d > dist[state]:
            continue
        cur, stored, nxt, reached = state
        if nxt < 0:
            ops: list[Op] = []
            while state in parent:
                state, op = parent[state]
                ops.append(op)
            return d, ops[::-1]
        moves: list[tuple[int, tuple, Op]] = []
        if cur is not None:
            for k in range(cur + 1, j + 1):
                if k == j and reached:
                    continue
                moves.append((k - cur, (k, stored, nxt, reached or k == j), Op("advance", cur, k)))
            if cur not in stored and len(stored) < num_slots:
                moves.append((0, (cur, stored | {cur}, nxt, reached), Op("store", cur)))
            if reached and cur == nxt:
                moves.append((0, (None, stored, nxt - 1, reached), Op("reverse", cur)))
        for i in stored:
            moves.append((0, (i, stored, nxt, reached), Op("restore", i)))
            moves.append((0, (cur, stored - {i}, nxt, reached), Op("free", i)))
        for cost, new, op in moves:
            if d + cost < dist.get(new, 1 << 60):
                dist[new] = d + cost
                parent[new] = (state, op)
                tie += 1
                heapq.heappush(heap, (d + cost, tie, new))
    raise AssertionError("no valid schedule found")


def final_slots(schedule: list[Op]) -> int:
    """Returns how many slots are still occupied after the schedule (stores minus frees)."""
    return sum(op.kind == "store" for op in schedule) - sum(op.kind == "free" for op in schedule)


# --------------------------------------------------------------------------------------------
# Optimality of binomial_schedule / min_forward_steps.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_slots", range(1, 5))
@pytest.mark.parametrize("num_steps", range(1, 7))
def test_dp_matches_exhaustive_search_over_op_language(num_steps: int, num_slots: int) -> None:
    best, ops = exhaustive_optimum(num_steps, num_slots)
    assert simulate(ops, num_steps, num_slots).forward_steps == best
    assert dp_optimum(num_steps, num_slots) == best
    assert min_forward_steps(num_steps, num_slots) == best


@pytest.mark.parametrize("num_slots", range(1, 9))
@pytest.mark.parametrize("num_steps", range(1, 41))
def test_binomial_is_valid_and_optimal(num_steps: int, num_slots: int) -> None:
    schedule = binomial_schedule(num_steps, num_slots)
    stats = simulate(schedule, num_steps, num_slots)
    assert stats.max_slots_used <= num_slots
    assert stats.forward_steps == min_forward_steps(num_steps, num_slots) == dp_optimum(num_steps, num_slots)
    assert stats.recomputed_steps == stats.forward_steps - num_steps
    assert final_slots(schedule) == 0


def test_min_forward_steps_matches_dp_on_wider_grid() -> None:
    for num_slots in range(1, 13):
        for num_steps in range(1, 121):
            assert min_forward_steps(num_steps, num_slots) == dp_optimum(num_steps, num_slots), (
                num_steps,
                num_slots,
            )


@settings(max_examples=40, deadline=None)
@given(num_steps=st.integers(1, 2000), num_slots=st.integers(1, 20))
def test_binomial_larger_cases(num_steps: int, num_slots: int) -> None:
    schedule = binomial_schedule(num_steps, num_slots)
    stats = simulate(schedule, num_steps, num_slots)
    assert stats.max_slots_used <= num_slots
    assert stats.forward_steps == min_forward_steps(num_steps, num_slots)
    if num_steps <= 120 and num_slots <= 12:
        assert stats.forward_steps == dp_optimum(num_steps, num_slots)
    assert final_slots(schedule) == 0


@pytest.mark.parametrize("num_steps", [1, 2, 3, 10, 57])
def test_binomial_one_slot_is_quadratic(num_steps: int) -> None:
    stats = simulate(binomial_schedule(num_steps, 1), num_steps, 1)
    assert stats.forward_steps == num_steps * (num_steps + 1) // 2 == min_forward_steps(num_steps, 1)
    assert stats.max_slots_used == 1


@pytest.mark.parametrize(("num_steps", "num_slots"), [(1, 1), (1, 5), (5, 5), (5, 9), (30, 30), (30, 1000)])
def test_binomial_enough_slots_means_no_recomputation(num_steps: int, num_slots: int) -> None:
    stats = simulate(binomial_schedule(num_steps, num_slots), num_steps, num_slots)
    assert stats == ScheduleStats(forward_steps=num_steps, max_slots_used=num_steps, recomputed_steps=0)
    assert min_forward_steps(num_steps, num_slots) == num_steps


def test_binomial_large_case_is_valid() -> None:
    # Builds iteratively (no recursion limit at J = 100,000); its speed is a benchmark matter.
    schedule = binomial_schedule(100_000, 10)
    stats = simulate(schedule, 100_000, 10)
    assert stats.max_slots_used <= 10
    assert stats.forward_steps == min_forward_steps(100_000, 10)


# --------------------------------------------------------------------------------------------
# store_all and every_k.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [1, 2, 3, 17, 100])
def test_store_all(num_steps: int) -> None:
    schedule = store_all_schedule(num_steps)
    stats = simulate(schedule, num_steps, num_steps)
    assert stats == ScheduleStats(forward_steps=num_steps, max_slots_used=num_steps, recomputed_steps=0)
    assert final_slots(schedule) == 0
    if num_steps > 1:
        with pytest.raises(ValueError, match="no free slot"):
            simulate(schedule, num_steps, num_steps - 1)


@pytest.mark.parametrize("k", range(1, 13))
@pytest.mark.parametrize("num_steps", [1, 2, 3, 4, 5, 7, 10, 11, 12, 24, 25, 37])
def test_every_k(num_steps: int, k: int) -> None:
    slots = every_k_slots(num_steps, k)
    schedule = every_k_schedule(num_steps, k)
    stats = simulate(schedule, num_steps, slots)
    assert stats.max_slots_used == slots
    assert stats.forward_steps == every_k_forward_steps(num_steps, k) == 2 * num_steps - -(-num_steps // k)
    assert stats.forward_steps >= min_forward_steps(num_steps, slots)
    assert final_slots(schedule) == 0
    if slots > 1:
        with pytest.raises(ValueError, match="no free slot"):
            simulate(schedule, num_steps, slots - 1)


def test_every_k_one_matches_store_all_counts() -> None:
    for num_steps in range(1, 30):
        a = simulate(every_k_schedule(num_steps, 1), num_steps, num_steps)
        b = simulate(store_all_schedule(num_steps), num_steps, num_steps)
        assert a == b


# --------------------------------------------------------------------------------------------
# simulate rejects broken schedules.
# --------------------------------------------------------------------------------------------


def _good() -> list[Op]:
    """A valid schedule for J = 3 with 2 slots."""
    return binomial_schedule(3, 2)


def _expect_error(schedule: list[Op], num_steps: int, num_slots: int, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        simulate(schedule, num_steps, num_slots)


def test_good_base_schedule_passes() -> None:
    assert simulate(_good(), 3, 2).forward_steps == min_forward_steps(3, 2)


def test_rejects_reverse_out_of_order() -> None:
    ops = [
        Op("store", 0),
        Op("advance", 0, 1),
        Op("store", 1),
        Op("advance", 1, 2),
        Op("restore", 0),
        Op("reverse", 0),
    ]
    _expect_error(ops, 2, 2, r"op 5 .*in order, expected step 1")


def test_rejects_restore_of_unstored_state() -> None:
    ops = [Op("store", 0), Op("advance", 0, 2), Op("restore", 1)]
    _expect_error(ops, 2, 2, r"op 2 .*restore of s_1, which is not stored")


def test_rejects_too_many_slots() -> None:
    ops = [Op("store", 0), Op("advance", 0, 1), Op("store", 1)]
    _expect_error(ops, 3, 1, r"op 2 .*no free slot")
    _expect_error(store_all_schedule(4), 4, 3, r"op 6 .*no free slot")


def test_rejects_advance_from_wrong_state() -> None:
    ops = [Op("store", 0), Op("advance", 0, 2), Op("advance", 1, 3)]
    _expect_error(ops, 3, 2, r"op 2 .*advance needs current to hold s_1, it holds s_2")
    ops = [Op("store", 0), Op("advance", 0, 1), Op("reverse", 0)]
    _expect_error(ops, 1, 1, r"op 2 .*current to hold s_0, it holds s_1")


def test_rejects_missing_reverses() -> None:
    ops = _good()
    last_reverse = max(i for i, op in enumerate(ops) if op.kind == "reverse")
    _expect_error(ops[:last_reverse], 3, 2, r"steps 0\.\.0 not reversed")
    _expect_error([Op("store", 0), Op("advance", 0, 3)], 3, 2, r"steps 2\.\.0 not reversed")
    _expect_error([], 1, 1, "not reversed")


@pytest.mark.parametrize(
    ("ops", "pattern"),
    [
        ([Op("reverse", 0)], r"op 0 .*before the advance to J"),
        ([Op("store", 0), Op("advance", 0, 1), Op("restore", 0), Op("advance", 0, 1)], r"op 3 .*only once"),
        ([Op("store", 0), Op("store", 0)], r"op 1 .*already stored"),
        ([Op("free", 0)], r"op 0 .*free of s_0, which is not stored"),
        ([Op("advance", 0, 0)], r"op 0 .*advance target"),
        ([Op("advance", 0, 2)], r"op 0 .*advance target"),
        ([Op("jump", 0)], r"op 0 .*unknown kind"),
        ([Op("store", 0, 1)], r"op 0 .*only 'advance' takes a target"),
        ([Op("store", 5)], r"op 0 .*outside"),
        ([Op("store", 0), Op("advance", 0, 1), Op("restore", 0), Op("reverse", 0), Op("reverse", 0)], r"op 4"),
    ],
)
def test_rejects_other_rule_breaks(ops: list[Op], pattern: str) -> None:
    _expect_error(ops, 1, 2, pattern)


def test_rejects_reverse_with_empty_current() -> None:
    ops = [Op("store", 0), Op("advance", 0, 2), Op("restore", 0), Op("advance", 0, 1)]
    ops += [Op("reverse", 1), Op("reverse", 0)]
    _expect_error(ops, 2, 2, r"op 5 .*it holds nothing")


def test_rejects_non_op_entries() -> None:
    with pytest.raises(TypeError, match="op 0"):
        simulate([("store", 0, -1)], 1, 1)  # type: ignore[list-item]


# --------------------------------------------------------------------------------------------
# Argument validation and slots_for_budget.
# --------------------------------------------------------------------------------------------

_CALLS: list[tuple[str, Callable[[object], object]]] = [
    ("num_steps", lambda v: store_all_schedule(v)),  # type: ignore[arg-type]
    ("num_steps", lambda v: binomial_schedule(v, 3)),  # type: ignore[arg-type]
    ("num_slots", lambda v: binomial_schedule(3, v)),  # type: ignore[arg-type]
    ("num_steps", lambda v: every_k_schedule(v, 2)),  # type: ignore[arg-type]
    ("k", lambda v: every_k_schedule(3, v)),  # type: ignore[arg-type]
    ("k", lambda v: every_k_slots(3, v)),  # type: ignore[arg-type]
    ("k", lambda v: every_k_forward_steps(3, v)),  # type: ignore[arg-type]
    ("num_steps", lambda v: min_forward_steps(v, 3)),  # type: ignore[arg-type]
    ("num_slots", lambda v: min_forward_steps(3, v)),  # type: ignore[arg-type]
    ("num_steps", lambda v: simulate([], v, 1)),  # type: ignore[arg-type]
    ("num_slots", lambda v: simulate([], 1, v)),  # type: ignore[arg-type]
    ("state_bytes", lambda v: slots_for_budget(100, v)),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("name", "call"), _CALLS)
@pytest.mark.parametrize("value", [0, -3])
def test_rejects_small_ints(name: str, call: Callable[[object], object], value: int) -> None:
    with pytest.raises(ValueError, match=rf"{name} must be >= 1, got {value}"):
        call(value)


@pytest.mark.parametrize(("name", "call"), _CALLS)
@pytest.mark.parametrize("value", [2.0, "3", True, None])
def test_rejects_non_ints(name: str, call: Callable[[object], object], value: object) -> None:
    with pytest.raises(TypeError, match=rf"{name} must be an int, got {type(value).__name__}"):
        call(value)


def test_slots_for_budget() -> None:
    assert slots_for_budget(100, 10) == 10
    assert slots_for_budget(109, 10) == 10
    assert slots_for_budget(10, 10) == 1
    with pytest.raises(ValueError, match=r"budget_bytes=9 allows no checkpoint slot for state_bytes=10"):
        slots_for_budget(9, 10)
    with pytest.raises(ValueError, match=r"budget_bytes must be >= 0, got -1"):
        slots_for_budget(-1, 10)
    with pytest.raises(TypeError, match=r"budget_bytes must be an int, got float"):
        slots_for_budget(1.5e9, 10)  # type: ignore[arg-type]


__all__: list[str] = []
