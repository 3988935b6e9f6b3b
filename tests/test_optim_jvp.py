# SPDX-License-Identifier: Apache-2.0
"""Oracle 3: every row's hand-written ``step_jvp`` against forward-mode autograd, the adjoint test against ``step_vjp``, and under vmap (tests/optim_table.py)."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from gimli_bptt import register_optimizer, unregister_optimizer
from gimli_bptt.testing import float64_rtol
from gimli_bptt.optim import BUILT_IN, derive_step_jvp, get_optimizer
from optim_checks import learned, point
from optim_table import DTYPE, ROWS, Row, assert_rel, learn, random_like, random_variant, rel_err, tensor_keys
from optim_table import params as row_params
from test_register import Lion, lion_step, lion_step_vjp

#: Warm-ups of the fixed points: the first step (lazy state, bias corrections at t = 1) and the fourth.
WARMUPS = {"first_step": 0, "after_3_steps": 3}
#: Random examples per row (a share of the profile's, at least 3).
EXAMPLES = max(3, settings().max_examples // 5)
#: The adjoint test's tolerance, relative to the sum of the absolute products (as the dot-product test).
ADJOINT_TOL = 1e-10
#: Directions of the vmap test.
M = 3
#: ``torch.func.vmap`` over M tangents against M separate calls: the same operations, batched.
#: Element-wise ones batch bit for bit (the gap is 0 on all 84 rows at every warm-up here); the
#: reductions inside a step (Adafactor's row and column means, Muon's Newton-Schulz products) may be
#: blocked differently by another BLAS, which changes their order only: the step oracle's bound
#: (its measured growth <= 8.7 over 20 steps, bounded by 1e3) covers a tangent of one step.
VMAP_TOL = float64_rtol(terms=1, condition=1e3)
#: torch.func.jvp goes through torch.jit.script inside torch, which warns that it is deprecated
#: (a DeprecationWarning in torch 2.13, a FutureWarning in 2.14).
JIT_WARNING = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
pytestmark = JIT_WARNING

#: ``(theta_dot, G_dot, state_dot, hyper_dot)``.
Dots = tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]


# ---------------------------------------------------------------------------- the references
def differentiable_keys(state: Mapping[str, Any]) -> list[str]:
    """The entries of a state that carry a tangent: floating-point tensors, sorted."""
    return sorted(k for k, v in state.items() if isinstance(v, Tensor) and v.is_floating_point())


def random_dots(theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any], gen: torch.Generator,
                m: Optional[int] = None) -> Dots:
    """Random tangents for θ, G, every differentiable state entry and every tensor hyperparameter,
    each shaped like its primal (with a leading dimension of ``m`` directions when given)."""
    lead = () if m is None else (m,)
    rnd = lambda x: random_like(lead + tuple(x.shape), gen)  # noqa: E731
    return (rnd(theta), rnd(G), {k: rnd(state[k]) for k in differentiable_keys(state)},
            {n: rnd(hyper[n]) for n in learned(hyper)})


def forward_mode(row: Row, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                 dots: Dots) -> tuple[Tensor, dict[str, Tensor]]:
    """``(theta_next_dot, state_next_dot)`` by ``torch.func.jvp`` through ``step`` (missing tangents are zero)."""
    theta_dot, G_dot, state_dot, hyper_dot = dots
    skeys, hkeys = differentiable_keys(state), learned(hyper)
    step = row.impl.step

    def f(theta: Tensor, G: Tensor, svals: list[Tensor], hvals: list[Tensor]) -> Any:
        theta_next, nxt = step(theta, G, dict(state, **dict(zip(skeys, svals))), dict(hyper, **dict(zip(hkeys, hvals))))
        return theta_next, {k: nxt[k] for k in differentiable_keys(nxt)}

    tangent = lambda d, k, x: d[k] if k in d else torch.zeros_like(x)  # noqa: E731
    _, (tn_dot, sn_dot) = torch.func.jvp(
        f, (theta, G, [state[k] for k in skeys], [hyper[n] for n in hkeys]),
        (theta_dot, G_dot, [tangent(state_dot, k, state[k]) for k in skeys],
         [tangent(hyper_dot, n, hyper[n]) for n in hkeys]))
    return tn_dot, sn_dot


def theta_floor(row: Row, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                dots: Dots) -> float:
    """The size of the terms that cancel in θ̇' (the row's VJP floors, read for the JVP).

    A floor ``{"G": f}`` bounds, for a unit cotangent of θ', the terms of θ'/G that nearly cancel
    (Adam's m' and v' paths at the first step), so ġ = ±Ġ + λθ̇ + λ̇θ contributes terms up to
    ``f max|ġ|``; a floor for the weight decay (coupled: it acts through g) bounds those of λ̇θ.
    """
    if row.floors is None:
        return 0.0
    floors = row.floors(row, theta, G, state, hyper, torch.ones_like(theta))
    theta_dot, G_dot, _, hyper_dot = dots
    size = lambda x: torch.as_tensor(x).abs().max().item()  # noqa: E731
    g_dot = size(G_dot)
    if "weight_decay" in floors:
        g_dot += size(hyper["weight_decay"]) * size(theta_dot)
        if "weight_decay" in hyper_dot:
            g_dot += size(hyper_dot["weight_decay"]) * size(theta)
    return floors.get("G", 0.0) * g_dot


def check_jvp_contract(theta: Tensor, state_next: Mapping[str, Any], theta_next_dot: Tensor,
                       state_next_dot: Mapping[str, Tensor], where: str) -> None:
    """One tangent per differentiable entry of the next state, each shaped like its entry."""
    assert theta_next_dot.shape == theta.shape, f"{where}: theta_next_dot {theta_next_dot.shape} != {theta.shape}"
    assert sorted(state_next_dot) == differentiable_keys(state_next), (
        f"{where}: state_next_dot has {sorted(state_next_dot)}, the next state {differentiable_keys(state_next)}")
    for k, v in state_next_dot.items():
        assert v.shape == state_next[k].shape, f"{where}: state_next_dot[{k!r}] {v.shape} != {state_next[k].shape}"


def jvp_errors(row: Row, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any], dots: Dots,
               where: str, floors: Optional[Mapping[str, float]] = None,
               ref: Optional[tuple[Tensor, dict[str, Tensor]]] = None) -> dict[str, float]:
    """The hand-written JVP keeps the contract; its relative error against forward mode (``ref``
    where given), per output (``"theta"`` or a state key), relative to at least ``floors``."""
    ours = row.impl.step_jvp(theta, G, state, hyper, *dots)
    check_jvp_contract(theta, row.impl.step(theta, G, state, hyper)[1], *ours, where)
    if ref is None:
        ref = forward_mode(row, theta, G, state, hyper, dots)
    for x in (ours[0], *ours[1].values()):
        assert torch.isfinite(x).all(), f"{where}: a tangent is not finite: {ours}"
    floors = {} if floors is None else floors
    floor = theta_floor(row, theta, G, state, hyper, dots)
    errors = {"theta": rel_err(ours[0], ref[0], max(floor, floors.get("theta", 0.0)))}
    # The same terms cancel in the state entries that hold the update before its step size
    # (RMSprop's momentum buffer is q = g / a, θ' = θ - η q; Adadelta's acc_delta holds δ²).
    state_floor = floor / torch.as_tensor(hyper["lr"]).abs().min().item() if floor else 0.0
    errors.update({k: rel_err(ours[1][k], r, max(state_floor, floors.get(k, 0.0))) for k, r in ref[1].items()})
    return errors


def assert_jvp_matches(row: Row, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                       dots: Dots, where: str, floors: Optional[Mapping[str, float]] = None,
                       ref: Optional[tuple[Tensor, dict[str, Tensor]]] = None) -> None:
    """The hand-written JVP equals forward mode through ``step`` within ``row.tol.vjp``."""
    errors = jvp_errors(row, theta, G, state, hyper, dots, f"{row.id}, {where}", floors, ref)
    bad = {k: e for k, e in errors.items() if not e <= row.tol.vjp}
    assert not bad, f"{row.id}, {where}: relative errors {bad} > {row.tol.vjp:.0e}"


def adjoint_gap(row: Row, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                gen: torch.Generator) -> tuple[float, float, float]:
    """``(<u, J v>, <J^T u, v>, scale)``: the hand-written ``step_jvp`` against the hand-written
    ``step_vjp``, at random directions v and cotangents u; the scale is the sum of the absolute
    products."""
    impl = row.impl
    dots = random_dots(theta, G, state, hyper, gen)
    state_next = impl.step(theta, G, state, hyper)[1]
    theta_next_dot, state_next_dot = impl.step_jvp(theta, G, state, hyper, *dots)
    u_theta = random_like(theta.shape, gen)
    u_state = {k: random_like(state_next[k].shape, gen) for k in differentiable_keys(state_next)}
    theta_bar, G_bar, state_bar, hyper_bar = impl.step_vjp(theta, G, state, hyper, u_theta, u_state)
    theta_dot, G_dot, state_dot, hyper_dot = dots
    lhs = [(u_theta, theta_next_dot)] + [(u_state[k], state_next_dot[k]) for k in u_state]
    rhs = [(theta_bar, theta_dot), (G_bar, G_dot)] + [
        (state_bar.get(k, torch.zeros_like(v)), v) for k, v in state_dot.items()] + [
        (hyper_bar[n], v) for n, v in hyper_dot.items()]
    total = lambda pairs: sum((a * b).sum().item() for a, b in pairs)  # noqa: E731
    scale = sum((a.abs() * b.abs()).sum().item() for a, b in lhs + rhs)
    return total(lhs), total(rhs), scale


def assert_adjoint(row: Row, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                   gen: torch.Generator, where: str) -> None:
    lhs, rhs, scale = adjoint_gap(row, theta, G, state, hyper, gen)
    assert abs(lhs - rhs) <= ADJOINT_TOL * scale, (
        f"{row.id}, {where}: <u, J v> = {lhs!r}, <J^T u, v> = {rhs!r} (gap {abs(lhs - rhs) / scale:.2e} of {scale:.3e})")


def vmap_gap(jvp: Any, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
             gen: torch.Generator, m: int = M) -> float:
    """The largest relative difference between ``jvp`` under ``torch.func.vmap`` over a leading
    dimension of ``m`` tangent directions and ``m`` separate calls."""
    dots = random_dots(theta, G, state, hyper, gen, m)
    tn, sn = torch.func.vmap(jvp, in_dims=(None, None, None, None, 0, 0, 0, 0))(theta, G, state, hyper, *dots)
    err = 0.0
    for i in range(m):
        one = tuple(d[i] if isinstance(d, Tensor) else {k: v[i] for k, v in d.items()} for d in dots)
        tn_i, sn_i = jvp(theta, G, state, hyper, *one)
        assert tn.shape == (m, *tn_i.shape) and sorted(sn) == sorted(sn_i)
        err = max(err, rel_err(tn[i], tn_i), *(rel_err(sn[k][i], v) for k, v in sn_i.items()))
    return err


def single_directions(theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                      dots: Dots) -> list[tuple[str, Dots]]:
    """Each input's tangent alone (the others zero, or missing from the dicts)."""
    theta_dot, G_dot, state_dot, hyper_dot = dots
    zt, zg = torch.zeros_like(theta), torch.zeros_like(G)
    out = [("theta", (theta_dot, zg, {}, {})), ("G", (zt, G_dot, {}, {}))]
    out += [(f"state[{k!r}]", (zt, zg, {k: v}, {})) for k, v in state_dot.items()]
    out += [(f"hyper[{n!r}]", (zt, zg, {}, {n: v})) for n, v in hyper_dot.items()]
    return out


def _learn_sets() -> list[Any]:
    """(row, learned names): each hyperparameter alone, and all of them together."""
    out = []
    for row in ROWS:
        names = row.impl.hyper_names
        for learned_names, tag in [((n,), f"learn_{n}") for n in names] + [(names, "learn_all")]:
            out.append(pytest.param(row, learned_names, id=f"{row.id}-{tag}", marks=row.marks("jvp")))
    return out


# ---------------------------------------------------------------------------- the oracles
def test_every_built_in_optimizer_has_a_hand_written_jvp() -> None:
    for impl in BUILT_IN:
        assert impl.step_jvp is not None, f"{impl.name} has no hand-written step_jvp"
        assert impl.jvp is impl.step_jvp
        assert impl.step_jvp.__name__.endswith("_step_jvp") and impl.step_jvp.__doc__ and ".. math::" in impl.step_jvp.__doc__


@pytest.mark.parametrize("phase", list(WARMUPS))
@pytest.mark.parametrize("granularity", ["0d", "element"])
@pytest.mark.parametrize("row,learned_names", _learn_sets())
def test_jvp_matches_forward_mode(row: Row, learned_names: tuple[str, ...], granularity: str, phase: str) -> None:
    """Random tangents for θ, G, every state entry and every tensor hyperparameter; both param groups."""
    gen = torch.Generator().manual_seed(20)
    for group in (0, 1):
        for shape in row.shapes.vjp:
            theta, G, state, hyper = point(row, shape, WARMUPS[phase], gen, group)
            hyper = learn(hyper, learned_names, granularity, theta)
            dots = random_dots(theta, G, state, hyper, gen)
            assert_jvp_matches(row, theta, G, state, hyper, dots, f"group {group}, shape {shape}")


#: In :func:`test_jvp_of_each_input_alone`, each output's tangent is compared relative to at least
#: this share of its largest value over all the single directions at that point: an error at the
#: round-off of the largest tangents (``ROUND_OFF_SHARE * tol.vjp`` = 1e-15 of them, a few units in
#: the last place) passes where a direction's true tangent is 0 by cancellation (Adam's and NAdam's
#: bias-corrected second moment at the first step does not depend on beta2: v'/(1 - beta2^t) = g^2
#: at t = 1, so its two paths cancel exactly), and no wrong term is that small.
ROUND_OFF_SHARE = 1e-5


@pytest.mark.parametrize("phase", list(WARMUPS))
@pytest.mark.parametrize("granularity", ["0d", "element"])
@pytest.mark.parametrize("row", row_params("jvp"))
def test_jvp_of_each_input_alone(row: Row, granularity: str, phase: str) -> None:
    """Every hyperparameter learned; the tangent of one input at a time (the others zero or
    missing), so that no term of the JVP hides behind a larger one."""
    gen = torch.Generator().manual_seed(21)
    for group in (0, 1):
        for shape in row.shapes.vjp:
            theta, G, state, hyper = point(row, shape, WARMUPS[phase], gen, group)
            hyper = learn(hyper, row.impl.hyper_names, granularity, theta)
            singles = single_directions(theta, G, state, hyper, random_dots(theta, G, state, hyper, gen))
            refs = [forward_mode(row, theta, G, state, hyper, dots) for _, dots in singles]
            largest = {"theta": max(r[0].abs().max().item() for r in refs)}
            largest.update({k: max(r[1][k].abs().max().item() for r in refs) for k in refs[0][1]})
            floors = {k: ROUND_OFF_SHARE * v for k, v in largest.items()}
            for (name, dots), ref in zip(singles, refs):
                assert_jvp_matches(row, theta, G, state, hyper, dots, f"group {group}, shape {shape}, {name} alone",
                                   floors, ref)


@pytest.mark.parametrize("phase", list(WARMUPS))
@pytest.mark.parametrize("row", row_params("jvp"))
def test_jvp_fixed_hyper(row: Row, phase: str) -> None:
    """Float hyperparameters (no ``hyper_dot``), and an empty ``state_dot`` (missing entries are zero)."""
    gen = torch.Generator().manual_seed(22)
    for shape in row.shapes.vjp:
        theta, G, state, hyper = point(row, shape, WARMUPS[phase], gen)
        theta_dot, G_dot, state_dot, _ = random_dots(theta, G, state, hyper, gen)
        for sd in (state_dot, {}):
            assert_jvp_matches(row, theta, G, state, hyper, (theta_dot, G_dot, sd, {}), f"shape {shape}")
        zeros = {k: torch.zeros_like(v) for k, v in state_dot.items()}
        missing = row.impl.step_jvp(theta, G, state, hyper, theta_dot, G_dot, {}, {})
        given_zero = row.impl.step_jvp(theta, G, state, hyper, theta_dot, G_dot, zeros, {})
        assert torch.equal(missing[0], given_zero[0])
        assert all(torch.equal(v, given_zero[1][k]) for k, v in missing[1].items())


@pytest.mark.parametrize("row", row_params("jvp"))
def test_jvp_is_pure(row: Row) -> None:
    """``step_jvp`` changes none of its inputs (the engine reuses the tangents)."""
    gen = torch.Generator().manual_seed(23)
    shape = row.shapes.single
    theta, G, state, hyper = point(row, shape, 3, gen)
    hyper = learn(hyper, row.impl.hyper_names, "element", theta)
    theta_dot, G_dot, state_dot, hyper_dot = random_dots(theta, G, state, hyper, gen)
    inputs = [theta, G, theta_dot, G_dot] + [state[k] for k in tensor_keys(state)] + list(state_dot.values()) + [
        hyper[n] for n in learned(hyper)] + list(hyper_dot.values())
    before = [x.clone() for x in inputs]
    row.impl.step_jvp(theta, G, state, hyper, theta_dot, G_dot, state_dot, hyper_dot)
    assert all(torch.equal(a, b) for a, b in zip(before, inputs)), "step_jvp changed an input"


@pytest.mark.parametrize("phase", list(WARMUPS))
@pytest.mark.parametrize("granularity", ["float", "0d", "element"])
@pytest.mark.parametrize("row", row_params("jvp"))
def test_adjoint(row: Row, granularity: str, phase: str) -> None:
    """<u, J v> by the hand-written ``step_jvp`` equals <J^T u, v> by the hand-written ``step_vjp``."""
    gen = torch.Generator().manual_seed(24)
    for group in (0, 1):
        for shape in row.shapes.vjp:
            for _ in range(2):
                theta, G, state, hyper = point(row, shape, WARMUPS[phase], gen, group)
                hyper = learn(hyper, row.impl.hyper_names, granularity, theta)
                assert_adjoint(row, theta, G, state, hyper, gen, f"group {group}, shape {shape}")


@pytest.mark.parametrize("phase", list(WARMUPS))
@pytest.mark.parametrize("granularity", ["float", "0d", "element"])
@pytest.mark.parametrize("row", row_params("jvp"))
def test_jvp_under_vmap(row: Row, granularity: str, phase: str) -> None:
    """``torch.func.vmap`` over a leading dimension of M tangent directions (as the forward-mode
    engine calls it) equals M separate calls."""
    gen = torch.Generator().manual_seed(25)
    for shape in row.shapes.vjp:
        theta, G, state, hyper = point(row, shape, WARMUPS[phase], gen)
        hyper = learn(hyper, row.impl.hyper_names, granularity, theta)
        err = vmap_gap(row.impl.step_jvp, theta, G, state, hyper, gen)
        assert err <= VMAP_TOL, f"{row.id}, shape {shape}: vmap differs from separate calls by {err:.2e}"


@pytest.mark.parametrize("row", row_params("jvp"))
def test_derived_jvp_matches_the_hand_written_one(row: Row) -> None:
    """``derive_step_jvp`` of every built-in step (what ``DiffOptimizer.jvp`` falls back to) equals its
    hand-written JVP, under ``torch.no_grad()`` and vmap as the engine calls it (Note [Derived JVPs
    under no_grad])."""
    gen = torch.Generator().manual_seed(26)
    derived = derive_step_jvp(row.impl.step)
    for shape in row.shapes.vjp:
        theta, G, state, hyper = point(row, shape, 3, gen)
        hyper = learn(hyper, row.impl.hyper_names, "element", theta)
        dots = random_dots(theta, G, state, hyper, gen, M)
        vmapped = lambda f: torch.func.vmap(f, in_dims=(None, None, None, None, 0, 0, 0, 0))  # noqa: E731
        with torch.no_grad():
            ours = vmapped(row.impl.step_jvp)(theta, G, state, hyper, *dots)
            theirs = vmapped(derived)(theta, G, state, hyper, *dots)
        assert sorted(ours[1]) == sorted(theirs[1])
        for a, b, what in [(ours[0], theirs[0], "theta")] + [(ours[1][k], theirs[1][k], k) for k in ours[1]]:
            assert_rel(a, b, row.tol.vjp, f"{row.id}, shape {shape}: {what}", theta_floor(
                row, theta, G, state, hyper, tuple(d[0] if isinstance(d, Tensor) else {k: v[0] for k, v in d.items()}
                                                   for d in dots)) if what == "theta" else 0.0)


@pytest.mark.parametrize("row", row_params("jvp-random"))
@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.data(), warmup=st.integers(0, 4), granularity=st.sampled_from(["0d", "element"]),
       seed=st.integers(0, 2**16))
def test_jvp_random(row: Row, data: st.DataObject, warmup: int, granularity: str, seed: int) -> None:
    """Random hyperparameters and flags (the row's declaration), a random shape and warm-up, every
    hyperparameter learned: the JVP against forward mode, the adjoint test and vmap."""
    variant = data.draw(random_variant(row), label="row")
    shape = data.draw(row.shapes.strategy(), label="shape")
    gen = torch.Generator().manual_seed(seed)
    theta, G, state, hyper = point(variant, shape, warmup, gen)
    hyper = learn(hyper, variant.impl.hyper_names, granularity, theta)
    assert_jvp_matches(variant, theta, G, state, hyper, random_dots(theta, G, state, hyper, gen), "random")
    assert_adjoint(variant, theta, G, state, hyper, gen, "random")
    assert vmap_gap(variant.impl.step_jvp, theta, G, state, hyper, gen) <= VMAP_TOL


# ---------------------------------------------------------------------------- a registered optimizer
def lion_step_jvp(theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any], theta_dot: Tensor,
                  G_dot: Tensor, state_dot: dict[str, Tensor], hyper_dot: dict[str, Tensor]
                  ) -> tuple[Tensor, dict[str, Tensor]]:
    """Lion's JVP: sign() has derivative 0 away from 0, so G and m reach θ' only through the buffer."""
    m, b1, b2, lr, wd = state["exp_avg"], hyper["beta1"], hyper["beta2"], hyper["lr"], hyper["weight_decay"]
    c = b1 * m + (1 - b1) * G
    zero = torch.zeros_like(theta)
    lr_dot, wd_dot, b2_dot = (hyper_dot.get(n, zero) if isinstance(hyper[n], Tensor) else zero
                              for n in ("lr", "weight_decay", "beta2"))
    m_dot = state_dot.get("exp_avg", zero)
    theta_next_dot = theta_dot * (1 - lr * wd) - theta * (lr_dot * wd + lr * wd_dot) - lr_dot * torch.sign(c)
    return theta_next_dot, {"exp_avg": b2 * m_dot + (1 - b2) * G_dot + b2_dot * (m - G)}


def _register_lion(step_jvp: Any) -> Any:
    return register_optimizer(Lion, lion_step, lion_step_vjp, step_jvp=step_jvp,
                              hyper_names=("lr", "beta1", "beta2", "weight_decay"),
                              init_state=lambda p, h: {"exp_avg": torch.zeros_like(p)})


def _lion_point(gen: torch.Generator, shape: Sequence[int], granularity: str) -> tuple[Any, ...]:
    impl = get_optimizer(Lion)
    theta = random_like(shape, gen)
    hyper = dict(lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.1)
    state = impl.import_state({}, theta, hyper)
    for _ in range(2):
        theta, state = impl.step(theta, random_like(shape, gen), state, hyper)
    return theta, random_like(shape, gen), state, learn(hyper, impl.hyper_names, granularity, theta)


@pytest.mark.parametrize("granularity", ["float", "0d", "element"])
def test_registered_jvp_derived_and_hand_written(granularity: str) -> None:
    """Lion registered without a JVP gets one derived with ``torch.func.jvp``; registered with one, it
    keeps it. Both agree with forward mode, with each other (alone and under vmap), and the adjoint
    test holds against the hand-written VJP."""
    gen = torch.Generator().manual_seed(27)
    results = []
    for step_jvp in (None, lion_step_jvp):
        impl = _register_lion(step_jvp)
        try:
            assert impl.step_jvp is step_jvp and impl.has_hand_written_jvp == (step_jvp is not None)
            assert impl.jvp is impl.jvp and (step_jvp is None or impl.jvp is step_jvp)
            assert ("JVP derived" in impl.notes) == (step_jvp is None)
            row = Row(f"lion-{'hand' if step_jvp else 'derived'}", Lion, dict(lr=0.01, weight_decay=0.1))
            gen.manual_seed(27)
            out = []
            for shape in ((), (7,), (2, 3)):
                theta, G, state, hyper = _lion_point(gen, shape, granularity)
                dots = random_dots(theta, G, state, hyper, gen)
                ours = impl.jvp(theta, G, state, hyper, *dots)
                ref = forward_mode(row, theta, G, state, hyper, dots)
                # one Lion step and its tangent: a few products and sums of two terms, whose
                # condition the 10 bounds (β·m + (1 - β)·g with |m|, |g| of one size)
                tol = float64_rtol(terms=4, condition=10)
                assert_rel(ours[0], ref[0], tol, f"{row.id}: theta")
                assert_rel(ours[1]["exp_avg"], ref[1]["exp_avg"], tol, f"{row.id}: exp_avg")
                with torch.no_grad():
                    assert vmap_gap(impl.jvp, theta, G, state, hyper, gen) <= VMAP_TOL
                # the adjoint test between impl.jvp and the hand-written VJP
                v = random_dots(theta, G, state, hyper, gen)
                u = random_like(shape, gen), {"exp_avg": random_like(shape, gen)}
                Jv = impl.jvp(theta, G, state, hyper, *v)
                bars = impl.step_vjp(theta, G, state, hyper, *u)
                lhs = (u[0] * Jv[0]).sum() + (u[1]["exp_avg"] * Jv[1]["exp_avg"]).sum()
                rhs = (bars[0] * v[0]).sum() + (bars[1] * v[1]).sum() + (bars[2]["exp_avg"] * v[2]["exp_avg"]).sum() + sum(
                    (bars[3][n] * v[3][n]).sum() for n in v[3])
                # two sums of at most 6 products per element, over at most 7 elements: relative to
                # their magnitudes (+1: both may cancel to nothing), 6 * 7 terms
                assert abs((lhs - rhs).item()) <= float64_rtol(terms=6 * 7) * (abs(lhs.item()) + abs(rhs.item()) + 1.0)
                out.append(ours)
            results.append(out)
        finally:
            unregister_optimizer(Lion)
    for (t0, s0), (t1, s1) in zip(*results):
        tol = float64_rtol(terms=4, condition=10)  # as against forward mode above
        assert_rel(t0, t1, tol, "derived vs hand-written: theta")
        assert_rel(s0["exp_avg"], s1["exp_avg"], tol, "derived vs hand-written: exp_avg")


def test_register_optimizer_rejects_a_non_callable_jvp() -> None:
    with pytest.raises(TypeError, match="step_jvp"):
        _register_lion(step_jvp=42)
    with pytest.raises(TypeError, match="register_optimizer"):
        get_optimizer(Lion)


def test_derived_jvp_skips_float_and_none_state() -> None:
    """The step count (a Python float) and a lazy entry that is None (SGD's buffer before the first
    step) are constants of the derived JVP: no tangent in, none out."""
    sgd = get_optimizer(torch.optim.SGD)
    theta = torch.randn(4, dtype=DTYPE)
    hyper = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
    state = sgd.import_state({}, theta, hyper)
    assert state["momentum_buffer"] is None
    dots = (torch.ones_like(theta), torch.ones_like(theta), {}, {})
    tn, sn = derive_step_jvp(sgd.step)(theta, theta.flip(0), state, hyper, *dots)
    ours = sgd.step_jvp(theta, theta.flip(0), state, hyper, *dots)
    assert torch.equal(tn, ours[0]) and sorted(sn) == ["momentum_buffer"]
    adam = get_optimizer(torch.optim.Adam)
    ahyper = adam.read_hyper(torch.optim.Adam([torch.nn.Parameter(theta.clone())]).param_groups[0])
    astate = adam.import_state({}, theta, ahyper)
    tn, sn = derive_step_jvp(adam.step)(theta, theta.flip(0), astate, ahyper, *dots)
    assert "step" not in sn and sorted(sn) == ["exp_avg", "exp_avg_sq"]
