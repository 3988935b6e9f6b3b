# SPDX-License-Identifier: Apache-2.0
"""Oracle 2: every row's hand-written ``step_vjp`` against autograd, and the dot-product test (tests/optim_table.py)."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optim_checks import (
    assert_dot_product,
    assert_vjp_matches,
    learned,
    out_keys,
    point,
    state_next_bar,
)
from optim_table import ROWS, Row, learn, random_like, random_variant, tensor_keys
from optim_table import params as row_params

#: Warm-ups of the fixed points: the first step (lazy state, bias corrections at t = 1) and the fourth.
WARMUPS = {"first_step": 0, "after_3_steps": 3}
#: Random examples per row (a share of the profile's, at least 3).
EXAMPLES = max(3, settings().max_examples // 5)
#: torch.func.jvp goes through torch.jit.script inside torch, which warns that it is deprecated
#: (a DeprecationWarning in torch 2.13, a FutureWarning in 2.14).
JIT_WARNING = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def _learn_sets() -> list[Any]:
    """(row, learned names): all hyperparameters together, and each alone (marked slow)."""
    out = []
    for row in ROWS:
        names = row.impl.hyper_names
        out.append(pytest.param(row, names, id=f"{row.id}-learn_all", marks=row.marks("vjp")))
        out += [pytest.param(row, (n,), id=f"{row.id}-learn_{n}", marks=row.marks("vjp") + [pytest.mark.slow])
                for n in names]
    return out


@pytest.mark.parametrize("phase", list(WARMUPS))
@pytest.mark.parametrize("granularity", ["0d", "element"])
@pytest.mark.parametrize("row,learned_names", _learn_sets())
def test_vjp_matches_autograd(row: Row, learned_names: tuple[str, ...], granularity: str, phase: str) -> None:
    """Random cotangents for theta' and every differentiable state entry; both param groups."""
    gen = torch.Generator().manual_seed(10)
    for group in (0, 1):
        for shape in row.shapes.vjp:
            theta, G, state, hyper = point(row, shape, WARMUPS[phase], gen, group)
            hyper = learn(hyper, learned_names, granularity, theta)
            sb = state_next_bar(row, theta, G, state, hyper, gen)
            assert_vjp_matches(row, theta, G, state, hyper, random_like(shape, gen), sb,
                               f"group {group}, shape {shape}")


@pytest.mark.parametrize("phase", list(WARMUPS))
@pytest.mark.parametrize("row", row_params("vjp"))
def test_vjp_fixed_hyper_and_empty_state_bar(row: Row, phase: str) -> None:
    """Float hyperparameters (no ``hyper_bar``), and ``state_next_bar`` empty or partial (missing
    keys are zero), as at the last step of the reverse sweep."""
    gen = torch.Generator().manual_seed(11)
    for shape in row.shapes.vjp:
        theta, G, state, hyper = point(row, shape, WARMUPS[phase], gen)
        keys = out_keys(row, theta, G, state, hyper)
        for subset in [[], keys[:1], keys[1:]]:
            sb = state_next_bar(row, theta, G, state, hyper, gen, subset)
            assert_vjp_matches(row, theta, G, state, hyper, random_like(shape, gen), sb,
                               f"shape {shape}, state_next_bar keys {subset}")


@pytest.mark.parametrize("row", row_params("vjp"))
def test_vjp_is_pure(row: Row) -> None:
    """``step_vjp`` changes none of its inputs (the sweep reuses the cotangents)."""
    gen = torch.Generator().manual_seed(12)
    shape = row.shapes.single
    theta, G, state, hyper = point(row, shape, 3, gen)
    hyper = learn(hyper, row.impl.hyper_names, "element", theta)
    tb = random_like(shape, gen)
    sb = state_next_bar(row, theta, G, state, hyper, gen)
    inputs = [theta, G, tb] + [state[k] for k in tensor_keys(state)] + list(sb.values()) + [
        hyper[n] for n in learned(hyper)]
    before = [x.clone() for x in inputs]
    row.impl.step_vjp(theta, G, state, hyper, tb, sb)
    assert all(torch.equal(a, b) for a, b in zip(before, inputs)), "step_vjp changed an input"


@JIT_WARNING
@pytest.mark.parametrize("phase", list(WARMUPS))
@pytest.mark.parametrize("granularity", ["float", "0d", "element"])
@pytest.mark.parametrize("row", row_params("dot"))
def test_dot_product(row: Row, granularity: str, phase: str) -> None:
    """<u, J v> by forward mode through ``step`` equals <J^T u, v> by ``step_vjp``."""
    gen = torch.Generator().manual_seed(13)
    for shape in row.shapes.vjp:
        for _ in range(2):
            theta, G, state, hyper = point(row, shape, WARMUPS[phase], gen)
            hyper = learn(hyper, row.impl.hyper_names, granularity, theta)
            assert_dot_product(row, theta, G, state, hyper, gen, f"shape {shape}")


@JIT_WARNING
@pytest.mark.parametrize("row", row_params("vjp-random"))
@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.data(), warmup=st.integers(0, 4), granularity=st.sampled_from(["0d", "element"]),
       seed=st.integers(0, 2**16))
def test_vjp_matches_autograd_random(row: Row, data: st.DataObject, warmup: int, granularity: str, seed: int) -> None:
    """Random hyperparameters and flags (the row's declaration), a random shape and warm-up, every
    hyperparameter learned: the VJP against autograd, and the dot-product test."""
    variant = data.draw(random_variant(row), label="row")
    shape = data.draw(row.shapes.strategy(), label="shape")
    gen = torch.Generator().manual_seed(seed)
    theta, G, state, hyper = point(variant, shape, warmup, gen)
    hyper = learn(hyper, variant.impl.hyper_names, granularity, theta)
    sb = state_next_bar(variant, theta, G, state, hyper, gen)
    assert_vjp_matches(variant, theta, G, state, hyper, random_like(shape, gen), sb, "random")
    assert_dot_product(variant, theta, G, state, hyper, gen, "random")
