# SPDX-License-Identifier: Apache-2.0
"""Where the derivative needs care: zero accumulators (plain autograd gives NaN), the ties and both
branches of a maximum, RAdam's rectification switch, Rprop's clamps and signs, ASGD's t0."""
from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor

from gimli_bptt import GimliUpdater
from gimli_bptt.optim import ASGD, RADAM, RPROP
from gimli_bptt.optim.radam import RHO_SWITCH
from gimli_bptt.testing import check_hypergradients, float64_rtol

from optim_checks import assert_vjp_matches, autograd_vjp, check_vjp, out_keys, point, run_steps
from optim_table import DTYPE, Row, assert_rel, learn, params, random_like, row, rows
from problems import build_model, ce_loss, make_batches

#: torch.func.jvp goes through torch.jit.script inside torch, which warns that it is deprecated
#: (a DeprecationWarning in torch 2.13, a FutureWarning in 2.14).
JIT_WARNING = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def _torch_differentiable_G_bar(r: Row, theta: Tensor, G: Tensor, state: dict[str, Any], tb: Tensor,
                                **kwargs: Any) -> Tensor:
    """The G cotangent by autograd through ``torch.optim``'s own ``differentiable=True`` step."""
    G = G.clone().requires_grad_(True)
    p = theta.clone().requires_grad_(True).clone()  # not a leaf: torch updates it in place
    p.grad = G
    opt = r.torch_cls([p], differentiable=True, **kwargs)
    opt.state[p] = r.impl.export_state(state, theta)
    opt.step()
    return torch.autograd.grad((p * tb).sum(), G)[0]


def _all_finite(*tensors: Any) -> None:
    for x in tensors:
        for t in x.values() if isinstance(x, dict) else [x]:
            assert torch.isfinite(t).all(), f"not finite: {t}"


# --------------------------------------------------------------------------------------------
# Adam at an exactly zero gradient: autograd gives NaN, the hand-written VJP the limit.
# --------------------------------------------------------------------------------------------

_ZERO_GRADIENT_ROWS = ("adam-default", "adam-amsgrad", "adamw-default", "adamw-amsgrad", "adam-betas-eps",
                       "adamw-maximize")


@pytest.mark.parametrize("steps_of_zero", [1, 3], ids=["zero_at_step_1", "zero_at_steps_1_to_3"])
@pytest.mark.parametrize("r", params("vjp", [row(i) for i in _ZERO_GRADIENT_ROWS]))
def test_adam_zero_gradient(r: Row, steps_of_zero: int) -> None:
    """Where every gradient so far is exactly 0, v' = 0 and d(sqrt v')/dv' is infinite.

    The true derivative is finite: theta' = theta - a m'/(sqrt(v')/c2 + eps) with m' linear
    and sqrt(v') = O(|g|), so dtheta'/dg = -a (1 - b1)/eps at g = 0 (only the m' path is first
    order). Plain autograd multiplies the infinite sqrt derivative by the zero cotangent d_bar
    (m' = 0) and returns NaN (shown with ``torch.optim.Adam(differentiable=True)``): that is why
    the hand-written VJP is needed. (``adam_step`` itself uses a sqrt whose derivative at 0 is
    taken as 0, so autograd through it gives the same finite values as the VJP.)
    """
    gen = torch.Generator().manual_seed(14)
    impl, tol = r.impl, r.tol.vjp
    hyper_f = dict(r.hyper(), weight_decay=0.0)
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
    plain = _torch_differentiable_G_bar(
        r, theta, G, state, tb, lr=lr, betas=(b1, hyper_f["beta2"]), eps=eps, weight_decay=0.0,
        amsgrad=hyper_f["amsgrad"], maximize=hyper_f["maximize"])
    assert torch.isnan(plain[z]), "autograd through sqrt(v') at v' = 0 should give NaN"
    assert torch.isfinite(plain[~zero]).all()

    # With no state cotangent: the analytic limit -lr/c1 * (1 - b1)/eps * theta_next_bar.
    theta_bar, G_bar, state_bar, hyper_bar = impl.step_vjp(theta, G, state, hyper, tb, {})
    _all_finite(theta_bar, G_bar, state_bar, hyper_bar)
    sign = -1.0 if hyper_f["maximize"] else 1.0
    expected = sign * -lr / (1 - b1**t) * (1 - b1) / eps * tb[z].item()
    # a product and quotients of positive factors, about 8 roundings, condition 1 (1 - b1**t: b1 < 1 far from 1)
    assert abs(G_bar[z].item() - expected) <= float64_rtol(terms=8) * abs(expected), (G_bar[z].item(), expected)
    assert theta_bar[z].item() == tb[z].item()
    m_path = r.floors(r, theta, G, state, hyper, tb)["G"]
    assert_rel(G_bar[~zero], plain[~zero], tol, "G_bar off the zero element, against torch.optim", m_path)

    # With cotangents on every state entry: finite differences in G[z] and theta[z].
    sb = {k: random_like(shape, gen) for k in out_keys(r, theta, G, state, hyper)}
    theta_bar, G_bar, state_bar, hyper_bar = impl.step_vjp(theta, G, state, hyper, tb, sb)
    _all_finite(theta_bar, G_bar, state_bar, hyper_bar)
    e_z = zero.to(DTYPE)  # a float64 unit vector (a bool mask times 1e-20 would be float32)

    def local(dtheta: float, dG: float) -> float:
        """<cotangents, outputs> at element z only (the others would swamp the difference)."""
        tn, sn = impl.step(theta + dtheta * e_z, G + dG * e_z, state, hyper)
        return (tb[z] * tn[z]).item() + sum((sb[k][z] * sn[k][z]).item() for k in sb)

    h = 1e-20  # far below eps: the O(h/eps) curvature error is 1e-12 relative
    fd_G = (local(0.0, h) - local(0.0, -h)) / (2 * h)
    assert abs(G_bar[z].item() - fd_G) <= 1e-10 * abs(fd_G), (G_bar[z].item(), fd_G)
    h = 1e-6  # theta' is affine in theta[z] here (no weight decay)
    fd_theta = (local(h, 0.0) - local(-h, 0.0)) / (2 * h)
    assert abs(theta_bar[z].item() - fd_theta) <= 1e-8 * abs(fd_theta), (theta_bar[z].item(), fd_theta)

    # autograd through adam_step (finite at z through its sqrt) agrees, but for amsgrad's tie.
    if not hyper["amsgrad"]:
        assert_vjp_matches(r, theta, G, state, hyper, tb, sb, "zero gradient element")
        return
    # amsgrad: at z, v' = vmax = 0 is a tie. autograd's maximum splits the cotangent in halves,
    # the VJP gives it all to v' (Note [amsgrad]); the total reaching the two is the same.
    ref = autograd_vjp(r, theta, G, state, hyper, tb, sb)
    assert_rel(theta_bar, ref[0], tol, "theta_bar")
    assert_rel(G_bar, ref[1], tol, "G_bar", r.floors(r, theta, G, state, hyper, tb)["G"])
    for n, x in ref[3].items():
        assert_rel(hyper_bar[n], x, tol, f"hyper_bar[{n!r}]")
    for k, x in ref[2].items():
        assert_rel(state_bar[k][~zero], x[~zero], tol, f"state_bar[{k!r}] off the tie")
    b2 = hyper_f["beta2"]
    ours = state_bar["exp_avg_sq"][z] / b2 + state_bar["max_exp_avg_sq"][z]
    theirs = ref[2]["exp_avg_sq"][z] / b2 + ref[2]["max_exp_avg_sq"][z]
    assert_rel(ours, theirs, tol, "total cotangent of v' and vmax at the tie")
    assert state_bar["max_exp_avg_sq"][z] == 0


# --------------------------------------------------------------------------------------------
# amsgrad's two branches, explicitly.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", params("vjp", rows(where=lambda r: bool(r.kwargs.get("amsgrad")))))
def test_amsgrad_both_branches(r: Row) -> None:
    """The cotangent of max(vmax, v') goes to v' where v' > vmax and to vmax where v' < vmax."""
    gen = torch.Generator().manual_seed(15)
    theta, G, state, hyper = point(r, (8,), 3, gen)
    v_next = r.impl.step(theta, G, state, hyper)[1]["exp_avg_sq"]
    new = v_next > state["max_exp_avg_sq"]
    assert new.any() and (~new).any()
    assert ((v_next - state["max_exp_avg_sq"]).abs() > 1e-3 * v_next).all()
    hyper = learn(hyper, r.impl.hyper_names, "element", theta)
    tb = random_like((8,), gen)
    sb = {k: random_like((8,), gen) for k in out_keys(r, theta, G, state, hyper)}
    _, _, state_bar, _ = r.impl.step_vjp(theta, G, state, hyper, tb, sb)
    b2 = hyper["beta2"]
    # Where v' wins, the running maximum is v' (no cotangent to the old maximum) ...
    assert (state_bar["max_exp_avg_sq"][new] == 0).all()
    # ... and where the old maximum wins, v' reaches the output only through exp_avg_sq.
    assert torch.equal(state_bar["exp_avg_sq"][~new], (b2 * sb["exp_avg_sq"])[~new])
    assert_vjp_matches(r, theta, G, state, hyper, tb, sb, "amsgrad")


# --------------------------------------------------------------------------------------------
# A zero accumulator: Adagrad and RMSprop where every gradient so far is exactly 0.
# --------------------------------------------------------------------------------------------

_ZERO_ACCUMULATOR_ROWS = ("adagrad-default", "adagrad-lr_decay-wd", "rmsprop-default", "rmsprop-centered",
                          "rmsprop-momentum-wd", "rmsprop-centered-momentum-wd-maximize")


@pytest.mark.parametrize("r", params("vjp", [row(i) for i in _ZERO_ACCUMULATOR_ROWS]))
def test_zero_accumulator(r: Row) -> None:
    """At the first step from a zero state, an element with G = 0 has a zero accumulator.

    The true derivative there is finite: theta' = theta - eta g / (c |g| + eps) (c = 1 for
    Adagrad, sqrt(1 - alpha) or sqrt(alpha (1 - alpha)) centered for RMSprop, the momentum
    buffer being g / a at the first step), so dtheta'/dg = -eta / eps at g = 0. Plain autograd
    (torch's ``differentiable=True`` step) gives NaN; the VJP gives the limit, and equals
    autograd through our step (finite through ``_sqrt``).
    """
    gen = torch.Generator().manual_seed(21)
    impl, tol = r.impl, r.tol.vjp
    hyper_f = dict(r.hyper(), weight_decay=0.0, initial_accumulator_value=0.0)
    shape, z = (6,), 2
    zero = torch.arange(6) == z
    theta = random_like(shape, gen)
    theta[z] = 0.0  # theta'[z] is then the update alone, so the finite difference loses no digits
    state = impl.import_state({}, theta, hyper_f)
    G = torch.where(zero, 0.0, random_like(shape, gen))
    tb = random_like(shape, gen)

    plain = _torch_differentiable_G_bar(r, theta, G, state, tb,
                                        **{k: v for k, v in r.kwargs.items() if k != "weight_decay"})
    assert torch.isnan(plain[z]), "autograd through sqrt at 0 should give NaN"
    assert torch.isfinite(plain[~zero]).all()

    hyper = learn(hyper_f, impl.hyper_names, "element", theta)
    theta_bar, G_bar, state_bar, hyper_bar = impl.step_vjp(theta, G, state, hyper, tb, {})
    _all_finite(theta_bar, G_bar, state_bar, hyper_bar)
    sign = -1.0 if hyper_f["maximize"] else 1.0
    expected = sign * -hyper_f["lr"] / hyper_f["eps"] * tb[z].item()
    # a quotient and a product, and the step's own few roundings: condition 1
    assert abs(G_bar[z].item() - expected) <= float64_rtol(terms=8) * abs(expected), (G_bar[z].item(), expected)
    # Off z the accumulator is g^2-dominated, g / (c|g| + eps) nearly flat: the numerator and
    # denominator paths of G_bar nearly cancel, and torch sums them in another order. Each path
    # is about eta |tb| / a: both sides are accurate relative to that (the row's floors).
    sn = impl.step(theta, G, state, hyper_f)[1]
    w = sn["sum"] if "sum" in sn else sn["square_avg"] - sn.get("grad_avg", torch.zeros(()))**2
    path = (hyper_f["lr"] * tb.abs() / (w.sqrt() + hyper_f["eps"]))[~zero].max().item()
    assert_rel(G_bar[~zero], plain[~zero], tol, "G_bar off the zero element, against torch.optim", path)

    sb = {k: random_like(shape, gen) for k in out_keys(r, theta, G, state, hyper)}
    ours = impl.step_vjp(theta, G, state, hyper, tb, sb)
    ref = autograd_vjp(r, theta, G, state, hyper, tb, sb)
    assert_rel(ours[0], ref[0], tol, "theta_bar")
    assert_rel(ours[1], ref[1], tol, "G_bar")
    for k, x in ref[2].items():
        assert_rel(ours[2].get(k, torch.zeros_like(x)), x, tol, f"state_bar[{k!r}]")
    for n, x in ref[3].items():
        assert_rel(ours[3][n], x, tol, f"hyper_bar[{n!r}]")

    e_z = zero.to(DTYPE)
    h = 1e-12 * hyper_f["eps"]  # far below eps: the O(h/eps) curvature error is 1e-12 relative

    def local(dG: float) -> float:
        tn, sn = impl.step(theta, G + dG * e_z, state, hyper)
        return (tb[z] * tn[z]).item() + sum((sb[k][z] * sn[k][z]).item() for k in sb)

    fd = (local(h) - local(-h)) / (2 * h)
    assert abs(ours[1][z].item() - fd) <= 1e-10 * abs(fd), (ours[1][z].item(), fd)


# --------------------------------------------------------------------------------------------
# Adamax's maximum: both branches away from ties, and the tie convention.
# --------------------------------------------------------------------------------------------


def _adamax_point(r: Row, gen: torch.Generator, ratio: Tensor, b2: float | None = None):
    """A point after 3 steps whose old infinity norm is set so that b2 u = ratio (|g| + eps)."""
    impl = r.impl
    hyper = r.hyper()
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


@pytest.mark.parametrize("r", params("vjp", rows(cls=torch.optim.Adamax)))
def test_adamax_both_branches(r: Row) -> None:
    """Where |g| + eps wins, the old norm gets no cotangent; where b2 u wins, neither eps nor g
    (through |g|) does. Away from ties both agree with autograd."""
    gen = torch.Generator().manual_seed(22)
    old_wins = torch.arange(8) % 2 == 0
    theta, G, state, hyper = _adamax_point(r, gen, torch.where(old_wins, 1.5, 0.5).to(DTYPE))
    impl, tol = r.impl, r.tol.vjp
    hyper = learn(hyper, impl.hyper_names, "element", theta)
    tb = random_like((8,), gen)
    sb = {k: random_like((8,), gen) for k in ("exp_avg", "exp_inf")}
    ours = impl.step_vjp(theta, G, state, hyper, tb, sb)
    assert (ours[2]["exp_inf"][~old_wins] == 0).all()
    assert (ours[3]["eps"][old_wins] == 0).all()
    assert (ours[2]["exp_inf"][old_wins] != 0).all() and (ours[3]["eps"][~old_wins] != 0).all()
    ref = autograd_vjp(r, theta, G, state, hyper, tb, sb)
    for a, b, what in [(ours[0], ref[0], "theta_bar"), (ours[1], ref[1], "G_bar")]:
        assert_rel(a, b, tol, what)
    for k in ref[2]:
        assert_rel(ours[2][k], ref[2][k], tol, f"state_bar[{k!r}]")
    for n in ref[3]:
        assert_rel(ours[3][n], ref[3][n], tol, f"hyper_bar[{n!r}]")


def test_adamax_tie() -> None:
    """At b2 u = |g| + eps exactly (b2 = 0.5: u = 2 (|g| + eps) is exact), the VJP gives the
    cotangent of u' wholly to |g| + eps (Note [Adamax maximum]); autograd's maximum splits it
    in halves. The total reaching the two sides is the same."""
    r = row("adamax-default")
    gen = torch.Generator().manual_seed(23)
    theta, G, state, hyper = _adamax_point(r, gen, torch.ones(8, dtype=DTYPE), b2=0.5)
    assert torch.equal(state["exp_inf"] * 0.5, G.abs() + hyper["eps"]), "not a tie"
    impl, tol = r.impl, r.tol.vjp
    hyper = learn(hyper, ("eps",), "element", theta)
    tb = random_like((8,), gen)
    sb = {k: random_like((8,), gen) for k in ("exp_avg", "exp_inf")}
    ours = impl.step_vjp(theta, G, state, hyper, tb, sb)
    ref = autograd_vjp(r, theta, G, state, hyper, tb, sb)
    assert (ours[2]["exp_inf"] == 0).all()
    assert_rel(ours[3]["eps"], 2 * ref[3]["eps"], tol, "eps_bar: all versus half")
    assert_rel(ours[3]["eps"] + ours[2]["exp_inf"] / 0.5, ref[3]["eps"] + ref[2]["exp_inf"] / 0.5, tol,
               "total cotangent of the two sides of the maximum")
    assert_rel(ours[0], ref[0], tol, "theta_bar")


# --------------------------------------------------------------------------------------------
# RAdam: both sides of the rectification switch.
# --------------------------------------------------------------------------------------------


def _rho_t(b2: float, t: float) -> float:
    return 2 / (1 - b2) - 1 - 2 * t * b2**t / (1 - b2**t)


@JIT_WARNING
@pytest.mark.parametrize("steps_before", [3, 8], ids=["unrectified_t4", "rectified_t9"])
@pytest.mark.parametrize("r", params("vjp", rows(cls=torch.optim.RAdam)))
def test_radam_vjp_on_both_sides_of_the_switch(r: Row, steps_before: int) -> None:
    """The table's VJP tests see steps 1 and 4 (unrectified); here step 4 and step 9 (rectified),
    for both param groups, every hyperparameter learned, well away from rho_t = 5."""
    gen = torch.Generator().manual_seed(2)
    t = steps_before + 1
    for group in (0, 1):
        hyper_f = r.hyper(group)
        rho = _rho_t(hyper_f["beta2"], t)
        assert abs(rho - RHO_SWITCH) > 0.05, rho
        for granularity in ("0d", "element"):
            theta = random_like((2, 3), gen)
            state = RADAM.import_state({}, theta, hyper_f)
            theta, state = run_steps(r, theta, [random_like((2, 3), gen) for _ in range(steps_before)], state, hyper_f)
            hyper = learn(hyper_f, RADAM.hyper_names, granularity, theta)
            G = random_like((2, 3), gen)
            check_vjp(r, theta, G, state, hyper, gen, f"group {group}, {granularity}, t={t}, rho_t={rho:.3f}")
            _, _, _, bars = RADAM.step_vjp(theta, G, state, hyper, random_like((2, 3), gen), {})
            # eps only acts through the rectified update
            assert (bars["eps"].abs().sum() > 0) == (rho > RHO_SWITCH), (rho, bars["eps"])


@JIT_WARNING
def test_radam_switch_per_element() -> None:
    """beta2 learned per element: each element switches on its own (mixed mask); each element
    takes the step of the scalar beta2."""
    r = row("radam-default")
    hyper_f = r.hyper()
    gen = torch.Generator().manual_seed(3)
    betas2 = torch.tensor([0.999, 0.7, 0.9, 0.75], dtype=DTYPE)
    t = 8
    rhos = [_rho_t(b, t) for b in betas2.tolist()]
    assert any(x > RHO_SWITCH + 0.5 for x in rhos) and any(x < RHO_SWITCH - 0.2 for x in rhos), rhos
    theta = random_like((4,), gen)
    grads = [random_like((4,), gen) for _ in range(t)]
    hyper = learn(hyper_f, RADAM.hyper_names, "element", theta)
    hyper["beta2"] = betas2.clone()
    state = RADAM.import_state({}, theta, hyper_f)
    ours, _ = run_steps(r, theta, grads, state, hyper)
    for i, b in enumerate(betas2.tolist()):
        single, _ = run_steps(r, theta[i:i + 1], [g[i:i + 1] for g in grads],
                              RADAM.import_state({}, theta[i:i + 1], hyper_f), dict(hyper_f, beta2=b))
        # the same element-wise steps, vectorised or on one element: t = 8 steps, relative to θ
        assert_rel(ours[i:i + 1], single, float64_rtol(terms=t), f"theta[{i}] (rho_t = {rhos[i]:.3f})")
    theta7, state7 = run_steps(r, theta, grads[:-1], state, hyper)
    check_vjp(r, theta7, grads[-1], state7, hyper, gen, "mixed rectification")


def test_radam_hypergradient_across_the_switch(float64_default: None) -> None:
    """An unroll over inner steps 4 to 8 (rectification from step 6): the hypergradients against
    the autograd unroll, and against central differences of real torch.optim.RAdam steps."""
    r = row("radam-beta2_0.9-eps")  # lr 0.01, betas (0.9, 0.9), eps 1e-4
    model = build_model("mlp", seed=4)
    warm, _ = make_batches(3, seed=40)
    batches, val = make_batches(5, seed=4)

    def warmed() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        m = copy.deepcopy(model)
        opt = r.for_model(m, grouped=False)
        for batch in warm:  # three steps at the base values: the state the unroll starts from
            opt.zero_grad()
            ce_loss(m, batch).backward()
            opt.step()
        return m, opt

    m, opt = warmed()
    up = GimliUpdater(m, opt, ce_loss, ce_loss, unroll=5, learn={"lr": "group", "beta2": "group", "eps": "group"})
    errors = check_hypergradients(up, batches, val)
    assert max(errors.values()) <= r.tol.hypergrad, errors
    ours = up.hypergradient(batches, val).hypergrads

    def val_loss(name: str, value: float) -> float:
        mm, o = warmed()
        for g in o.param_groups:
            RADAM.write_hyper(g, name, value)
        for batch in batches:
            o.zero_grad()
            ce_loss(mm, batch).backward()
            o.step()
        with torch.no_grad():
            return float(ce_loss(mm, val))

    base = RADAM.read_hyper(opt.param_groups[0])
    for name, h in (("lr", 1e-7), ("eps", 1e-9), ("beta2", 1e-7)):
        fd = (val_loss(name, base[name] + h) - val_loss(name, base[name] - h)) / (2 * h)
        assert abs(float(ours[name][0]) - fd) <= r.tol.fd * abs(fd), (name, float(ours[name][0]), fd)


# --------------------------------------------------------------------------------------------
# Rprop: the clamps, and the sign pattern.
# --------------------------------------------------------------------------------------------


@JIT_WARNING
def test_rprop_clamps_and_signs() -> None:
    """A point where step sizes grow, shrink, stay, and are clamped at both bounds (and one at a tie
    with the lower bound): each cotangent lands where the Note says, and matches autograd."""
    r = row("rprop-clamped")
    hyper_f = dict(r.hyper(), lr=0.01, etaminus=0.5, etaplus=1.2, step_size_min=0.004, step_size_max=0.015)
    theta = torch.linspace(-1, 1, 7, dtype=DTYPE)
    prev = torch.tensor([1.0, 1.0, -1.0, 1.0, 0.0, -2.0, 1.0], dtype=DTYPE)
    G = torch.tensor([2.0, 1.0, 1.0, -1.0, 3.0, -1.0, 0.5], dtype=DTYPE)
    size = torch.tensor([0.010, 0.014, 0.010, 0.006, 0.004, 0.013, 0.005], dtype=DTYPE)
    # element: 0 grows, 1 grows into the max, 2 shrinks (a sign change: no move, prev' = 0),
    # 3 shrinks into the min, 4 stays at the min (prev = 0: a tie with the bound, counted inside),
    # 5 grows into the max (negative gradient), 6 grows
    state = {"step": 5.0, "prev": prev, "step_size": size}
    theta_next, state_next = RPROP.step(theta, G, state, hyper_f)
    expected = torch.tensor([0.012, 0.015, 0.005, 0.004, 0.004, 0.015, 0.006], dtype=DTYPE)
    assert_rel(state_next["step_size"], expected, float64_rtol(terms=1), "step sizes")  # one product, clamped
    assert torch.equal(state_next["prev"], torch.tensor([2.0, 1.0, 0.0, 0.0, 3.0, -1.0, 0.5], dtype=DTYPE))
    assert torch.equal(theta_next, theta - torch.tensor([1, 1, 0, 0, 1, -1, 1], dtype=DTYPE) * expected)
    hyper = learn(hyper_f, RPROP.hyper_names, "element", theta)
    tb = torch.ones(7, dtype=DTYPE)
    sb = {"step_size": torch.full((7,), 10.0, dtype=DTYPE), "prev": torch.full((7,), 100.0, dtype=DTYPE)}
    theta_bar, G_bar, state_bar, bars = RPROP.step_vjp(theta, G, state, hyper, tb, sb)
    ss_bar = 10.0 - torch.tensor([1, 1, 0, 0, 1, -1, 1], dtype=DTYPE)
    inside = torch.tensor([1, 0, 1, 0, 1, 0, 1], dtype=torch.bool)
    assert torch.equal(theta_bar, tb)
    assert torch.equal(G_bar, torch.tensor([100.0, 100.0, 0.0, 0.0, 100.0, 100.0, 100.0], dtype=DTYPE))
    assert torch.equal(bars["step_size_min"], torch.where(torch.arange(7) == 3, ss_bar, 0.0))
    assert torch.equal(bars["step_size_max"], torch.where((torch.arange(7) == 1) | (torch.arange(7) == 5), ss_bar, 0.0))
    factor = torch.tensor([1.2, 1.2, 0.5, 0.5, 1.0, 1.2, 1.2], dtype=DTYPE)
    one = float64_rtol(terms=1)  # each cotangent is one product (or zero)
    assert_rel(state_bar["step_size"], torch.where(inside, factor * ss_bar, 0.0), one, "step_size_bar")
    assert_rel(bars["etaplus"], torch.where(inside & (factor > 1), size * ss_bar, 0.0), one, "etaplus_bar")
    assert_rel(bars["etaminus"], torch.where(inside & (factor < 1), size * ss_bar, 0.0), one, "etaminus_bar")
    assert torch.equal(bars["lr"], torch.zeros(7, dtype=DTYPE))  # lr acts through the first step only
    assert "prev" not in state_bar or not state_bar["prev"].any()
    gen = torch.Generator().manual_seed(5)
    for granularity in ("0d", "element"):
        check_vjp(r, theta, G, state, learn(hyper_f, RPROP.hyper_names, granularity, theta), gen, granularity)


@JIT_WARNING
def test_rprop_first_step_learns_lr() -> None:
    """At the first step the step sizes are lr itself (clamped): lr gets the cotangent, the state none."""
    r = row("rprop-clamped")
    gen = torch.Generator().manual_seed(6)
    for lr in (0.01, 0.002, 0.03):  # inside, under the min, over the max
        hyper_f = dict(r.hyper(), lr=lr)
        theta, G = random_like((5,), gen), random_like((5,), gen)
        state = RPROP.import_state({}, theta, hyper_f)
        hyper = learn(hyper_f, ("lr",), "0d", theta)
        tb = random_like((5,), gen)
        _, _, state_bar, bars = RPROP.step_vjp(theta, G, state, hyper, tb, {})
        inside = hyper_f["step_size_min"] <= lr <= hyper_f["step_size_max"]
        expected = -(G.sign() * tb).sum() if inside else torch.tensor(0.0, dtype=DTYPE)
        # a sum of 5 signed terms: the condition of a sum, sum |terms| / |sum|
        kappa = float(tb.abs().sum() / expected.abs().clamp_min(1e-300)) if inside else 1.0
        assert_rel(bars["lr"], expected, float64_rtol(terms=5, condition=max(1.0, kappa)), f"lr_bar at lr={lr}")
        assert "step_size" not in state_bar
        check_vjp(r, theta, G, state, hyper, gen, f"lr={lr}")


# --------------------------------------------------------------------------------------------
# ASGD: the t0 switch of the average.
# --------------------------------------------------------------------------------------------


@JIT_WARNING
@pytest.mark.parametrize("steps_before", [1, 6], ids=["mu_1", "mu_below_1"])
def test_asgd_average_on_both_sides_of_t0(steps_before: int) -> None:
    """Until t0 + 1 the average is the parameter itself (mu = 1); afterwards mu = 1 / (t - t0). The
    VJP matches autograd on both sides (mu's own cotangent included)."""
    r = row("asgd-t0")
    hyper_f = r.hyper()  # t0 = 3
    gen = torch.Generator().manual_seed(7)
    theta = random_like((6,), gen)
    state = ASGD.import_state({}, theta, hyper_f)
    theta, state = run_steps(r, theta, [random_like((6,), gen) for _ in range(steps_before)], state, hyper_f)
    assert (float(state["mu"]) == 1.0) == (steps_before <= hyper_f["t0"] + 1)
    if float(state["mu"]) == 1.0:
        assert torch.equal(state["ax"], theta)
    else:
        assert float(state["mu"]) == pytest.approx(1 / (steps_before - hyper_f["t0"]), rel=1e-7)
    G = random_like((6,), gen)
    for granularity in ("0d", "element"):
        check_vjp(r, theta, G, state, learn(hyper_f, ASGD.hyper_names, granularity, theta), gen, granularity)
