# SPDX-License-Identifier: Apache-2.0
"""Oracle 1: each differentiable optimizer's pure ``step`` against ``torch.optim``'s own step."""
from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from gimli_bptt.optim import get_optimizer
from optim_cases import (
    CASES,
    GRANULARITIES,
    GROUP_SHAPES,
    OptimCase,
    assert_rel,
    case_params,
    learn,
    make_torch_optimizer,
    random_like,
    tensor_keys,
)

TOL = 1e-12
STEPS = 20
SHAPES = [s for group in GROUP_SHAPES for s in group]


def _assert_matches_torch(opt: torch.optim.Optimizer, params: list[Tensor], theta: list[Tensor],
                          state: list[dict[str, Any]], where: str, exact_keys: bool = True) -> None:
    """Our parameters and every state entry equal torch's (the state under torch's names)."""
    for k, (p, t, s) in enumerate(zip(params, theta, state)):
        assert t.shape == p.shape and t.dtype == p.dtype
        assert_rel(t, p.detach(), TOL, f"{where}, param {k} {tuple(p.shape)}: theta")
        ts = opt.state[p]
        for key, value in ts.items():
            assert key in s, f"{where}, param {k}: state lacks {key!r}"
            if key == "step":
                assert float(s[key]) == float(value)
            else:
                ours = s[key]
                if value.dim() == 0 and ours.dim() > 0:
                    # A scalar state entry (NAdam's mu_product, ASGD's eta) is per element when a
                    # hyperparameter it depends on is learned per element; here all are equal.
                    value = value.expand(ours.shape)
                assert_rel(ours, value, TOL, f"{where}, param {k}: state[{key!r}]")
        extra = {key for key, v in s.items() if v is not None} - set(ts)
        if exact_keys:
            assert not extra, f"{where}, param {k}: state entries torch does not have: {extra}"


def _run_against_torch(case: OptimCase, *, warmup: int, granularity: str, kernel: str, steps: int = STEPS,
                       shapes: list[tuple[int, ...]] = SHAPES, seed: int = 0) -> None:
    """``warmup`` torch steps, import the state, then ``steps`` steps of both on the same gradients."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(random_like(s, gen)) for s in shapes]
    opt = make_torch_optimizer(case, params, kernel)
    impl = case.impl
    hyper_of = {id(p): impl.read_hyper(g) for g in opt.param_groups for p in g["params"]}

    def torch_step(grads: list[Tensor]) -> None:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()

    for _ in range(warmup):
        torch_step([random_like(s, gen) for s in shapes])
    theta = [p.detach().clone() for p in params]
    state = [impl.import_state(opt.state[p], p, hyper_of[id(p)]) for p in params]
    if warmup == 0:  # (Adagrad fills its state when built: a step count of 0)
        assert all(len(opt.state[p]) == 0 or float(opt.state[p]["step"]) == 0 for p in params)
    # Note [Learned momentum]: a learned momentum takes the buffer path even at momentum 0,
    # so our state then holds a buffer that torch does not; the parameters agree.
    learns_zero_momentum = granularity != "float" and "momentum" in impl.hyper_names and any(
        hyper_of[id(p)]["momentum"] == 0 for p in params)
    hyper = [learn(hyper_of[id(p)], impl.hyper_names, granularity, p.detach()) for p in params]
    for j in range(steps):
        grads = [random_like(s, gen) for s in shapes]
        torch_step(grads)
        for k in range(len(params)):
            theta[k], state[k] = impl.step(theta[k], grads[k], state[k], hyper[k])
        _assert_matches_torch(opt, params, theta, state, f"step {warmup + j + 1}",
                              exact_keys=not learns_zero_momentum)


#: (warmup torch steps, hyperparameter granularity, torch kernel). torch's foreach and fused
#: kernels (the defaults on accelerators) are checked with float hyperparameters; fused is slow
#: on CPU, so only from an empty state.
_SETTINGS = [(w, g, "for_loop") for w in (0, 3) for g in GRANULARITIES] + [
    (0, "float", "foreach"), (3, "float", "foreach"), (0, "float", "fused")]


@pytest.mark.parametrize("warmup,granularity,kernel", [
    pytest.param(w, g, k, id=f"{'from_empty_state' if w == 0 else 'after_3_torch_steps'}-{g}-{k}")
    for w, g, k in _SETTINGS])
@pytest.mark.parametrize("case", case_params())
def test_step_matches_torch(case: OptimCase, warmup: int, granularity: str, kernel: str) -> None:
    """20 steps on two param groups, from an empty state or from torch's state after 3 steps
    (Algorithm 1, line 3), with the hyperparameters as floats, 0-d tensors or element tensors."""
    if kernel == "fused" and "fused" not in inspect.signature(case.torch_cls.__init__).parameters:
        pytest.skip(f"torch.optim.{case.torch_cls.__name__} has no fused kernel")
    if kernel == "foreach" and case.torch_cls is torch.optim.ASGD:
        pytest.skip("torch's foreach ASGD computes eta in float32 tensor arithmetic: it differs from "
                    "torch's own for-loop ASGD by ~1e-8 (we match the for-loop)")
    _run_against_torch(case, warmup=warmup, granularity=granularity, kernel=kernel)


@pytest.mark.parametrize("case", case_params())
def test_export_state_round_trip(case: OptimCase) -> None:
    """After our steps, ``export_state`` loaded into a fresh torch optimizer takes our next step."""
    gen = torch.Generator().manual_seed(1)
    impl = case.impl
    probe = make_torch_optimizer(case, [torch.nn.Parameter(random_like(s, gen)) for s in SHAPES])
    hyper = [impl.read_hyper(g) for g in probe.param_groups for _ in g["params"]]
    theta = [random_like(s, gen) for s in SHAPES]
    state = [impl.import_state({}, t, h) for t, h in zip(theta, hyper)]
    for _ in range(5):
        for k in range(len(theta)):
            theta[k], state[k] = impl.step(theta[k], random_like(SHAPES[k], gen), state[k], hyper[k])

    params = [torch.nn.Parameter(t.clone()) for t in theta]
    opt = make_torch_optimizer(case, params)
    for p, t, s, h in zip(params, theta, state, hyper):
        exported = impl.export_state(s, t)
        assert sorted(set(tensor_keys(exported)) - {"step"}) == tensor_keys(s)
        for key in tensor_keys(s):  # a copy, not an alias of our state
            assert exported[key] is not s[key] and exported[key].data_ptr() != s[key].data_ptr()
        reimported = impl.import_state(exported, p, h)
        assert tensor_keys(reimported) == tensor_keys(s)
        for key in tensor_keys(s):
            assert torch.equal(reimported[key], s[key])
        if "step" in s:
            assert float(reimported["step"]) == float(s["step"])
        opt.state[p] = exported
    grads = [random_like(s, gen) for s in SHAPES]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    for k in range(len(theta)):
        theta[k], state[k] = impl.step(theta[k], grads[k], state[k], hyper[k])
    _assert_matches_torch(opt, params, theta, state, "step after export")


@pytest.mark.parametrize("case", case_params())
def test_step_is_pure(case: OptimCase) -> None:
    """``step`` changes none of its inputs (the tape keeps them for the reverse sweep)."""
    gen = torch.Generator().manual_seed(2)
    impl = case.impl
    probe = make_torch_optimizer(case, [torch.nn.Parameter(random_like(s, gen)) for s in SHAPES])
    hyper = impl.read_hyper(probe.param_groups[0])
    theta, G = random_like((4, 3), gen), random_like((4, 3), gen)
    state = impl.import_state({}, theta, hyper)
    for _ in range(2):
        hyper_l = learn(hyper, impl.hyper_names, "element", theta)
        before = [theta.clone(), G.clone()] + [state[k].clone() for k in tensor_keys(state)]
        hyper_before = {n: v.clone() for n, v in hyper_l.items() if isinstance(v, Tensor)}
        theta_next, state_next = impl.step(theta, G, state, hyper_l)
        after = [theta, G] + [state[k] for k in tensor_keys(state)]
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        assert all(torch.equal(hyper_l[n], v) for n, v in hyper_before.items())
        for key in tensor_keys(state_next):
            assert all(state_next[key].data_ptr() != t.data_ptr() for t in after)
        theta, state = theta_next, state_next


def test_registry() -> None:
    """Every class of the table has its implementation, and a subclass finds its base's."""
    for case in CASES:
        assert case.impl.torch_cls is case.torch_cls

    class MyAdam(torch.optim.Adam):
        pass

    assert get_optimizer(MyAdam) is get_optimizer(torch.optim.Adam)
    with pytest.raises(TypeError, match="supported optimizers"):
        get_optimizer(torch.optim.LBFGS)


# --------------------------------------------------------------------------------------------
# Random hyperparameters and shapes.
# --------------------------------------------------------------------------------------------

_shapes = st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=3)
_unit = st.floats(0.0, 0.99)


@st.composite
def _sgd_case(draw: st.DrawFn) -> OptimCase:
    nesterov = draw(st.booleans())
    momentum = draw(st.floats(0.05, 0.99)) if nesterov else draw(st.sampled_from([0.0, 0.5]) | _unit)
    kwargs = dict(lr=draw(st.floats(1e-4, 0.5)), momentum=momentum,
                  dampening=0.0 if nesterov else draw(st.sampled_from([0.0]) | _unit),
                  weight_decay=draw(st.sampled_from([0.0]) | st.floats(0.0, 0.5)),
                  nesterov=nesterov, maximize=draw(st.booleans()))
    return OptimCase("sgd-random", torch.optim.SGD, kwargs)


@st.composite
def _adam_case(draw: st.DrawFn) -> OptimCase:
    cls = draw(st.sampled_from([torch.optim.Adam, torch.optim.AdamW]))
    kwargs = dict(lr=draw(st.floats(1e-5, 0.3)), betas=(draw(_unit), draw(st.floats(0.0, 0.9999))),
                  eps=draw(st.floats(1e-10, 1e-1)), weight_decay=draw(st.sampled_from([0.0]) | st.floats(0.0, 0.5)),
                  amsgrad=draw(st.booleans()), maximize=draw(st.booleans()))
    return OptimCase(f"{cls.__name__}-random", cls, kwargs)


@settings(deadline=None)
@given(case=st.one_of(_sgd_case(), _adam_case()), shapes=_shapes, warmup=st.sampled_from([0, 2]),
       granularity=st.sampled_from(GRANULARITIES), seed=st.integers(0, 2**16))
def test_step_matches_torch_random(case: OptimCase, shapes: list[tuple[int, ...]], warmup: int,
                                   granularity: str, seed: int) -> None:
    _run_against_torch(case, warmup=warmup, granularity=granularity, kernel="for_loop", steps=5,
                       shapes=shapes, seed=seed)
