# SPDX-License-Identifier: Apache-2.0
"""NAdam, RAdam, ASGD, Rprop beyond the generic oracles: their switch points, clamps and scalar state."""
from __future__ import annotations

import copy
from typing import Any, Iterator

import pytest
import torch
from torch import Tensor

from gimli_bptt import GimliUpdater
from gimli_bptt.optim import ASGD, NADAM, RADAM, RPROP
from gimli_bptt.optim.radam import RHO_SWITCH
from gimli_bptt.testing import check_hypergradients
from optim_cases import CASES_B, DTYPE, assert_rel, case_params, group_hyper, learn, random_like
from problems import build_model, ce_loss, make_batches
from test_optim_step import _run_against_torch
from test_optim_vjp import _JIT_WARNING, _assert_vjp_matches, _dot_product_gap, _state_next_bar

TOL_VJP = 1e-10


@pytest.fixture
def float64_default() -> Iterator[None]:
    """torch keeps its scalar state (mu_product, eta, mu) in float64 when that is the default dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _case(case_id: str):
    return next(c for c in CASES_B if c.id == case_id)


def _run(impl, theta: Tensor, grads: list[Tensor], state: dict[str, Any], hyper: dict[str, Any]):
    for G in grads:
        theta, state = impl.step(theta, G, state, hyper)
    return theta, state


def _check_vjp(case, theta, G, state, hyper, gen, where: str) -> None:
    """The VJP against autograd, and the dot-product test, at one point."""
    sb = _state_next_bar(case, theta, G, state, hyper, gen)
    _assert_vjp_matches(case, theta, G, state, hyper, random_like(theta.shape, gen), sb, where)
    lhs, rhs, scale = _dot_product_gap(case, theta, G, state, hyper, gen)
    assert abs(lhs - rhs) <= TOL_VJP * scale, f"{where}: <u, Jv> = {lhs!r}, <J^T u, v> = {rhs!r}"


# --------------------------------------------------------------------------------------------
# Scalar state in torch's precision.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", case_params([c for c in CASES_B if c.torch_cls in (torch.optim.NAdam, torch.optim.ASGD)]))
def test_scalar_state_with_float64_default_dtype(case, float64_default) -> None:
    """With float64 as the default dtype torch keeps mu_product / eta / mu unrounded: so do we."""
    _run_against_torch(case, warmup=3, granularity="0d", kernel="for_loop", steps=10)


def test_scalar_state_rounding_is_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch keeps mu_product in float32 (the default dtype): with the rounding, NAdam matches torch
    to round-off; without it (the product kept in float64), it is visibly off (the ~1e-8 relative
    change of mu_product reaches the update)."""
    import gimli_bptt.optim.nadam as nadam_module

    hyper = group_hyper(_case("nadam-default"))
    gen = torch.Generator().manual_seed(0)
    theta = random_like((5,), gen)
    grads = [random_like((5,), gen) for _ in range(6)]
    p = torch.nn.Parameter(theta.clone())
    opt = torch.optim.NAdam([p], lr=hyper["lr"], foreach=False)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    assert opt.state[p]["mu_product"].dtype == torch.float32
    ours, st = _run(NADAM, theta, grads, NADAM.import_state({}, theta, hyper), hyper)
    assert float(st["mu_product"]) == float(opt.state[p]["mu_product"])
    rounded_err = (ours - p.detach()).abs().max().item() / (ours - theta).abs().max().item()
    monkeypatch.setattr(nadam_module, "round_to_torch_scalar", lambda x: x)
    unrounded, st = _run(NADAM, theta, grads, NADAM.import_state({}, theta, hyper), hyper)
    unrounded_err = (unrounded - p.detach()).abs().max().item() / (unrounded - theta).abs().max().item()
    assert float(st["mu_product"]) != float(opt.state[p]["mu_product"])
    # relative to the total update of the 6 steps
    assert rounded_err <= 1e-13 and unrounded_err > 1e-10, (rounded_err, unrounded_err)


# --------------------------------------------------------------------------------------------
# NAdam: mu_product per element.
# --------------------------------------------------------------------------------------------


@_JIT_WARNING
def test_nadam_mu_product_per_element() -> None:
    """beta1 learned per element with different values: mu_product becomes per element, each element
    as the scalar step with that beta1 gives it; the VJP reduces the cotangent of the 0-d start."""
    case = _case("nadam-maximize-betas-eps")
    hyper_f = group_hyper(case)
    gen = torch.Generator().manual_seed(1)
    theta = random_like((4,), gen)
    state = NADAM.import_state({}, theta, hyper_f)
    betas = torch.tensor([0.5, 0.8, 0.9, 0.95], dtype=DTYPE)
    hyper = learn(hyper_f, ("lr", "beta1", "momentum_decay"), "element", theta)
    hyper["beta1"] = betas.clone()
    grads = [random_like((4,), gen) for _ in range(3)]
    ours, st = _run(NADAM, theta, grads, state, hyper)
    assert st["mu_product"].shape == (4,) and state["mu_product"].dim() == 0
    for i, b in enumerate(betas.tolist()):
        single, st1 = _run(NADAM, theta[i:i + 1], [g[i:i + 1] for g in grads],
                           NADAM.import_state({}, theta[i:i + 1], hyper_f), dict(hyper_f, beta1=b))
        assert_rel(ours[i:i + 1], single, 1e-14, f"theta[{i}]")
        assert_rel(st["mu_product"][i], st1["mu_product"], 1e-15, f"mu_product[{i}]")
    _check_vjp(case, theta, grads[0], state, hyper, gen, "first step, 0-d mu_product")
    theta1, state1 = NADAM.step(theta, grads[0], state, hyper)
    _check_vjp(case, theta1, grads[1], state1, hyper, gen, "second step, per-element mu_product")
    exported = NADAM.export_state(state1, theta1)
    assert exported["mu_product"].shape == (4,)
    assert torch.equal(NADAM.import_state(exported, theta1, hyper_f)["mu_product"], state1["mu_product"])


# --------------------------------------------------------------------------------------------
# RAdam: both sides of the rectification switch.
# --------------------------------------------------------------------------------------------


def _rho_t(b2: float, t: float) -> float:
    return 2 / (1 - b2) - 1 - 2 * t * b2**t / (1 - b2**t)


@_JIT_WARNING
@pytest.mark.parametrize("steps_before", [3, 8], ids=["unrectified_t4", "rectified_t9"])
@pytest.mark.parametrize("case", case_params([c for c in CASES_B if c.torch_cls is torch.optim.RAdam]))
def test_radam_vjp_on_both_sides_of_the_switch(case, steps_before: int) -> None:
    """The generic VJP tests see steps 1 and 4 (unrectified); here step 4 and step 9 (rectified),
    for both param groups, every hyperparameter learned, well away from rho_t = 5."""
    gen = torch.Generator().manual_seed(2)
    t = steps_before + 1
    for group in (0, 1):
        hyper_f = group_hyper(case, group)
        rho = _rho_t(hyper_f["beta2"], t)
        assert abs(rho - RHO_SWITCH) > 0.05
        for granularity in ("0d", "element"):
            theta = random_like((2, 3), gen)
            state = RADAM.import_state({}, theta, hyper_f)
            theta, state = _run(RADAM, theta, [random_like((2, 3), gen) for _ in range(steps_before)], state, hyper_f)
            hyper = learn(hyper_f, RADAM.hyper_names, granularity, theta)
            G = random_like((2, 3), gen)
            _check_vjp(case, theta, G, state, hyper, gen, f"group {group}, {granularity}, t={t}, rho_t={rho:.3f}")
            _, _, _, bars = RADAM.step_vjp(theta, G, state, hyper, random_like((2, 3), gen), {})
            # eps only acts through the rectified update
            assert (bars["eps"].abs().sum() > 0) == (rho > RHO_SWITCH), (rho, bars["eps"])


@_JIT_WARNING
def test_radam_switch_per_element() -> None:
    """beta2 learned per element: each element switches on its own (mixed mask); each element
    takes the step of the scalar beta2."""
    case = _case("radam-default")
    hyper_f = group_hyper(case)
    gen = torch.Generator().manual_seed(3)
    betas2 = torch.tensor([0.999, 0.7, 0.9, 0.75], dtype=DTYPE)
    t = 8
    rhos = [_rho_t(b, t) for b in betas2.tolist()]
    assert any(r > RHO_SWITCH + 0.5 for r in rhos) and any(r < RHO_SWITCH - 0.2 for r in rhos), rhos
    theta = random_like((4,), gen)
    grads = [random_like((4,), gen) for _ in range(t)]
    hyper = learn(hyper_f, RADAM.hyper_names, "element", theta)
    hyper["beta2"] = betas2.clone()
    state = RADAM.import_state({}, theta, hyper_f)
    ours, _ = _run(RADAM, theta, grads, state, hyper)
    for i, b in enumerate(betas2.tolist()):
        single, _ = _run(RADAM, theta[i:i + 1], [g[i:i + 1] for g in grads],
                         RADAM.import_state({}, theta[i:i + 1], hyper_f), dict(hyper_f, beta2=b))
        assert_rel(ours[i:i + 1], single, 1e-14, f"theta[{i}] (rho_t = {rhos[i]:.3f})")
    theta7, state7 = _run(RADAM, theta, grads[:-1], state, hyper)
    _check_vjp(case, theta7, grads[-1], state7, hyper, gen, "mixed rectification")


def test_radam_hypergradient_across_the_switch(float64_default) -> None:
    """An unroll over inner steps 4 to 8 (rectification from step 6): the hypergradients against
    the autograd unroll, and against central differences of real torch.optim.RAdam steps."""
    kwargs = dict(lr=0.01, betas=(0.9, 0.9), eps=1e-4)
    model = build_model("mlp", seed=4)
    warm, _ = make_batches(3, seed=40)
    batches, val = make_batches(5, seed=4)

    def warmed(kw: dict[str, Any]) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        m = copy.deepcopy(model)
        opt = torch.optim.RAdam(m.parameters(), **kw)
        for batch in warm:  # three steps at the base values: the state the unroll starts from
            opt.zero_grad()
            ce_loss(m, batch).backward()
            opt.step()
        return m, opt

    m, opt = warmed(kwargs)
    up = GimliUpdater(m, opt, ce_loss, ce_loss, unroll=5, learn={"lr": "group", "beta2": "group", "eps": "group"})
    errors = check_hypergradients(up, batches, val)
    assert max(errors.values()) <= 1e-9, errors
    ours = up.hypergradient(batches, val).hypergrads

    def val_loss(kw: dict[str, Any]) -> float:
        mm, o = warmed(kwargs)
        for g in o.param_groups:
            g["lr"], g["betas"], g["eps"] = kw["lr"], kw["betas"], kw["eps"]
        for batch in batches:
            o.zero_grad()
            ce_loss(mm, batch).backward()
            o.step()
        with torch.no_grad():
            return float(ce_loss(mm, val))

    for name, h in (("lr", 1e-7), ("eps", 1e-9), ("beta2", 1e-7)):
        vals = []
        for sign in (1, -1):
            kw = dict(kwargs)
            if name == "beta2":
                kw["betas"] = (0.9, 0.9 + sign * h)
            else:
                kw[name] = kwargs[name] + sign * h
            vals.append(val_loss(kw))
        fd = (vals[0] - vals[1]) / (2 * h)
        assert abs(float(ours[name][0]) - fd) <= 1e-5 * abs(fd), (name, float(ours[name][0]), fd)


# --------------------------------------------------------------------------------------------
# Rprop: the clamps, and the sign pattern.
# --------------------------------------------------------------------------------------------


@_JIT_WARNING
def test_rprop_clamps_and_signs() -> None:
    """A point where step sizes grow, shrink, stay, and are clamped at both bounds (and one at a tie
    with the lower bound): each cotangent lands where the Note says, and matches autograd."""
    case = _case("rprop-clamped")
    hyper_f = dict(group_hyper(case), lr=0.01, etaminus=0.5, etaplus=1.2, step_size_min=0.004, step_size_max=0.015)
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
    assert_rel(state_next["step_size"], expected, 1e-15, "step sizes")
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
    assert_rel(state_bar["step_size"], torch.where(inside, factor * ss_bar, 0.0), 1e-15, "step_size_bar")
    assert_rel(bars["etaplus"], torch.where(inside & (factor > 1), size * ss_bar, 0.0), 1e-15, "etaplus_bar")
    assert_rel(bars["etaminus"], torch.where(inside & (factor < 1), size * ss_bar, 0.0), 1e-15, "etaminus_bar")
    assert torch.equal(bars["lr"], torch.zeros(7, dtype=DTYPE))  # lr acts through the first step only
    assert "prev" not in state_bar or not state_bar["prev"].any()
    gen = torch.Generator().manual_seed(5)
    for granularity in ("0d", "element"):
        _check_vjp(case, theta, G, state, learn(hyper_f, RPROP.hyper_names, granularity, theta), gen, granularity)


@_JIT_WARNING
def test_rprop_first_step_learns_lr() -> None:
    """At the first step the step sizes are lr itself (clamped): lr gets the cotangent, the state none."""
    case = _case("rprop-clamped")
    gen = torch.Generator().manual_seed(6)
    for lr in (0.01, 0.002, 0.03):  # inside, under the min, over the max
        hyper_f = dict(group_hyper(case), lr=lr)
        theta, G = random_like((5,), gen), random_like((5,), gen)
        state = RPROP.import_state({}, theta, hyper_f)
        hyper = learn(hyper_f, ("lr",), "0d", theta)
        tb = random_like((5,), gen)
        _, _, state_bar, bars = RPROP.step_vjp(theta, G, state, hyper, tb, {})
        inside = hyper_f["step_size_min"] <= lr <= hyper_f["step_size_max"]
        expected = -(G.sign() * tb).sum() if inside else torch.tensor(0.0, dtype=DTYPE)
        assert_rel(bars["lr"], expected, 1e-14, f"lr_bar at lr={lr}")
        assert "step_size" not in state_bar
        _check_vjp(case, theta, G, state, hyper, gen, f"lr={lr}")


# --------------------------------------------------------------------------------------------
# ASGD: the t0 switch of the average, and the first step size.
# --------------------------------------------------------------------------------------------


@_JIT_WARNING
@pytest.mark.parametrize("steps_before", [1, 6], ids=["mu_1", "mu_below_1"])
def test_asgd_average_on_both_sides_of_t0(steps_before: int) -> None:
    """Until t0 + 1 the average is the parameter itself (mu = 1); afterwards mu = 1 / (t - t0). The
    VJP matches autograd on both sides (mu's own cotangent included)."""
    case = _case("asgd-t0")
    hyper_f = group_hyper(case)  # t0 = 3
    gen = torch.Generator().manual_seed(7)
    theta = random_like((6,), gen)
    state = ASGD.import_state({}, theta, hyper_f)
    theta, state = _run(ASGD, theta, [random_like((6,), gen) for _ in range(steps_before)], state, hyper_f)
    assert (float(state["mu"]) == 1.0) == (steps_before <= hyper_f["t0"] + 1)
    if float(state["mu"]) == 1.0:
        assert torch.equal(state["ax"], theta)
    else:
        assert float(state["mu"]) == pytest.approx(1 / (steps_before - hyper_f["t0"]), rel=1e-7)
    G = random_like((6,), gen)
    for granularity in ("0d", "element"):
        _check_vjp(case, theta, G, state, learn(hyper_f, ASGD.hyper_names, granularity, theta), gen, granularity)


def test_asgd_t0_is_not_learnable() -> None:
    from gimli_bptt.hyper import parse_learn

    assert "t0" not in ASGD.hyper_names and "t0" in ASGD.flag_names
    with pytest.raises(ValueError, match="cannot learn 't0'"):
        parse_learn(ASGD, {"t0": "group"})


# --------------------------------------------------------------------------------------------
# Independent oracle: central differences through torch.optim itself.
# --------------------------------------------------------------------------------------------

_FD_CASES = [
    (torch.optim.NAdam, dict(lr=0.01, weight_decay=0.01, momentum_decay=0.05), ("lr", "beta1", "momentum_decay")),
    (torch.optim.ASGD, dict(lr=0.05, lambd=0.01, t0=1.0), ("lr", "lambd", "alpha")),
    (torch.optim.Rprop, dict(lr=0.01, step_sizes=(2e-3, 0.013)), ("lr", "etaplus", "etaminus", "step_size_max")),
]


@pytest.mark.parametrize("cls,kwargs,names", _FD_CASES, ids=[c[0].__name__ for c in _FD_CASES])
def test_hypergradient_matches_finite_differences_of_torch_optim(cls, kwargs, names, float64_default) -> None:
    """Hypergradients of a 4-step unroll from a fresh state (so the first step's lazy state is
    part of it) against central differences of torch.optim's own steps."""
    model = build_model("mlp", seed=8)
    batches, val = make_batches(4, seed=8)
    m = copy.deepcopy(model)
    probe = cls(m.parameters(), **kwargs)
    impl = {torch.optim.NAdam: NADAM, torch.optim.ASGD: ASGD, torch.optim.Rprop: RPROP}[cls]
    base = impl.read_hyper(probe.param_groups[0])
    up = GimliUpdater(m, probe, ce_loss, ce_loss, unroll=4, learn={n: "group" for n in names})
    ours = up.hypergradient(batches, val).hypergrads

    def val_loss(name: str, value: float) -> float:
        mm = copy.deepcopy(model)
        opt = cls(mm.parameters(), **kwargs)
        impl.write_hyper(opt.param_groups[0], name, value)
        for batch in batches:
            opt.zero_grad()
            ce_loss(mm, batch).backward()
            opt.step()
        with torch.no_grad():
            return float(ce_loss(mm, val))

    for name in names:
        h = 1e-4 * abs(base[name])  # central differences: O(h^2) error, 1e-8 relative
        fd = (val_loss(name, base[name] + h) - val_loss(name, base[name] - h)) / (2 * h)
        assert abs(float(ours[name][0]) - fd) <= 1e-5 * max(abs(fd), 1e-6), (name, float(ours[name][0]), fd)
        assert fd != 0.0, name
