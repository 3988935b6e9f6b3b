# SPDX-License-Identifier: Apache-2.0
"""The memory budget's accounting: the bytes of one step's graph, the states that fit, the graphs that fit."""
from __future__ import annotations

import contextlib
import gc
import weakref
from typing import Any

import pytest
import torch
from torch import Tensor

from gimli_bptt import Memory
from gimli_bptt.reverse.meter import SavedGraphMeter, tensors_in
from gimli_bptt.reverse.plan import graphs_that_fit, plan_tape
from gimli_bptt.reverse.schedules import binomial_schedule, store_all_schedule

N = 10  # elements of the test tensors (float64: 80 bytes each)


def _leaf() -> Tensor:
    return torch.linspace(-1.0, 1.0, N, dtype=torch.float64).requires_grad_(True)


def test_counts_each_saved_storage_once_and_not_the_held_ones() -> None:
    x = _leaf()
    meter = SavedGraphMeter(held=[x])
    with meter.hooks():
        y = x.exp()  # saves its result y: one new storage
        y[::2].sin()  # saves a view of y: the same storage, not counted again
        x[1:].cos()  # saves a view of the held x: not counted
    assert meter.nbytes == N * 8
    del y


def test_counts_what_the_create_graph_backward_saves() -> None:
    x, w = _leaf(), _leaf()
    meter = SavedGraphMeter(held=[x, w])
    with meter.hooks():
        loss = (x * w).sum()  # saves x and w, both held
        assert meter.nbytes == 0
        (G,) = torch.autograd.grad(loss, x, create_graph=True)  # G = w·1: the backward saves its ones
    backward_saves = meter.nbytes
    assert backward_saves > 0
    meter.count([G, None, G.view(2, 5)])  # G itself, once; None is skipped
    assert meter.nbytes == backward_saves + N * 8
    meter.count([x])  # held
    assert meter.nbytes == backward_saves + N * 8


def test_a_whole_base_counts_for_a_saved_view() -> None:
    x = _leaf()
    meter = SavedGraphMeter(held=[x])
    with meter.hooks():
        z = x * 2  # a temporary: nothing saves z itself
        z[:2].exp()  # saves its result (2 elements)
        z[2:].sin()  # saves its input, a view that keeps all of z alive
    assert meter.nbytes == 2 * 8 + N * 8


def test_tensors_without_a_strided_storage_are_not_counted() -> None:
    sparse = torch.eye(3, dtype=torch.float64).to_sparse()
    meter = SavedGraphMeter(held=[sparse])
    meter.count([sparse])
    assert meter.nbytes == 0


def test_the_measured_graph_computes_the_same_bits_and_frees_itself() -> None:
    def graph(meter: SavedGraphMeter | None) -> tuple[Tensor, Tensor, Any]:
        x = _leaf()
        with meter.hooks() if meter is not None else contextlib.nullcontext():
            y = x.tanh()  # saves its output
            (G,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
        return x, G, weakref.ref(y)

    def second_order(meter: SavedGraphMeter | None) -> Tensor:
        x, G, _ = graph(meter)
        return torch.autograd.grad(G, x, torch.ones_like(G))[0]

    assert torch.equal(second_order(SavedGraphMeter()), second_order(None))
    gc.disable()  # only reference counting may free a graph dropped without a backward pass (step 0's)
    try:
        _, G, alive = graph(SavedGraphMeter())
        del G
        assert alive() is None, "the meter left a reference cycle through a saved output"
    finally:
        gc.enable()


def test_tensors_in_a_nested_batch() -> None:
    a, b, c = torch.zeros(1), torch.ones(2), torch.zeros(3)
    found = list(tensors_in({"x": (a, [b, 3, "label"]), "y": c, "n": None}))
    assert [id(t) for t in found] == [id(a), id(b), id(c)]
    assert list(tensors_in(7)) == []


@pytest.mark.parametrize("left, J, graph_bytes, k", [(0, 5, 100, 0), (99, 5, 100, 0), (100, 5, 100, 1),
                                                     (250, 5, 100, 2), (10_000, 5, 100, 5), (5, 1, 1, 1)])
def test_graphs_that_fit(left: int, J: int, graph_bytes: int, k: int) -> None:
    assert graphs_that_fit(left, J, graph_bytes) == k


def plan_states(budget: int, J: int, state: int, hvp: str = "rev") -> Any:
    return plan_tape(Memory(budget=budget), J, hvp, state)


def test_plan_states_in_each_regime() -> None:
    J, state = 6, 100
    full = plan_states(J * state + 250, J, state)
    assert full.schedule == store_all_schedule(J) and full.graph_bytes_left == 250 and full.state_bytes == state
    assert full.keep_graphs_from is None and full.recomputed_steps == 0
    exact = plan_states(J * state, J, state)
    assert exact.schedule == store_all_schedule(J) and exact.graph_bytes_left == 0
    short = plan_states(J * state - 1, J, state)
    assert short.schedule == binomial_schedule(J, J - 1) and short.graph_bytes_left is None
    assert short.recomputed_steps > 0
    assert plan_states(2 * state + 99, J, state).schedule == binomial_schedule(J, 2)
    assert plan_states(J * state + 250, J, state, hvp="fwd").graph_bytes_left is None  # graphs: rev only
    with pytest.raises(ValueError, match="budget_bytes=99 allows no checkpoint slot for state_bytes=100"):
        plan_states(99, J, state)


def test_plans_by_hand() -> None:
    J = 6
    assert plan_tape(Memory(), J, "rev", None).schedule == store_all_schedule(J)
    kept = plan_tape(Memory(keep_graphs=True), J, "rev", None)
    assert kept.keep_graphs_from == 0 and kept.schedule == store_all_schedule(J)
    assert plan_tape(Memory(slots=2), J, "rev", 100).schedule == binomial_schedule(J, 2)
    assert plan_tape(Memory(slots=J), J, "rev", 100).schedule == store_all_schedule(J)
    assert plan_tape(Memory(slots=2, verify=True), J, "rev", 100).verify


@pytest.mark.parametrize("call, exc, match", [
    (lambda: graphs_that_fit(-1, 3, 10), ValueError, "bytes_left must be >= 0"),
    (lambda: graphs_that_fit(10, 3, 0), ValueError, "graph_bytes must be >= 1"),
    (lambda: graphs_that_fit(10.0, 3, 1), TypeError, "bytes_left must be an int"),
    (lambda: plan_states(0, 3, 10), ValueError, "budget must be >= 1"),
    (lambda: plan_states(100, 0, 10), ValueError, "num_steps must be >= 1"),
    (lambda: plan_states(100, 3, 0), ValueError, "state_bytes must be >= 1"),
])
def test_bad_arguments(call: Any, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        call()
