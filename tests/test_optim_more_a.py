# SPDX-License-Identifier: Apache-2.0
"""Adagrad, RMSprop, Adadelta, Adamax: what the generic table tests do not reach.

Finite differences through torch.optim's own steps (an oracle independent of our step
functions), the zero-accumulator limits where plain autograd gives NaN, both branches of
Adamax's maximum and its tie convention, Adagrad's eagerly built state, and the write-back
of the new hyperparameter names into ``param_groups``.
"""
from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
from torch import Tensor

from gimli_bptt import GimliUpdater
from gimli_bptt.optim import get_optimizer

from optim_cases import CASES, DTYPE, OptimCase, assert_rel, case_params, group_hyper, learn, random_like, tensor_keys
from problems import build_model, ce_loss, make_batches

TOL = 1e-10


def _autograd_vjp(impl, theta, G, state, hyper, tb, sb):
    """``(theta_bar, G_bar, state_bar, hyper_bar)`` by autograd through ``impl.step``."""
    leaf = lambda x: x.detach().clone().requires_grad_(True)  # noqa: E731
    theta, G = leaf(theta), leaf(G)
    state = {k: (leaf(v) if isinstance(v, Tensor) else v) for k, v in state.items()}
    hyper = {k: (leaf(v) if isinstance(v, Tensor) else v) for k, v in hyper.items()}
    tn, sn = impl.step(theta, G, state, hyper)
    out = (tn * tb).sum() + sum((sn[k] * v).sum() for k, v in sb.items())
    skeys = tensor_keys(state)
    hkeys = sorted(k for k, v in hyper.items() if isinstance(v, Tensor))
    inputs = [theta, G] + [state[k] for k in skeys] + [hyper[k] for k in hkeys]
    grads = torch.autograd.grad(out, inputs, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]
    n = 2 + len(skeys)
    return grads[0], grads[1], dict(zip(skeys, grads[2:n])), dict(zip(hkeys, grads[n:]))


# --------------------------------------------------------------------------------------------
# Hypergradients against central differences of torch.optim itself.
# --------------------------------------------------------------------------------------------

#: (class, kwargs with every learned value explicit, learned names). RMSprop's momentum is
#: learned at 0 (the buffer path that torch skips: Note [RMSprop learned momentum]).
_FD_ROWS = {
    "adagrad": (torch.optim.Adagrad, dict(lr=0.05, lr_decay=0.1, weight_decay=0.02, eps=1e-3,
                                          initial_accumulator_value=0.1), ("lr", "lr_decay", "weight_decay", "eps")),
    "rmsprop_centered": (torch.optim.RMSprop, dict(lr=0.01, alpha=0.9, eps=1e-3, weight_decay=0.02, momentum=0.0,
                                                   centered=True), ("lr", "alpha", "eps", "weight_decay", "momentum")),
    "adadelta": (torch.optim.Adadelta, dict(lr=0.5, rho=0.8, eps=1e-4, weight_decay=0.02),
                 ("lr", "rho", "eps", "weight_decay")),
    "adamax": (torch.optim.Adamax, dict(lr=0.01, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.02),
               ("lr", "beta1", "beta2", "eps", "weight_decay")),
}


def _with(kwargs: dict[str, Any], name: str, value: float) -> dict[str, Any]:
    kw = dict(kwargs)
    if name in ("beta1", "beta2"):
        betas = list(kw["betas"])
        betas[0 if name == "beta1" else 1] = value
        kw["betas"] = tuple(betas)
    else:
        kw[name] = value
    return kw


def _get(kwargs: dict[str, Any], name: str) -> float:
    return kwargs["betas"][0 if name == "beta1" else 1] if name in ("beta1", "beta2") else kwargs[name]


@pytest.mark.parametrize("row", list(_FD_ROWS))
def test_hypergradient_matches_finite_differences_of_torch_optim(row: str) -> None:
    cls, kwargs, learnable = _FD_ROWS[row]
    model = build_model("mlp", seed=5)
    batches, val = make_batches(3, seed=5)

    def torch_val_loss(kw: dict[str, Any]) -> float:
        m = copy.deepcopy(model)
        opt = cls(m.parameters(), foreach=False, **kw)
        for batch in batches:
            opt.zero_grad()
            ce_loss(m, batch).backward()
            opt.step()
        with torch.no_grad():
            return float(ce_loss(m, val))

    m = copy.deepcopy(model)
    updater = GimliUpdater(m, cls(m.parameters(), **kwargs), ce_loss, ce_loss, unroll=3,
                           learn={n: "group" for n in learnable})
    ours = updater.hypergradient(batches, val).hypergrads
    for name in learnable:
        base = _get(kwargs, name)
        h = 1e-6 * max(abs(base), 1e-2)
        if base == 0.0:  # torch rejects a negative value: one-sided, second order
            f0, f1, f2 = (torch_val_loss(_with(kwargs, name, k * h)) for k in (0, 1, 2))
            fd = (-3 * f0 + 4 * f1 - f2) / (2 * h)
        else:
            up, down = (torch_val_loss(_with(kwargs, name, base + k * h)) for k in (1, -1))
            fd = (up - down) / (2 * h)
        got = float(ours[name][0])
        assert abs(got - fd) <= 1e-5 * max(abs(fd), 1e-3), (name, got, fd)


def test_meta_step_writes_the_new_names_back() -> None:
    """lr_decay, alpha, rho and Adamax's betas, learned per group, land in ``param_groups``."""
    batches, val = make_batches(2, seed=6)
    for cls, kwargs, names in _FD_ROWS.values():
        model = build_model("mlp", seed=6)
        opt = cls(model.parameters(), **kwargs)
        up = GimliUpdater(model, opt, ce_loss, ce_loss, unroll=2, learn={n: "group" for n in names},
                          meta_opt=functools.partial(torch.optim.SGD, lr=1e-4))
        up.step(batches, val)
        for name in names:
            learned = float(up.hyper.values[name][0].detach())
            assert _get(opt.param_groups[0], name) == learned, (cls.__name__, name)
            assert learned != _get(kwargs, name) or name == "momentum", (cls.__name__, name)


# --------------------------------------------------------------------------------------------
# A zero accumulator: Adagrad and RMSprop where every gradient so far is exactly 0.
# --------------------------------------------------------------------------------------------

_ZERO_CASES = ["adagrad-default", "adagrad-lr_decay-wd", "rmsprop-default", "rmsprop-centered",
               "rmsprop-momentum-wd", "rmsprop-centered-momentum-wd-maximize"]


def _torch_differentiable_G_bar(case: OptimCase, theta: Tensor, G: Tensor, state: dict[str, Any], tb: Tensor) -> Tensor:
    G = G.clone().requires_grad_(True)
    p = theta.clone().requires_grad_(True).clone()  # not a leaf: torch updates it in place
    p.grad = G
    kwargs = {k: v for k, v in case.kwargs.items() if k != "weight_decay"}
    opt = case.torch_cls([p], differentiable=True, **kwargs)
    opt.state[p] = case.impl.export_state(state, theta)
    opt.step()
    return torch.autograd.grad((p * tb).sum(), G)[0]


@pytest.mark.parametrize("case", case_params([c for c in CASES if c.id in _ZERO_CASES]))
def test_zero_accumulator(case: OptimCase) -> None:
    """At the first step from a zero state, an element with G = 0 has a zero accumulator.

    The true derivative there is finite: theta' = theta - eta g / (c |g| + eps) (c = 1 for
    Adagrad, sqrt(1 - alpha) or sqrt(alpha (1 - alpha)) centered for RMSprop, the momentum
    buffer being g / a at the first step), so dtheta'/dg = -eta / eps at g = 0. Plain autograd
    (torch's ``differentiable=True`` step) gives NaN; the VJP gives the limit, and equals
    autograd through our step (finite through ``_sqrt``).
    """
    gen = torch.Generator().manual_seed(21)
    impl = case.impl
    hyper_f = dict(group_hyper(case), weight_decay=0.0, initial_accumulator_value=0.0)
    shape, z = (6,), 2
    zero = torch.arange(6) == z
    theta = random_like(shape, gen)
    theta[z] = 0.0  # theta'[z] is then the update alone, so the finite difference loses no digits
    state = impl.import_state({}, theta, hyper_f)
    G = torch.where(zero, 0.0, random_like(shape, gen))
    tb = random_like(shape, gen)

    plain = _torch_differentiable_G_bar(case, theta, G, state, tb)
    assert torch.isnan(plain[z]), "autograd through sqrt at 0 should give NaN"
    assert torch.isfinite(plain[~zero]).all()

    hyper = learn(hyper_f, impl.hyper_names, "element", theta)
    theta_bar, G_bar, state_bar, hyper_bar = impl.step_vjp(theta, G, state, hyper, tb, {})
    for x in [theta_bar, G_bar, *state_bar.values(), *hyper_bar.values()]:
        assert torch.isfinite(x).all()
    sign = -1.0 if hyper_f["maximize"] else 1.0
    expected = sign * -hyper_f["lr"] / hyper_f["eps"] * tb[z].item()
    assert abs(G_bar[z].item() - expected) <= 1e-12 * abs(expected)
    # Off z the accumulator is g^2-dominated, g / (c|g| + eps) nearly flat: the numerator and
    # denominator paths of G_bar nearly cancel, and torch sums them in another order. Each path
    # is about eta |tb| / a: both sides are accurate relative to that (as in _adam_m_path).
    sn = impl.step(theta, G, state, hyper_f)[1]
    w = sn["sum"] if "sum" in sn else sn["square_avg"] - sn.get("grad_avg", torch.zeros(()))**2
    path = (hyper_f["lr"] * tb.abs() / (w.sqrt() + hyper_f["eps"]))[~zero].max().item()
    assert_rel(G_bar[~zero], plain[~zero], TOL, "G_bar off the zero element, against torch.optim", path)

    sb = {k: random_like(shape, gen) for k in tensor_keys(impl.step(theta, G, state, hyper)[1])}
    ours = impl.step_vjp(theta, G, state, hyper, tb, sb)
    ref = _autograd_vjp(impl, theta, G, state, hyper, tb, sb)
    assert_rel(ours[0], ref[0], TOL, "theta_bar")
    assert_rel(ours[1], ref[1], TOL, "G_bar")
    for k, r in ref[2].items():
        assert_rel(ours[2].get(k, torch.zeros_like(r)), r, TOL, f"state_bar[{k!r}]")
    for n, r in ref[3].items():
        assert_rel(ours[3][n], r, TOL, f"hyper_bar[{n!r}]")

    e_z = zero.to(DTYPE)
    h = 1e-12 * hyper_f["eps"]  # far below eps: the O(h/eps) curvature error is 1e-12 relative

    def local(dG: float) -> float:
        tn, sn = impl.step(theta, G + dG * e_z, state, hyper)
        return (tb[z] * tn[z]).item() + sum((sb[k][z] * sn[k][z]).item() for k in sb)

    fd = (local(h) - local(-h)) / (2 * h)
    assert abs(ours[1][z].item() - fd) <= 1e-10 * abs(fd)


# --------------------------------------------------------------------------------------------
# Adamax's maximum: both branches away from ties, and the tie convention.
# --------------------------------------------------------------------------------------------

_ADAMAX = [c for c in CASES if c.torch_cls is torch.optim.Adamax]


def _adamax_point(case: OptimCase, gen: torch.Generator, ratio: Tensor, b2: float | None = None):
    """A point after 3 steps whose old infinity norm is set so that b2 u = ratio (|g| + eps)."""
    impl = case.impl
    hyper = group_hyper(case)
    if b2 is not None:
        hyper["beta2"] = b2
    theta = random_like((8,), gen)
    state = impl.import_state({}, theta, hyper)
    for _ in range(3):
        theta, state = impl.step(theta, random_like((8,), gen), state, hyper)
    G = random_like((8,), gen)
    g = -G if hyper["maximize"] else G
    if hyper["weight_decay"]:
        g = g + hyper["weight_decay"] * theta
    state["exp_inf"] = ratio * (g.abs() + hyper["eps"]) / hyper["beta2"]
    return theta, G, state, hyper


@pytest.mark.parametrize("case", case_params(_ADAMAX))
def test_adamax_both_branches(case: OptimCase) -> None:
    """Where |g| + eps wins, the old norm gets no cotangent; where b2 u wins, neither eps nor g
    (through |g|) does. Away from ties both agree with autograd."""
    gen = torch.Generator().manual_seed(22)
    old_wins = torch.arange(8) % 2 == 0
    theta, G, state, hyper = _adamax_point(case, gen, torch.where(old_wins, 1.5, 0.5).to(DTYPE))
    impl = case.impl
    hyper = learn(hyper, impl.hyper_names, "element", theta)
    tb = random_like((8,), gen)
    sb = {k: random_like((8,), gen) for k in ("exp_avg", "exp_inf")}
    ours = impl.step_vjp(theta, G, state, hyper, tb, sb)
    assert (ours[2]["exp_inf"][~old_wins] == 0).all()
    assert (ours[3]["eps"][old_wins] == 0).all()
    assert (ours[2]["exp_inf"][old_wins] != 0).all() and (ours[3]["eps"][~old_wins] != 0).all()
    ref = _autograd_vjp(impl, theta, G, state, hyper, tb, sb)
    for a, b, what in [(ours[0], ref[0], "theta_bar"), (ours[1], ref[1], "G_bar")]:
        assert_rel(a, b, TOL, what)
    for k in ref[2]:
        assert_rel(ours[2][k], ref[2][k], TOL, f"state_bar[{k!r}]")
    for n in ref[3]:
        assert_rel(ours[3][n], ref[3][n], TOL, f"hyper_bar[{n!r}]")


def test_adamax_tie() -> None:
    """At b2 u = |g| + eps exactly (b2 = 0.5: u = 2 (|g| + eps) is exact), the VJP gives the
    cotangent of u' wholly to |g| + eps (Note [Adamax maximum]); autograd's maximum splits it
    in halves. The total reaching the two sides is the same."""
    case = next(c for c in _ADAMAX if c.id == "adamax-default")
    gen = torch.Generator().manual_seed(23)
    theta, G, state, hyper = _adamax_point(case, gen, torch.ones(8, dtype=DTYPE), b2=0.5)
    g = G
    assert torch.equal(state["exp_inf"] * 0.5, g.abs() + hyper["eps"]), "not a tie"
    impl = case.impl
    hyper = learn(hyper, ("eps",), "element", theta)
    tb = random_like((8,), gen)
    sb = {k: random_like((8,), gen) for k in ("exp_avg", "exp_inf")}
    ours = impl.step_vjp(theta, G, state, hyper, tb, sb)
    ref = _autograd_vjp(impl, theta, G, state, hyper, tb, sb)
    assert (ours[2]["exp_inf"] == 0).all()
    assert_rel(ours[3]["eps"], 2 * ref[3]["eps"], TOL, "eps_bar: all versus half")
    assert_rel(ours[3]["eps"] + ours[2]["exp_inf"] / 0.5, ref[3]["eps"] + ref[2]["exp_inf"] / 0.5, TOL,
               "total cotangent of the two sides of the maximum")
    assert_rel(ours[0], ref[0], TOL, "theta_bar")


# --------------------------------------------------------------------------------------------
# Adagrad's state: built with the optimizer, from the constructor's initial_accumulator_value.
# --------------------------------------------------------------------------------------------


def test_adagrad_eager_state_and_initial_accumulator() -> None:
    """torch.optim.Adagrad fills ``state["sum"]`` when built; importing it equals importing an
    empty state with the group's ``initial_accumulator_value`` (Note [Adagrad's initial
    accumulator]), and ``lr_decay`` gets a zero cotangent at the first step, where it has no
    effect, and a nonzero one after."""
    p = torch.nn.Parameter(torch.randn(5, dtype=DTYPE))
    opt = torch.optim.Adagrad([p], lr=0.1, lr_decay=0.3, initial_accumulator_value=0.25)
    impl = get_optimizer(opt)
    hyper = impl.read_hyper(opt.param_groups[0])
    assert "initial_accumulator_value" not in impl.hyper_names
    eager = impl.import_state(opt.state[p], p, hyper)
    fresh = impl.import_state({}, p, hyper)
    assert eager["step"] == fresh["step"] == 0.0
    assert torch.equal(eager["sum"], fresh["sum"]) and float(fresh["sum"][0]) == 0.25
    gen = torch.Generator().manual_seed(24)
    h = learn(hyper, ("lr_decay",), "0d", p.detach())
    theta, state = p.detach(), fresh
    for t in (1, 2):
        G, tb = random_like((5,), gen), random_like((5,), gen)
        bar = impl.step_vjp(theta, G, state, h, tb, {})[3]["lr_decay"]
        assert (float(bar) == 0.0) == (t == 1)
        theta, state = impl.step(theta, G, state, h)
