# SPDX-License-Identifier: Apache-2.0
"""The checks the optimizer oracles make at one point, shared by the table tests and the edge-case tests."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from optim_table import DTYPE, Row, assert_rel, learn, random_like, tensor_keys

#: A point of the per-tensor oracles: ``(theta, G, state, hyper)``.
Point = tuple[Tensor, Tensor, dict[str, Any], dict[str, Any]]
#: ``(theta_bar, G_bar, state_bar, hyper_bar)``.
Cotangents = tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]


# ---------------------------------------------------------------------------- step against torch.optim
def assert_matches_torch(row: Row, opt: torch.optim.Optimizer, params: Sequence[Tensor], theta: Sequence[Tensor],
                         state: Sequence[dict[str, Any]], where: str, exact_keys: bool = True) -> None:
    """Our parameters and every state entry equal torch's (the state under torch's names)."""
    tol = row.tol.step
    for k, (p, t, s) in enumerate(zip(params, theta, state)):
        assert t.shape == p.shape and t.dtype == p.dtype, f"{where}, param {k}: {t.shape} {t.dtype}"
        assert_rel(t, p.detach(), tol, f"{row.id}, {where}, param {k} {tuple(p.shape)}: theta")
        ts = opt.state[p]
        for key, value in ts.items():
            assert key in s, f"{row.id}, {where}, param {k}: state lacks {key!r}"
            if key == "step":
                assert float(s[key]) == float(value), f"{row.id}, {where}: step {float(s[key])} != {float(value)}"
            else:
                ours = s[key]
                if value.dim() == 0 and ours.dim() > 0:
                    # A scalar state entry (NAdam's mu_product, ASGD's eta) is per element when a
                    # hyperparameter it depends on is learned per element; here all are equal.
                    value = value.expand(ours.shape)
                assert_rel(ours, value, tol, f"{row.id}, {where}, param {k}: state[{key!r}]")
        extra = {key for key, v in s.items() if v is not None} - set(ts)
        if exact_keys:
            assert not extra, f"{row.id}, {where}, param {k}: state entries torch does not have: {extra}"


def run_against_torch(row: Row, *, warmup: int, granularity: str, kernel: Optional[str] = "for_loop",
                      steps: int = 20, shapes: Optional[Sequence[Sequence[Sequence[int]]]] = None,
                      seed: int = 0) -> None:
    """``warmup`` torch steps, import the state, then ``steps`` steps of both on the same gradients.

    ``shapes`` are those of the two param groups (default: the row's :class:`Shapes`); the
    hyperparameters are floats, 0-d tensors or element tensors (``granularity``).
    """
    groups = row.shapes.groups if shapes is None else shapes
    gen = torch.Generator().manual_seed(seed)
    params_by_group = [[torch.nn.Parameter(random_like(s, gen)) for s in g] for g in groups]
    params = [p for g in params_by_group for p in g]
    flat_shapes = [tuple(p.shape) for p in params]
    opt = row.torch_optimizer(params_by_group, kernel)
    impl = row.impl
    hyper_of = {id(p): impl.read_hyper(g) for g in opt.param_groups for p in g["params"]}

    def torch_step(grads: list[Tensor]) -> None:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        with row.torch_context():
            opt.step()

    for _ in range(warmup):
        torch_step([random_like(s, gen) for s in flat_shapes])
    theta = [p.detach().clone() for p in params]
    state = [impl.import_state(opt.state[p], p, hyper_of[id(p)]) for p in params]
    if warmup == 0:  # (Adagrad fills its state when built: a step count of 0)
        assert all(len(opt.state[p]) == 0 or float(opt.state[p].get("step", 0)) == 0 for p in params)
    extra_ok = granularity != "float" and row.extra_state_when_learned is not None and any(
        row.extra_state_when_learned(hyper_of[id(p)]) for p in params)
    hyper = [learn(hyper_of[id(p)], impl.hyper_names, granularity, p.detach()) for p in params]
    for j in range(steps):
        grads = [random_like(s, gen) for s in flat_shapes]
        torch_step(grads)
        for k in range(len(params)):
            theta[k], state[k] = impl.step(theta[k], grads[k], state[k], hyper[k])
        assert_matches_torch(row, opt, params, theta, state, f"step {warmup + j + 1}", exact_keys=not extra_ok)


# ---------------------------------------------------------------------------- VJP against autograd
def point(row: Row, shape: Sequence[int], warmup: int, gen: torch.Generator, group: int = 0,
          hyper: Optional[dict[str, Any]] = None) -> Point:
    """``(theta, G, state, hyper)`` after ``warmup`` of our steps from a fresh state (at 0: SGD's
    buffer None, Adam's step 0), moved off ties by the row's ``prepare``."""
    impl = row.impl
    hyper = row.hyper(group) if hyper is None else hyper
    theta = random_like(shape, gen)
    state = impl.import_state({}, theta, hyper)
    for _ in range(warmup):
        theta, state = impl.step(theta, random_like(shape, gen), state, hyper)
    G = random_like(shape, gen)
    if row.prepare is not None:
        row.prepare(row, theta, G, state, hyper, warmup)
    return theta, G, state, hyper


def learned(hyper: dict[str, Any]) -> list[str]:
    """The names of the learned (tensor) hyperparameters, sorted."""
    return sorted(n for n, v in hyper.items() if isinstance(v, Tensor))


def out_keys(row: Row, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any]) -> list[str]:
    """The differentiable entries of the next state."""
    return tensor_keys(row.impl.step(theta, G, state, hyper)[1])


def state_next_bar(row: Row, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                   gen: torch.Generator, keys: Optional[Sequence[str]] = None) -> dict[str, Tensor]:
    """Random cotangents for the differentiable entries of the next state, each shaped like its
    entry (a scalar entry, NAdam's mu_product or ASGD's eta, is 0-d beside an n-d parameter)."""
    nxt = row.impl.step(theta, G, state, hyper)[1]
    keys = tensor_keys(nxt) if keys is None else keys
    return {k: random_like(nxt[k].shape, gen) for k in keys}


def autograd_vjp(row: Row, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                 theta_next_bar: Tensor, state_next_bar: dict[str, Tensor]) -> Cotangents:
    """``(theta_bar, G_bar, state_bar, hyper_bar)`` by ``torch.autograd.grad`` through ``step``."""
    leaf = lambda x: x.detach().clone().requires_grad_(True)  # noqa: E731
    theta, G = leaf(theta), leaf(G)
    state = {k: (leaf(v) if isinstance(v, Tensor) else v) for k, v in state.items()}
    hyper = {k: (leaf(v) if isinstance(v, Tensor) else v) for k, v in hyper.items()}
    theta_next, nxt = row.impl.step(theta, G, state, hyper)
    out = (theta_next * theta_next_bar).sum()
    for k, bar in state_next_bar.items():
        out = out + (nxt[k] * bar).sum()
    skeys, hkeys = tensor_keys(state), learned(hyper)
    inputs = [theta, G] + [state[k] for k in skeys] + [hyper[n] for n in hkeys]
    grads = torch.autograd.grad(out, inputs, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]
    n = 2 + len(skeys)
    return grads[0], grads[1], dict(zip(skeys, grads[2:n])), dict(zip(hkeys, grads[n:]))


def check_contract(theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any], theta_bar: Tensor,
                   G_bar: Tensor, state_bar: dict[str, Tensor], hyper_bar: dict[str, Tensor]) -> None:
    """Shapes and keys: one cotangent per tensor input, none for the fixed floats."""
    assert theta_bar.shape == theta.shape and G_bar.shape == G.shape, (theta_bar.shape, G_bar.shape, theta.shape)
    assert set(state_bar) <= set(tensor_keys(state)), (sorted(state_bar), tensor_keys(state))
    for k, v in state_bar.items():
        assert v.shape == state[k].shape, (k, v.shape, state[k].shape)
    assert sorted(hyper_bar) == learned(hyper), "hyper_bar needs one entry per tensor hyperparameter"
    for n, v in hyper_bar.items():
        assert v.shape == hyper[n].shape, (n, v.shape, hyper[n].shape)


def assert_vjp_matches(row: Row, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                       theta_next_bar: Tensor, state_next_bar: dict[str, Tensor], where: str) -> None:
    """``step_vjp`` keeps the contract and equals autograd through ``step`` within ``row.tol.vjp``,
    relative to the row's cancellation floors where it has them."""
    ours = row.impl.step_vjp(theta, G, state, hyper, theta_next_bar, state_next_bar)
    check_contract(theta, G, state, hyper, *ours)
    ref = autograd_vjp(row, theta, G, state, hyper, theta_next_bar, state_next_bar)
    theta_bar, G_bar, state_bar, hyper_bar = ours
    floor = {} if row.floors is None else row.floors(row, theta, G, state, hyper, theta_next_bar)
    tol, where = row.tol.vjp, f"{row.id}, {where}"
    assert_rel(theta_bar, ref[0], tol, f"{where}: theta_bar", floor.get("theta", 0.0))
    assert_rel(G_bar, ref[1], tol, f"{where}: G_bar", floor.get("G", 0.0))
    for k, r in ref[2].items():  # a missing entry is zero
        assert_rel(state_bar.get(k, torch.zeros_like(r)), r, tol, f"{where}: state_bar[{k!r}]", floor.get(k, 0.0))
    for n, r in ref[3].items():
        assert_rel(hyper_bar[n], r, tol, f"{where}: hyper_bar[{n!r}]", floor.get(n, 0.0))


def dot_product_gap(row: Row, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                    gen: torch.Generator) -> tuple[float, float, float]:
    """``(<u, J v>, <J^T u, v>, scale)`` for random directions v and cotangents u: forward mode
    through ``step`` against ``step_vjp``."""
    impl = row.impl
    skeys, hkeys = tensor_keys(state), learned(hyper)
    keys = out_keys(row, theta, G, state, hyper)

    def f(theta: Tensor, G: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
        s = dict(state, **dict(zip(skeys, rest[: len(skeys)])))
        h = dict(hyper, **dict(zip(hkeys, rest[len(skeys):])))
        theta_next, nxt = impl.step(theta, G, s, h)
        return (theta_next, *[nxt[k] for k in keys])

    primals = (theta, G, *[state[k] for k in skeys], *[hyper[n] for n in hkeys])
    v = tuple(torch.randn(p.shape, generator=gen, dtype=DTYPE) for p in primals)
    outputs, Jv = torch.func.jvp(f, primals, v)
    u = [torch.randn(o.shape, generator=gen, dtype=DTYPE) for o in outputs]
    lhs_terms = [(a * b).sum() for a, b in zip(u, Jv)]

    theta_bar, G_bar, state_bar, hyper_bar = impl.step_vjp(theta, G, state, hyper, u[0], dict(zip(keys, u[1:])))
    bars = [theta_bar, G_bar] + [state_bar.get(k, torch.zeros_like(state[k])) for k in skeys] + [
        hyper_bar[n] for n in hkeys]
    rhs_terms = [(a * b).sum() for a, b in zip(bars, v)]
    scale = sum((a.abs() * b.abs()).sum().item() for a, b in zip(u, Jv)) + sum(
        (a.abs() * b.abs()).sum().item() for a, b in zip(bars, v))
    return sum(lhs_terms).item(), sum(rhs_terms).item(), scale


def assert_dot_product(row: Row, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                       gen: torch.Generator, where: str) -> None:
    """The dot-product test within ``row.tol.vjp`` of its scale."""
    lhs, rhs, scale = dot_product_gap(row, theta, G, state, hyper, gen)
    assert abs(lhs - rhs) <= row.tol.vjp * scale, f"{row.id}, {where}: <u, Jv> = {lhs!r}, <J^T u, v> = {rhs!r}"


def check_vjp(row: Row, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
              gen: torch.Generator, where: str) -> None:
    """The VJP against autograd (random cotangents for θ' and every state entry), and the dot-product
    test, at one point."""
    sb = state_next_bar(row, theta, G, state, hyper, gen)
    assert_vjp_matches(row, theta, G, state, hyper, random_like(theta.shape, gen), sb, where)
    assert_dot_product(row, theta, G, state, hyper, gen, where)


def run_steps(row: Row, theta: Tensor, grads: Sequence[Tensor], state: dict[str, Any], hyper: dict[str, Any]
              ) -> tuple[Tensor, dict[str, Any]]:
    """Our steps over ``grads`` from ``(theta, state)``."""
    for G in grads:
        theta, state = row.impl.step(theta, G, state, hyper)
    return theta, state


__all__ = [
    "Cotangents", "Point", "assert_dot_product", "assert_matches_torch", "assert_vjp_matches", "autograd_vjp",
    "check_contract", "check_vjp", "dot_product_gap", "learned", "out_keys", "point", "run_against_torch",
    "run_steps", "state_next_bar",
]
