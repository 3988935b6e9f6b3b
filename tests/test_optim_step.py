# SPDX-License-Identifier: Apache-2.0
"""Oracle 1: every row's pure ``step`` against ``torch.optim``'s own step (tests/optim_table.py)."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from gimli_bptt.optim import get_optimizer
from optim_checks import assert_matches_torch, run_against_torch
from optim_table import (
    GRANULARITIES,
    NOT_IN_THE_TABLE,
    ROWS,
    Row,
    built_in_classes,
    learn,
    random_like,
    random_variant,
    tensor_keys,
)
from optim_table import params as row_params

#: Random examples per row (a share of the profile's, at least 3).
EXAMPLES = max(3, settings().max_examples // 5)


def _settings() -> list[Any]:
    """(row, warmup torch steps, granularity, torch kernel): every granularity with the for-loop
    kernel, and torch's foreach and fused kernels (the defaults on accelerators) with float
    hyperparameters, marked slow; fused only from an empty state (slow on the CPU)."""
    out = []
    for row in ROWS:
        combos = [(w, g, "for_loop") for w in (0, 3) for g in GRANULARITIES]
        combos += [(w, "float", "foreach") for w in (0, 3) if "foreach" in row.step_kernels]
        combos += [(0, "float", "fused")] if "fused" in row.step_kernels else []
        for w, g, k in combos:
            when = "from_empty_state" if w == 0 else "after_3_torch_steps"
            marks = row.marks(f"step:{k}") + ([] if k == "for_loop" else [pytest.mark.slow])
            out.append(pytest.param(row, w, g, k, id=f"{row.id}-{when}-{g}-{k}", marks=marks))
    return out


@pytest.mark.parametrize("row,warmup,granularity,kernel", _settings())
def test_step_matches_torch(row: Row, warmup: int, granularity: str, kernel: str) -> None:
    """20 steps on two param groups, from an empty state or from torch's state after 3 steps
    (Algorithm 1, line 3), with the hyperparameters as floats, 0-d tensors or element tensors."""
    run_against_torch(row, warmup=warmup, granularity=granularity, kernel=kernel)


@pytest.mark.parametrize("row", row_params("export"))
def test_export_state_round_trip(row: Row) -> None:
    """After our steps, ``export_state`` loaded into a fresh torch optimizer takes our next step."""
    gen = torch.Generator().manual_seed(1)
    impl = row.impl
    shapes = [s for g in row.shapes.groups for s in g]
    n1 = len(row.shapes.groups[0])
    probe = row.torch_optimizer([[torch.nn.Parameter(random_like(s, gen)) for s in g] for g in row.shapes.groups])
    hyper = [impl.read_hyper(g) for g in probe.param_groups for _ in g["params"]]
    theta = [random_like(s, gen) for s in shapes]
    state = [impl.import_state({}, t, h) for t, h in zip(theta, hyper)]
    for _ in range(5):
        for k in range(len(theta)):
            theta[k], state[k] = impl.step(theta[k], random_like(shapes[k], gen), state[k], hyper[k])

    params = [torch.nn.Parameter(t.clone()) for t in theta]
    opt = row.torch_optimizer([params[:n1], params[n1:]], "for_loop")
    for p, t, s, h in zip(params, theta, state, hyper):
        exported = impl.export_state(s, t)
        assert sorted(set(tensor_keys(exported)) - {"step"}) == tensor_keys(s)
        for key in tensor_keys(s):  # a copy, not an alias of our state
            assert exported[key] is not s[key] and exported[key].data_ptr() != s[key].data_ptr(), key
        reimported = impl.import_state(exported, p, h)
        assert tensor_keys(reimported) == tensor_keys(s)
        for key in tensor_keys(s):
            assert torch.equal(reimported[key], s[key]), key
        if "step" in s:
            assert float(reimported["step"]) == float(s["step"])
        opt.state[p] = exported
    grads = [random_like(s, gen) for s in shapes]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    with row.torch_context():
        opt.step()
    for k in range(len(theta)):
        theta[k], state[k] = impl.step(theta[k], grads[k], state[k], hyper[k])
    assert_matches_torch(row, opt, params, theta, state, "step after export")


@pytest.mark.parametrize("row", row_params("export"))
def test_step_is_pure(row: Row) -> None:
    """``step`` changes none of its inputs (the tape keeps them for the reverse sweep)."""
    gen = torch.Generator().manual_seed(2)
    impl = row.impl
    hyper = row.hyper(0)
    shape = row.shapes.single
    theta, G = random_like(shape, gen), random_like(shape, gen)
    state = impl.import_state({}, theta, hyper)
    for _ in range(2):
        hyper_l = learn(hyper, impl.hyper_names, "element", theta)
        before = [theta.clone(), G.clone()] + [state[k].clone() for k in tensor_keys(state)]
        hyper_before = {n: v.clone() for n, v in hyper_l.items() if isinstance(v, Tensor)}
        theta_next, state_next = impl.step(theta, G, state, hyper_l)
        after = [theta, G] + [state[k] for k in tensor_keys(state)]
        assert all(torch.equal(a, b) for a, b in zip(before, after)), "step changed an input tensor"
        assert all(torch.equal(hyper_l[n], v) for n, v in hyper_before.items()), "step changed a hyperparameter"
        for key in tensor_keys(state_next):
            assert all(state_next[key].data_ptr() != t.data_ptr() for t in after), f"state[{key!r}] aliases an input"
        theta, state = theta_next, state_next


def test_registry() -> None:
    """Every class of the table has its implementation, and a subclass finds its base's."""
    for row in ROWS:
        assert row.impl.torch_cls is row.torch_cls, row.id

    class MyAdam(torch.optim.Adam):
        pass

    assert get_optimizer(MyAdam) is get_optimizer(torch.optim.Adam)
    with pytest.raises(TypeError, match="supported optimizers"):
        get_optimizer(torch.optim.LBFGS)


@pytest.mark.parametrize("cls", built_in_classes(), ids=lambda c: c.__name__)
def test_every_built_in_optimizer_has_a_row(cls: type) -> None:
    """A built-in optimizer is tested by the oracles once it has a row in tests/optim_table.py."""
    in_table = any(r.torch_cls is cls for r in ROWS)
    if cls in NOT_IN_THE_TABLE:
        assert not in_table, f"{cls.__name__} has rows now: remove it from NOT_IN_THE_TABLE"
        pytest.skip(f"{cls.__name__}: {NOT_IN_THE_TABLE[cls]}")
    assert in_table, f"{cls.__name__} has no row in tests/optim_table.py: no oracle tests it"


@pytest.mark.parametrize("row", row_params("step-random"))
@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.data(), warmup=st.integers(0, 3), granularity=st.sampled_from(GRANULARITIES),
       seed=st.integers(0, 2**16))
def test_step_matches_torch_random(row: Row, data: st.DataObject, warmup: int, granularity: str, seed: int) -> None:
    """Random hyperparameters and flags (the row's declaration), 1 to 3 random shapes per group,
    a random warm-up of torch steps, every granularity: 5 steps against torch."""
    variant = data.draw(random_variant(row), label="row")
    shapes = [data.draw(st.lists(row.shapes.strategy(), min_size=1, max_size=3), label=f"shapes of group {g}")
              for g in (1, 2)]
    run_against_torch(variant, warmup=warmup, granularity=granularity, kernel="for_loop", steps=5, shapes=shapes,
                      seed=seed)
