# SPDX-License-Identifier: Apache-2.0
"""Oracle 2: each optimizer's hand-written ``step_vjp`` against autograd, and the dot-product test."""
from __future__ import annotations

from typing import Any, Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from optim_cases import (
    CASES,
    DTYPE,
    OptimCase,
    assert_rel,
    case_params,
    group_hyper,
    learn,
    random_like,
    tensor_keys,
)

TOL = 1e-10
SHAPES = [(), (7,), (2, 3)]
PHASES = ("first_step", "after_3_steps")
#: torch.func.jvp goes through torch.jit.script inside torch, which warns that it is deprecated.
_JIT_WARNING = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


# --------------------------------------------------------------------------------------------
# Points, and the references.
# --------------------------------------------------------------------------------------------


def _point(case: OptimCase, shape: Sequence[int], phase: str, gen: torch.Generator, group: int = 0,
           hyper: dict[str, Any] | None = None) -> tuple[Tensor, Tensor, dict[str, Any], dict[str, Any]]:
    """``(theta, G, state, hyper)`` at the first step (SGD's buffer None, Adam's step 0) or after
    3 steps (buffers and moments exist). amsgrad's running maximum is moved away from ties
    (``v' != vmax`` everywhere, each side on some elements): the maximum has no derivative there."""
    impl = case.impl
    hyper = group_hyper(case, group) if hyper is None else hyper
    theta = random_like(shape, gen)
    state = impl.import_state({}, theta, hyper)
    if phase == "after_3_steps":
        for _ in range(3):
            theta, state = impl.step(theta, random_like(shape, gen), state, hyper)
    G = random_like(shape, gen)
    if hyper.get("amsgrad") and phase == "after_3_steps":
        v_next = impl.step(theta, G, state, hyper)[1]["exp_avg_sq"]
        side = torch.arange(v_next.numel()).reshape(v_next.shape) % 2 == 0
        state["max_exp_avg_sq"] = torch.where(side, 0.5 * v_next, 2.0 * v_next)
    return theta, G, state, hyper


def _learned(hyper: dict[str, Any]) -> list[str]:
    return sorted(n for n, v in hyper.items() if isinstance(v, Tensor))


def _out_keys(case: OptimCase, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any]) -> list[str]:
    """The differentiable entries of the next state."""
    return tensor_keys(case.impl.step(theta, G, state, hyper)[1])


def _state_next_bar(case: OptimCase, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                    gen: torch.Generator, keys: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Random cotangents for the differentiable entries of the next state, each shaped like its
    entry (a scalar entry, NAdam's mu_product or ASGD's eta, is 0-d beside an n-d parameter)."""
    state_next = case.impl.step(theta, G, state, hyper)[1]
    keys = tensor_keys(state_next) if keys is None else keys
    return {k: random_like(state_next[k].shape, gen) for k in keys}


def _autograd_vjp(case: OptimCase, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                  theta_next_bar: Tensor, state_next_bar: dict[str, Tensor]):
    """``(theta_bar, G_bar, state_bar, hyper_bar)`` by ``torch.autograd.grad`` through ``step``."""
    theta = theta.detach().clone().requires_grad_(True)
    G = G.detach().clone().requires_grad_(True)
    state = {k: (v.detach().clone().requires_grad_(True) if isinstance(v, Tensor) else v) for k, v in state.items()}
    hyper = {k: (v.detach().clone().requires_grad_(True) if isinstance(v, Tensor) else v) for k, v in hyper.items()}
    theta_next, state_next = case.impl.step(theta, G, state, hyper)
    out = (theta_next * theta_next_bar).sum()
    for k, bar in state_next_bar.items():
        out = out + (state_next[k] * bar).sum()
    skeys, hkeys = tensor_keys(state), _learned(hyper)
    inputs = [theta, G] + [state[k] for k in skeys] + [hyper[n] for n in hkeys]
    grads = torch.autograd.grad(out, inputs, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]
    n = 2 + len(skeys)
    return grads[0], grads[1], dict(zip(skeys, grads[2:n])), dict(zip(hkeys, grads[n:]))


def _check_contract(theta, G, state, hyper, theta_bar, G_bar, state_bar, hyper_bar) -> None:
    """Shapes and keys: one cotangent per tensor input, none for the fixed floats."""
    assert theta_bar.shape == theta.shape and G_bar.shape == G.shape
    assert set(state_bar) <= set(tensor_keys(state)), (sorted(state_bar), tensor_keys(state))
    for k, v in state_bar.items():
        assert v.shape == state[k].shape, k
    assert sorted(hyper_bar) == _learned(hyper), "hyper_bar needs one entry per tensor hyperparameter"
    for n, v in hyper_bar.items():
        assert v.shape == hyper[n].shape, (n, v.shape, hyper[n].shape)


def _adam_m_path(case: OptimCase, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                 theta_next_bar: Tensor) -> Tensor:
    """|theta_next_bar| (1 - b1) lr / (c1 d): the size of the m' path of Adam's G cotangent.

    At the first step sqrt(v')/c2 = |g|, so theta' = theta - lr sign(g) |g| / (|g| + eps): the m'
    and v' paths of dtheta'/dg nearly cancel, leaving lr eps / (|g| + eps)^2. autograd and the
    hand-written VJP both subtract the two paths, so both are only accurate relative to them.
    """
    sn = case.impl.step(theta, G, state, hyper)[1]
    b1, b2, lr, eps, t = hyper["beta1"], hyper["beta2"], hyper["lr"], hyper["eps"], sn["step"]
    v_hat = sn.get("max_exp_avg_sq", sn["exp_avg_sq"])
    denom = v_hat.sqrt() / (1 - b2**t) ** 0.5 + eps
    return (theta_next_bar.abs() * (1 - b1) * lr / (1 - b1**t) / denom).detach()


# --- Adagrad, RMSprop, Adamax (issue 3, part a) ---
def _linear_g_path(case: OptimCase, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                   theta_next_bar: Tensor) -> Tensor | None:
    """|theta_next_bar| |d theta'/dg| along the numerator alone, for Adagrad and RMSprop
    (g / (sqrt(accumulator) + eps)) and Adamax (m' / max(b2 u, |g| + eps)); None for the others.

    Where the accumulator is dominated by g^2 (the first step from a zero state above all),
    g / (c |g| + eps) is nearly flat in g: the numerator and denominator paths of G_bar nearly
    cancel (as Adam's, see :func:`_adam_m_path`), and both sides are accurate only relative to
    either path.
    """
    cls = case.torch_cls
    if cls not in (torch.optim.Adagrad, torch.optim.RMSprop, torch.optim.Adamax):
        return None
    with torch.no_grad():
        sn = case.impl.step(theta, G, state, hyper)[1]
        lr, eps = hyper["lr"], hyper["eps"]
        if cls is torch.optim.Adagrad:
            path = lr / (1 + (sn["step"] - 1) * hyper["lr_decay"]) / (sn["sum"].sqrt() + eps)
        elif cls is torch.optim.RMSprop:
            w = sn["square_avg"] - (sn["grad_avg"] ** 2 if hyper["centered"] else 0)
            path = lr / (w.clamp(min=0).sqrt() + eps)
        else:
            path = lr / (1 - hyper["beta1"] ** sn["step"]) * (1 - hyper["beta1"]) / sn["exp_inf"]
        return (theta_next_bar.abs() * path).detach()
# --- end of issue 3, part a ---


def _nadam_g_path(case: OptimCase, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                  theta_next_bar: Tensor) -> Tensor:
    """|theta_next_bar| (|c_g| + (1 - b1) |c_m|) / d: the size of NAdam's first-order paths of G_bar.

    As for Adam (:func:`_adam_m_path`), at the first step they nearly cancel against the v' path."""
    sn = case.impl.step(theta, G, state, hyper)[1]
    b1, b2, lr, eps, md, t = (hyper["beta1"], hyper["beta2"], hyper["lr"], hyper["eps"], hyper["momentum_decay"],
                              sn["step"])
    mu, mu_n = b1 * (1 - 0.5 * 0.96 ** (t * md)), b1 * (1 - 0.5 * 0.96 ** ((t + 1) * md))
    p1 = sn["mu_product"]
    denom = (sn["exp_avg_sq"] / (1 - b2**t)).sqrt() + eps
    c_g, c_m = lr * (1 - mu) / (1 - p1), lr * mu_n / (1 - p1 * mu_n)
    return (theta_next_bar.abs() * (abs(c_g) + (1 - b1) * abs(c_m)) / denom).detach()


def _assert_vjp_matches(case, theta, G, state, hyper, theta_next_bar, state_next_bar, where: str) -> None:
    ours = case.impl.step_vjp(theta, G, state, hyper, theta_next_bar, state_next_bar)
    _check_contract(theta, G, state, hyper, *ours)
    ref = _autograd_vjp(case, theta, G, state, hyper, theta_next_bar, state_next_bar)
    theta_bar, G_bar, state_bar, hyper_bar = ours
    floor = {}
    if case.is_adam or case.torch_cls is torch.optim.NAdam:
        path = _adam_m_path if case.is_adam else _nadam_g_path
        m_path = path(case, theta, G, state, hyper, theta_next_bar)
        floor["G"] = m_path.max().item()
        if not hyper["decoupled_weight_decay"]:  # weight_decay_bar = <theta, g_bar>
            floor["weight_decay"] = (theta.abs() * m_path).sum().item()
    g_path = _linear_g_path(case, theta, G, state, hyper, theta_next_bar)  # issue 3, part a
    if g_path is not None:
        floor["G"] = g_path.max().item()
        floor["weight_decay"] = (theta.abs() * g_path).sum().item()
    assert_rel(theta_bar, ref[0], TOL, f"{where}: theta_bar")
    assert_rel(G_bar, ref[1], TOL, f"{where}: G_bar", floor.get("G", 0.0))
    for k, r in ref[2].items():  # a missing entry is zero
        assert_rel(state_bar.get(k, torch.zeros_like(r)), r, TOL, f"{where}: state_bar[{k!r}]")
    for n, r in ref[3].items():
        assert_rel(hyper_bar[n], r, TOL, f"{where}: hyper_bar[{n!r}]", floor.get(n, 0.0))


# --------------------------------------------------------------------------------------------
# step_vjp against autograd.
# --------------------------------------------------------------------------------------------


def _learn_sets(case: OptimCase) -> list[Any]:
    names = case.impl.hyper_names
    return [pytest.param(case, (n,), id=f"{case.id}-learn_{n}") for n in names] + [
        pytest.param(case, names, id=f"{case.id}-learn_all")]


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("granularity", ["0d", "element"])
@pytest.mark.parametrize("case,learned", [p for c in CASES for p in _learn_sets(c)])
def test_vjp_matches_autograd(case: OptimCase, learned: tuple[str, ...], granularity: str, phase: str) -> None:
    """Random cotangents for theta' and every differentiable state entry; both param groups."""
    gen = torch.Generator().manual_seed(10)
    for group in (0, 1):
        for shape in SHAPES:
            theta, G, state, hyper = _point(case, shape, phase, gen, group)
            hyper = learn(hyper, learned, granularity, theta)
            state_next_bar = _state_next_bar(case, theta, G, state, hyper, gen)
            _assert_vjp_matches(case, theta, G, state, hyper, random_like(shape, gen), state_next_bar,
                                f"group {group}, shape {shape}")


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("case", case_params())
def test_vjp_fixed_hyper_and_empty_state_bar(case: OptimCase, phase: str) -> None:
    """Float hyperparameters (no ``hyper_bar``), and ``state_next_bar`` empty or partial (missing
    keys are zero), as at the last step of the reverse sweep."""
    gen = torch.Generator().manual_seed(11)
    for shape in SHAPES:
        theta, G, state, hyper = _point(case, shape, phase, gen)
        keys = _out_keys(case, theta, G, state, hyper)
        for subset in [[], keys[:1], keys[1:]]:
            bar = _state_next_bar(case, theta, G, state, hyper, gen, subset)
            _assert_vjp_matches(case, theta, G, state, hyper, random_like(shape, gen), bar,
                                f"shape {shape}, state_next_bar keys {subset}")


@pytest.mark.parametrize("case", case_params())
def test_vjp_is_pure(case: OptimCase) -> None:
    """``step_vjp`` changes none of its inputs (the sweep reuses the cotangents)."""
    gen = torch.Generator().manual_seed(12)
    theta, G, state, hyper = _point(case, (3, 4), "after_3_steps", gen)
    hyper = learn(hyper, case.impl.hyper_names, "element", theta)
    tb = random_like((3, 4), gen)
    sb = _state_next_bar(case, theta, G, state, hyper, gen)
    inputs = [theta, G, tb] + [state[k] for k in tensor_keys(state)] + list(sb.values()) + [
        hyper[n] for n in _learned(hyper)]
    before = [x.clone() for x in inputs]
    case.impl.step_vjp(theta, G, state, hyper, tb, sb)
    assert all(torch.equal(a, b) for a, b in zip(before, inputs))


# --------------------------------------------------------------------------------------------
# The dot-product test: <u, J v> (forward mode through step) = <J^T u, v> (step_vjp).
# --------------------------------------------------------------------------------------------


def _dot_product_gap(case: OptimCase, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                     gen: torch.Generator) -> tuple[float, float, float]:
    """``(<u, J v>, <J^T u, v>, scale)`` for random directions v and cotangents u."""
    impl = case.impl
    skeys, hkeys = tensor_keys(state), _learned(hyper)
    out_keys = _out_keys(case, theta, G, state, hyper)

    def f(theta: Tensor, G: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
        s = dict(state, **dict(zip(skeys, rest[: len(skeys)])))
        h = dict(hyper, **dict(zip(hkeys, rest[len(skeys):])))
        theta_next, state_next = impl.step(theta, G, s, h)
        return (theta_next, *[state_next[k] for k in out_keys])

    primals = (theta, G, *[state[k] for k in skeys], *[hyper[n] for n in hkeys])
    v = tuple(torch.randn(p.shape, generator=gen, dtype=DTYPE) for p in primals)
    outputs, Jv = torch.func.jvp(f, primals, v)
    u = [torch.randn(o.shape, generator=gen, dtype=DTYPE) for o in outputs]
    lhs_terms = [(a * b).sum() for a, b in zip(u, Jv)]

    theta_bar, G_bar, state_bar, hyper_bar = impl.step_vjp(theta, G, state, hyper, u[0], dict(zip(out_keys, u[1:])))
    bars = [theta_bar, G_bar] + [state_bar.get(k, torch.zeros_like(state[k])) for k in skeys] + [
        hyper_bar[n] for n in hkeys]
    rhs_terms = [(a * b).sum() for a, b in zip(bars, v)]
    scale = sum((a.abs() * b.abs()).sum().item() for a, b in zip(u, Jv)) + sum(
        (a.abs() * b.abs()).sum().item() for a, b in zip(bars, v))
    return sum(lhs_terms).item(), sum(rhs_terms).item(), scale


@_JIT_WARNING
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("granularity", ["float", "0d", "element"])
@pytest.mark.parametrize("case", case_params())
def test_dot_product(case: OptimCase, granularity: str, phase: str) -> None:
    gen = torch.Generator().manual_seed(13)
    for shape in SHAPES:
        for _ in range(2):
            theta, G, state, hyper = _point(case, shape, phase, gen)
            hyper = learn(hyper, case.impl.hyper_names, granularity, theta)
            lhs, rhs, scale = _dot_product_gap(case, theta, G, state, hyper, gen)
            assert abs(lhs - rhs) <= TOL * scale, f"shape {shape}: <u, Jv> = {lhs!r}, <J^T u, v> = {rhs!r}"


# --------------------------------------------------------------------------------------------
# Adam at an exactly zero gradient: autograd gives NaN, the hand-written VJP the limit.
# --------------------------------------------------------------------------------------------


def _torch_autograd_G_bar(case: OptimCase, theta: Tensor, G: Tensor, state: dict[str, Any],
                          hyper: dict[str, Any], theta_next_bar: Tensor) -> Tensor:
    """The G cotangent by autograd through ``torch.optim``'s own ``differentiable=True`` step."""
    G = G.clone().requires_grad_(True)
    p = theta.clone().requires_grad_(True).clone()  # not a leaf: torch updates it in place
    p.grad = G
    opt = case.torch_cls([p], lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]), eps=hyper["eps"],
                         weight_decay=hyper["weight_decay"], amsgrad=hyper["amsgrad"],
                         maximize=hyper["maximize"], differentiable=True)
    opt.state[p] = case.impl.export_state(state, theta)
    opt.step()
    return torch.autograd.grad((p * theta_next_bar).sum(), G)[0]


_ZERO_GRAD_CASES = ("adam-default", "adam-amsgrad", "adamw-default", "adamw-amsgrad", "adam-betas-eps",
                    "adamw-maximize")


@pytest.mark.parametrize("steps_of_zero", [1, 3], ids=["zero_at_step_1", "zero_at_steps_1_to_3"])
@pytest.mark.parametrize("case", case_params([c for c in CASES if c.id in _ZERO_GRAD_CASES]))
def test_adam_zero_gradient(case: OptimCase, steps_of_zero: int) -> None:
    """Where every gradient so far is exactly 0, v' = 0 and d(sqrt v')/dv' is infinite.

    The true derivative is finite: theta' = theta - a m'/(sqrt(v')/c2 + eps) with m' linear
    and sqrt(v') = O(|g|), so dtheta'/dg = -a (1 - b1)/eps at g = 0 (only the m' path is first
    order). Plain autograd multiplies the infinite sqrt derivative by the zero cotangent d_bar
    (m' = 0) and returns NaN (shown with ``torch.optim.Adam(differentiable=True)``): that is why
    the hand-written VJP is needed. (``adam_step`` itself uses a sqrt whose derivative at 0 is
    taken as 0, so autograd through it gives the same finite values as the VJP.)
    """
    gen = torch.Generator().manual_seed(14)
    impl = case.impl
    hyper_f = dict(group_hyper(case), weight_decay=0.0)
    b1, lr, eps = hyper_f["beta1"], hyper_f["lr"], hyper_f["eps"]
    shape, z = (6,), 2
    zero = torch.arange(6) == z
    theta = random_like(shape, gen)
    theta[z] = 0.0  # theta'[z] is then the update alone, so the finite difference loses no digits
    state = impl.import_state({}, theta, hyper_f)
    for _ in range(steps_of_zero - 1):
        theta, state = impl.step(theta, torch.where(zero, 0.0, random_like(shape, gen)), state, hyper_f)
    assert float(theta[z]) == 0.0 and float(state["exp_avg_sq"][z]) == 0.0
    G = torch.where(zero, 0.0, random_like(shape, gen))
    t = steps_of_zero
    hyper = learn(hyper_f, impl.hyper_names, "element", theta)  # per element: a NaN stays where it arises
    tb = random_like(shape, gen)

    # Plain autograd: NaN at z, finite elsewhere.
    plain = _torch_autograd_G_bar(case, theta, G, state, hyper_f, tb)
    assert torch.isnan(plain[z]), "autograd through sqrt(v') at v' = 0 should give NaN"
    assert torch.isfinite(plain[~zero]).all()

    # With no state cotangent: the analytic limit -lr/c1 * (1 - b1)/eps * theta_next_bar.
    theta_bar, G_bar, state_bar, hyper_bar = impl.step_vjp(theta, G, state, hyper, tb, {})
    for x in [theta_bar, G_bar, *state_bar.values(), *hyper_bar.values()]:
        assert torch.isfinite(x).all()
    sign = -1.0 if hyper_f["maximize"] else 1.0
    expected = sign * -lr / (1 - b1**t) * (1 - b1) / eps * tb[z].item()
    assert abs(G_bar[z].item() - expected) <= 1e-12 * abs(expected)
    assert theta_bar[z].item() == tb[z].item()
    assert_rel(G_bar[~zero], plain[~zero], TOL, "G_bar off the zero element, against torch.optim",
               _adam_m_path(case, theta, G, state, hyper, tb).max().item())

    # With cotangents on every state entry: finite differences in G[z] and theta[z].
    sb = {k: random_like(shape, gen) for k in _out_keys(case, theta, G, state, hyper)}
    theta_bar, G_bar, state_bar, hyper_bar = impl.step_vjp(theta, G, state, hyper, tb, sb)
    for x in [theta_bar, G_bar, *state_bar.values(), *hyper_bar.values()]:
        assert torch.isfinite(x).all()
    e_z = zero.to(DTYPE)  # a float64 unit vector (a bool mask times 1e-20 would be float32)

    def local(dtheta: float, dG: float) -> float:
        """<cotangents, outputs> at element z only (the others would swamp the difference)."""
        tn, sn = impl.step(theta + dtheta * e_z, G + dG * e_z, state, hyper)
        return (tb[z] * tn[z]).item() + sum((sb[k][z] * sn[k][z]).item() for k in sb)

    h = 1e-20  # far below eps: the O(h/eps) curvature error is 1e-12 relative
    fd_G = (local(0.0, h) - local(0.0, -h)) / (2 * h)
    assert abs(G_bar[z].item() - fd_G) <= 1e-10 * abs(fd_G)
    h = 1e-6  # theta' is affine in theta[z] here (no weight decay)
    fd_theta = (local(h, 0.0) - local(-h, 0.0)) / (2 * h)
    assert abs(theta_bar[z].item() - fd_theta) <= 1e-8 * abs(fd_theta)

    # autograd through adam_step (finite at z through its sqrt) agrees, but for amsgrad's tie.
    if not hyper["amsgrad"]:
        _assert_vjp_matches(case, theta, G, state, hyper, tb, sb, "zero gradient element")
        return
    # amsgrad: at z, v' = vmax = 0 is a tie. autograd's maximum splits the cotangent in halves,
    # the VJP gives it all to v' (Note [amsgrad]); the total reaching the two is the same.
    ref = _autograd_vjp(case, theta, G, state, hyper, tb, sb)
    assert_rel(theta_bar, ref[0], TOL, "theta_bar")
    assert_rel(G_bar, ref[1], TOL, "G_bar", _adam_m_path(case, theta, G, state, hyper, tb).max().item())
    for n, r in ref[3].items():
        assert_rel(hyper_bar[n], r, TOL, f"hyper_bar[{n!r}]")
    for k, r in ref[2].items():
        assert_rel(state_bar[k][~zero], r[~zero], TOL, f"state_bar[{k!r}] off the tie")
    b2 = hyper_f["beta2"]
    ours = state_bar["exp_avg_sq"][z] / b2 + state_bar["max_exp_avg_sq"][z]
    theirs = ref[2]["exp_avg_sq"][z] / b2 + ref[2]["max_exp_avg_sq"][z]
    assert_rel(ours, theirs, TOL, "total cotangent of v' and vmax at the tie")
    assert state_bar["max_exp_avg_sq"][z] == 0


# --------------------------------------------------------------------------------------------
# amsgrad's two branches, explicitly.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", case_params([c for c in CASES if c.kwargs.get("amsgrad")]))
def test_amsgrad_both_branches(case: OptimCase) -> None:
    """The cotangent of max(vmax, v') goes to v' where v' > vmax and to vmax where v' < vmax."""
    gen = torch.Generator().manual_seed(15)
    theta, G, state, hyper = _point(case, (8,), "after_3_steps", gen)
    v_next = case.impl.step(theta, G, state, hyper)[1]["exp_avg_sq"]
    new = v_next > state["max_exp_avg_sq"]
    assert new.any() and (~new).any()
    assert ((v_next - state["max_exp_avg_sq"]).abs() > 1e-3 * v_next).all()
    hyper = learn(hyper, case.impl.hyper_names, "element", theta)
    tb = random_like((8,), gen)
    sb = {k: random_like((8,), gen) for k in _out_keys(case, theta, G, state, hyper)}
    _, _, state_bar, _ = case.impl.step_vjp(theta, G, state, hyper, tb, sb)
    b2 = hyper["beta2"]
    # Where v' wins, the running maximum is v' (no cotangent to the old maximum) ...
    assert (state_bar["max_exp_avg_sq"][new] == 0).all()
    # ... and where the old maximum wins, v' reaches the output only through exp_avg_sq.
    assert torch.equal(state_bar["exp_avg_sq"][~new], (b2 * sb["exp_avg_sq"])[~new])
    _assert_vjp_matches(case, theta, G, state, hyper, tb, sb, "amsgrad")


# --------------------------------------------------------------------------------------------
# Random hyperparameters.
# --------------------------------------------------------------------------------------------


@st.composite
def _random_point(draw: st.DrawFn):
    family = draw(st.sampled_from(["SGD", "Adam", "AdamW"]))
    # Not a tiny positive beta: autograd's lerp then gets 1 - (1 - b1) = 1.1e-16 for b1 = 6e-17.
    unit = st.just(0.0) | st.floats(1e-3, 0.95)
    if family == "SGD":
        nesterov = draw(st.booleans())
        hyper = dict(lr=draw(st.floats(1e-3, 0.5)), momentum=draw(st.floats(0.05, 0.95) if nesterov else unit),
                     dampening=0.0 if nesterov else draw(unit), weight_decay=draw(st.floats(0.0, 0.5)),
                     nesterov=nesterov, maximize=draw(st.booleans()))
        case = next(c for c in CASES if c.torch_cls is torch.optim.SGD)
    else:
        hyper = dict(lr=draw(st.floats(1e-4, 0.3)), beta1=draw(unit), beta2=draw(st.floats(0.0, 0.999)),
                     eps=draw(st.floats(1e-6, 1e-1)), weight_decay=draw(st.floats(0.0, 0.5)),
                     amsgrad=draw(st.booleans()), maximize=draw(st.booleans()),
                     decoupled_weight_decay=family == "AdamW")
        case = next(c for c in CASES if c.torch_cls.__name__ == family)
    shape = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2).map(tuple))
    return case, hyper, shape


@_JIT_WARNING
@settings(deadline=None)
@given(point=_random_point(), phase=st.sampled_from(PHASES), granularity=st.sampled_from(["0d", "element"]),
       seed=st.integers(0, 2**16))
def test_vjp_matches_autograd_random(point, phase: str, granularity: str, seed: int) -> None:
    case, hyper, shape = point
    gen = torch.Generator().manual_seed(seed)
    theta, G, state, hyper = _point(case, shape, phase, gen, hyper=hyper)
    hyper = learn(hyper, case.impl.hyper_names, granularity, theta)
    sb = _state_next_bar(case, theta, G, state, hyper, gen)
    _assert_vjp_matches(case, theta, G, state, hyper, random_like(shape, gen), sb, "random")
    lhs, rhs, scale = _dot_product_gap(case, theta, G, state, hyper, gen)
    assert abs(lhs - rhs) <= TOL * scale
