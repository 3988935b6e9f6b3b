# SPDX-License-Identifier: Apache-2.0
"""The optimizers whose step is not element-wise (Adafactor's factored moments, Muon's orthogonalisation), against every oracle."""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator, Sequence

import pytest
import torch
import torch.optim._muon as torch_muon
from torch import Tensor, nn

from gimli_bptt import GimliUpdater
from gimli_bptt.hyper import parse_learn
from gimli_bptt.optim import ADAFACTOR, MUON, get_optimizer
from gimli_bptt.optim.adafactor import _forward as adafactor_forward
from gimli_bptt.optim.muon import LrAdjustment, lr_ratio
from gimli_bptt.optim.muon import _forward as muon_forward
from gimli_bptt.testing import check_hypergradients
from optim_cases import DTYPE, OptimCase, assert_rel, learn, random_like, rel_err, tensor_keys
from problems import build_model, ce_loss, make_batches, two_groups

Adafactor, Muon = torch.optim.Adafactor, torch.optim.Muon

STEP_TOL = 1e-12
VJP_TOL = 1e-10
HYPERGRAD_TOL = 1e-9
STEPS = 20
#: torch.func.jvp goes through torch.jit.script inside torch, which warns that it is deprecated.
_JIT_WARNING = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

#: Parameter shapes of the two param groups: Adafactor's scalars and vectors keep a full second
#: moment, tensors of two or more dimensions row and column statistics (over the last two
#: dimensions); Muon's matrices are wide, tall (transposed), square, a row and a column.
GROUP_SHAPES: dict[type, tuple[tuple[tuple[int, ...], ...], ...]] = {
    Adafactor: (((), (3, 5), (2, 3, 4)), ((7,), (2, 1, 3), (6, 2))),
    Muon: (((3, 5), (6, 2)), ((4, 4), (1, 7), (7, 1))),
}
VJP_SHAPES: dict[type, list[tuple[int, ...]]] = {
    Adafactor: [(), (7,), (3, 5), (2, 3, 4)],
    Muon: [(3, 5), (6, 2), (4, 4)],
}

CASES: list[OptimCase] = [
    OptimCase("adafactor-default", Adafactor, dict(), dict(lr=0.005)),
    OptimCase("adafactor-wd-maximize", Adafactor, dict(lr=0.05, weight_decay=0.1, maximize=True),
              dict(lr=0.02, weight_decay=0.0)),
    # eps1 large enough to clamp some estimates; eps2 above the parameters' RMS in group 1 (the
    # step size then scales with eps2), below it in group 2; d = 1.2 clips some updates.
    OptimCase("adafactor-eps-d-beta2_decay", Adafactor, dict(lr=0.1, eps=(0.3, 2.0), d=1.2, beta2_decay=-0.5),
              dict(eps=(1.2, 1e-3), d=2.0, beta2_decay=-0.9)),
    OptimCase("muon-default", Muon, dict(), dict(lr=0.02)),
    OptimCase("muon-no_nesterov", Muon, dict(lr=0.02, nesterov=False, weight_decay=0.0),
              dict(momentum=0.5, weight_decay=0.05)),
    OptimCase("muon-match_rms_adamw-ns", Muon, dict(lr=0.01, adjust_lr_fn="match_rms_adamw", ns_steps=3),
              dict(ns_coefficients=(3.0, -3.2, 1.2), eps=1e-3)),
    # eps above the Frobenius norm of the update in group 1: the normalisation clamps.
    OptimCase("muon-eps_clamps", Muon, dict(lr=0.02, eps=10.0, adjust_lr_fn="original"), dict(eps=1e-7)),
]
ADAFACTOR_CASES = [c for c in CASES if c.torch_cls is Adafactor]
MUON_CASES = [c for c in CASES if c.torch_cls is Muon]


def _params(cases: Sequence[OptimCase]) -> list[Any]:
    return [pytest.param(c, id=c.id) for c in cases]


# --------------------------------------------------------------------------------------------
# torch's Muon in float64: the bfloat16 cast removed.
# --------------------------------------------------------------------------------------------


def _newtonschulz_float64(grad: Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                          eps: float) -> Tensor:
    """``torch.optim._muon._zeropower_via_newtonschulz`` line by line, with ``grad.clone()`` in
    place of ``grad.bfloat16()`` (so the iteration runs in the parameters' dtype)."""
    if ns_steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if len(grad.shape) != 2:
        raise ValueError("Input tensor gradient must be a 2D matrix")
    a, b, c = ns_coefficients
    ortho_grad = grad.clone()
    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    ortho_grad.div_(ortho_grad.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram_matrix = ortho_grad @ ortho_grad.T
        gram_update = torch.addmm(gram_matrix, gram_matrix, gram_matrix, beta=b, alpha=c)
        ortho_grad = torch.addmm(ortho_grad, gram_update, ortho_grad, beta=a)
    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    return ortho_grad


_original_newtonschulz = torch_muon._zeropower_via_newtonschulz


@contextlib.contextmanager
def muon_in_float64() -> Iterator[None]:
    """``torch.optim.Muon`` as it is, but with its Newton-Schulz iteration in float64."""
    original = torch_muon._zeropower_via_newtonschulz
    torch_muon._zeropower_via_newtonschulz = _newtonschulz_float64
    try:
        yield
    finally:
        torch_muon._zeropower_via_newtonschulz = original


def test_float64_muon_differs_from_torch_only_by_the_cast() -> None:
    """The float64 oracle is torch's iteration: cast to bfloat16 first, it gives torch's bits."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(6, 4, generator=gen, dtype=DTYPE)
    coeffs = (torch_muon.DEFAULT_A, torch_muon.DEFAULT_B, torch_muon.DEFAULT_C)
    theirs = torch_muon._zeropower_via_newtonschulz(X, coeffs, 5, 1e-7)
    assert theirs.dtype == torch.bfloat16
    assert torch.equal(_newtonschulz_float64(X.bfloat16(), coeffs, 5, 1e-7), theirs)
    ours = _newtonschulz_float64(X, coeffs, 5, 1e-7)
    assert ours.dtype == DTYPE and rel_err(theirs.double(), ours) > 0


# --------------------------------------------------------------------------------------------
# Oracle 1: the step against torch.optim, 20 steps, two param groups, every granularity.
# --------------------------------------------------------------------------------------------


def _torch_optimizer(case: OptimCase, params: Sequence[Tensor]) -> torch.optim.Optimizer:
    n1 = len(GROUP_SHAPES[case.torch_cls][0])
    return case.torch_cls([{"params": list(params[:n1])}, {"params": list(params[n1:]), **case.group2}],
                          **case.kwargs)


def _run_against_torch(case: OptimCase, *, warmup: int, granularity: str, bf16: bool = False,
                       seed: int = 0) -> float:
    """``warmup`` torch steps, ``import_state``, then :data:`STEPS` steps of both on the same
    gradients, comparing parameters and state after each to 1e-12.

    With ``bf16`` (Muon against ``torch.optim.Muon`` itself, Note [Muon in the parameters'
    dtype]) θ is compared differently. The gradients are given, so the momentum buffers and the
    updates u_j never see θ and still agree to 1e-12; θ_J differs from torch's only by the
    rounding of each step's Newton-Schulz output, e_j = (1 - ηλ) e_{j-1} + ηs (O_j - O_j^bf16),
    with O_j^bf16 torch's own bfloat16 iteration of u_j. So (1) a shadow of our step that uses
    O_j^bf16 in place of O_j must equal torch's θ to 1e-12 (everything but the cast agrees),
    and (2) our θ must be within Σ_j ηs max|O_j - O_j^bf16| of torch's (the tolerance is the
    rounding torch itself makes, measured on the same inputs), and not equal to it.
    Returns the largest |θ - θ_torch| per unit of accumulated update Σ_j ηs max|O_j| (bf16 only).
    """
    gen = torch.Generator().manual_seed(seed)
    shapes = [s for group in GROUP_SHAPES[case.torch_cls] for s in group]
    params = [nn.Parameter(random_like(s, gen)) for s in shapes]
    opt = _torch_optimizer(case, params)

    def torch_step() -> list[Tensor]:
        grads = [random_like(s, gen) for s in shapes]
        for p, G in zip(params, grads):
            p.grad = G.clone()
        opt.step()
        return grads

    impl = case.impl
    for _ in range(warmup):
        torch_step()
    group_of = {id(p): g for g, group in enumerate(opt.param_groups) for p in group["params"]}
    fixed, hyper, theta, state = [], [], [], []
    for p in params:
        h = impl.read_hyper(opt.param_groups[group_of[id(p)]])
        fixed.append(h)
        hyper.append(learn(h, impl.hyper_names, granularity, p))
        theta.append(p.detach().clone())
        state.append(impl.import_state(opt.state[p], p, h))
    shadow = [t.clone() for t in theta]
    bound, moved = [0.0] * len(params), [0.0] * len(params)
    drift = 0.0
    for j in range(STEPS):
        grads = torch_step()
        for k, (p, G) in enumerate(zip(params, grads)):
            where = f"{case.id}, {granularity}, step {j + 1}, param {k} {tuple(p.shape)}"
            if bf16:
                fh = fixed[k]
                f = muon_forward(theta[k], G, state[k], fh)
                O_bf16 = _original_newtonschulz(f["update"], (fh["ns_a"], fh["ns_b"], fh["ns_c"]), fh["ns_steps"],
                                                fh["eps"]).to(DTYPE)
                step_size = fh["lr"] * lr_ratio(p.shape, fh["adjust_lr_fn"])
                shadow[k] = shadow[k] * (1 - fh["lr"] * fh["weight_decay"]) - step_size * O_bf16
                bound[k] += step_size * (f["O"] - O_bf16).abs().max().item()
                moved[k] += step_size * f["O"].abs().max().item()
            theta[k], state[k] = impl.step(theta[k], G, state[k], hyper[k])
            assert theta[k].shape == p.shape and theta[k].dtype == p.dtype
            if bf16:
                assert_rel(shadow[k], p.detach(), STEP_TOL, f"{where}: theta with torch's bfloat16 Newton-Schulz")
                off = (theta[k] - p.detach()).abs().max().item()
                assert 0 < off <= bound[k] * (1 + 1e-9), (where, off, bound[k])
                drift = max(drift, off / moved[k])
            else:
                assert_rel(theta[k], p.detach(), STEP_TOL, f"{where}: theta")
            torch_state = opt.state[p]
            for key, value in torch_state.items():
                if key == "step":
                    assert float(state[k][key]) == float(value), where
                else:
                    assert_rel(state[k][key], value, STEP_TOL, f"{where}: state[{key!r}]")
            ours = {key for key, v in state[k].items() if v is not None}
            assert ours == set(torch_state), (where, sorted(ours), sorted(torch_state))
    return drift


@pytest.mark.parametrize("granularity", ["float", "0d", "element"])
@pytest.mark.parametrize("warmup", [0, 3], ids=["empty_state", "after_3_torch_steps"])
@pytest.mark.parametrize("case", _params(ADAFACTOR_CASES))
def test_adafactor_step_matches_torch(case: OptimCase, warmup: int, granularity: str) -> None:
    _run_against_torch(case, warmup=warmup, granularity=granularity)


@pytest.mark.parametrize("granularity", ["float", "0d", "element"])
@pytest.mark.parametrize("warmup", [0, 3], ids=["empty_state", "after_3_torch_steps"])
@pytest.mark.parametrize("case", _params(MUON_CASES))
def test_muon_step_matches_torch_in_float64(case: OptimCase, warmup: int, granularity: str) -> None:
    """Against torch.optim.Muon with its Newton-Schulz iteration in float64: to 1e-12."""
    with muon_in_float64():
        _run_against_torch(case, warmup=warmup, granularity=granularity)


@pytest.mark.parametrize("warmup", [0, 3], ids=["empty_state", "after_3_torch_steps"])
@pytest.mark.parametrize("case", _params(MUON_CASES))
def test_muon_step_matches_torch_to_bfloat16_rounding(case: OptimCase, warmup: int) -> None:
    """Against torch.optim.Muon itself (bfloat16 inside): the difference is the cast's rounding
    and nothing else (see :func:`_run_against_torch`). On these random matrices θ drifts from
    torch's by up to 6e-2 of the accumulated update: bfloat16 keeps 8 significant bits
    (u = 2^-8), and five iterations that multiply a small singular value by up to a ≈ 3.4 each
    amplify its rounding (the output of one iteration is off by up to 1e-1 relative)."""
    drift = _run_against_torch(case, warmup=warmup, granularity="float", bf16=True)
    assert drift > 0


# --------------------------------------------------------------------------------------------
# Oracle 2: step_vjp against autograd through step, and the dot-product test.
# --------------------------------------------------------------------------------------------


def _group_hyper(case: OptimCase, group: int, shape: Sequence[int]) -> dict[str, Any]:
    probe = [nn.Parameter(torch.zeros((2, 2) if case.torch_cls is Muon else (1,), dtype=DTYPE)) for _ in range(2)]
    opt = case.torch_cls([{"params": probe[:1]}, {"params": probe[1:], **case.group2}], **case.kwargs)
    return case.impl.read_hyper(opt.param_groups[group])


def _point(case: OptimCase, shape: Sequence[int], phase: str, gen: torch.Generator, group: int,
           learned: Sequence[str], granularity: str) -> tuple[Tensor, Tensor, dict[str, Any], dict[str, Any]]:
    """``(theta, G, state, hyper)`` at the first step (Adafactor's moments absent, Muon's buffer
    zero) or after 3 steps."""
    impl = case.impl
    hyper = _group_hyper(case, group, shape)
    theta = random_like(shape, gen)
    state = impl.import_state({}, theta, hyper)
    if phase == "after_3_steps":
        for _ in range(3):
            theta, state = impl.step(theta, random_like(shape, gen), state, hyper)
    return theta, random_like(shape, gen), state, learn(hyper, learned, granularity, theta)


def _learned(hyper: dict[str, Any]) -> list[str]:
    return sorted(n for n, v in hyper.items() if isinstance(v, Tensor))


def _autograd_vjp(case: OptimCase, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                  theta_next_bar: Tensor, state_next_bar: dict[str, Tensor]):
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


def _g_path(case: OptimCase, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
            theta_next_bar: Tensor) -> float:
    """The size of Adafactor's direct path of Ḡ, |θ̄'| α/D /√Q: at the first step a vector's
    estimate is g² itself, so U = g/|g| and the direct and the √Q paths of Ḡ cancel exactly;
    both sides are then accurate only relative to either path. 0 for Muon."""
    if case.torch_cls is not Adafactor:
        return 0.0
    with torch.no_grad():
        f = adafactor_forward(theta, G, state, hyper)
        return (theta_next_bar.abs() * f["step_size"] * f["rsqrt_Q"]).max().item()


def _assert_vjp_matches(case: OptimCase, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                        theta_next_bar: Tensor, state_next_bar: dict[str, Tensor], where: str) -> None:
    theta_bar, G_bar, state_bar, hyper_bar = case.impl.step_vjp(theta, G, state, hyper, theta_next_bar, state_next_bar)
    # the contract: one cotangent per tensor input shaped like it, none for the fixed floats
    assert theta_bar.shape == theta.shape and G_bar.shape == G.shape
    assert set(state_bar) <= set(tensor_keys(state)), (sorted(state_bar), tensor_keys(state))
    assert sorted(hyper_bar) == _learned(hyper), "hyper_bar needs one entry per tensor hyperparameter"
    for n, v in hyper_bar.items():
        assert v.shape == hyper[n].shape, (n, v.shape, hyper[n].shape)
    ref = _autograd_vjp(case, theta, G, state, hyper, theta_next_bar, state_next_bar)
    assert_rel(theta_bar, ref[0], VJP_TOL, f"{where}: theta_bar")
    assert_rel(G_bar, ref[1], VJP_TOL, f"{where}: G_bar", _g_path(case, theta, G, state, hyper, theta_next_bar))
    for k, r in ref[2].items():
        assert k not in state_bar or state_bar[k].shape == r.shape, k
        assert_rel(state_bar.get(k, torch.zeros_like(r)), r, VJP_TOL, f"{where}: state_bar[{k!r}]")
    for n, r in ref[3].items():
        assert_rel(hyper_bar[n], r, VJP_TOL, f"{where}: hyper_bar[{n!r}]")


def _learn_sets(cases: Sequence[OptimCase]) -> list[Any]:
    out = []
    for case in cases:
        names = case.impl.hyper_names
        out += [pytest.param(case, (n,), id=f"{case.id}-learn_{n}") for n in names]
        out.append(pytest.param(case, names, id=f"{case.id}-learn_all"))
    return out


@pytest.mark.parametrize("phase", ["first_step", "after_3_steps"])
@pytest.mark.parametrize("granularity", ["0d", "element"])
@pytest.mark.parametrize("case,learned", _learn_sets(CASES))
def test_vjp_matches_autograd(case: OptimCase, learned: tuple[str, ...], granularity: str, phase: str) -> None:
    """Random cotangents for θ' and every state entry; each hyperparameter alone and all together."""
    gen = torch.Generator().manual_seed(10)
    for group in (0, 1):
        for shape in VJP_SHAPES[case.torch_cls]:
            theta, G, state, hyper = _point(case, shape, phase, gen, group, learned, granularity)
            state_next = case.impl.step(theta, G, state, hyper)[1]
            bar = {k: random_like(state_next[k].shape, gen) for k in tensor_keys(state_next)}
            _assert_vjp_matches(case, theta, G, state, hyper, random_like(shape, gen), bar,
                                f"group {group}, shape {shape}")


@pytest.mark.parametrize("case", _params(CASES))
def test_vjp_fixed_hyper_and_missing_state_bar(case: OptimCase) -> None:
    """Float hyperparameters (no hyper_bar) and state_next_bar empty (missing entries are zero)."""
    gen = torch.Generator().manual_seed(11)
    for shape in VJP_SHAPES[case.torch_cls]:
        theta, G, state, hyper = _point(case, shape, "after_3_steps", gen, 0, (), "float")
        _assert_vjp_matches(case, theta, G, state, hyper, random_like(shape, gen), {}, f"shape {shape}")


def _dot_product_gap(case: OptimCase, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                     gen: torch.Generator) -> tuple[float, float, float]:
    """``(<u, J v>, <J^T u, v>, scale)`` for random directions v and cotangents u."""
    impl = case.impl
    skeys, hkeys = tensor_keys(state), _learned(hyper)
    out_keys = tensor_keys(impl.step(theta, G, state, hyper)[1])

    def f(theta: Tensor, G: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
        s = dict(state, **dict(zip(skeys, rest[: len(skeys)])))
        h = dict(hyper, **dict(zip(hkeys, rest[len(skeys):])))
        theta_next, state_next = impl.step(theta, G, s, h)
        return (theta_next, *[state_next[k] for k in out_keys])

    primals = (theta, G, *[state[k] for k in skeys], *[hyper[n] for n in hkeys])
    v = tuple(torch.randn(p.shape, generator=gen, dtype=DTYPE) for p in primals)
    outputs, Jv = torch.func.jvp(f, primals, v)
    u = [torch.randn(o.shape, generator=gen, dtype=DTYPE) for o in outputs]
    theta_bar, G_bar, state_bar, hyper_bar = impl.step_vjp(theta, G, state, hyper, u[0], dict(zip(out_keys, u[1:])))
    bars = [theta_bar, G_bar] + [state_bar.get(k, torch.zeros_like(state[k])) for k in skeys] + [
        hyper_bar[n] for n in hkeys]
    lhs = sum((a * b).sum() for a, b in zip(u, Jv)).item()
    rhs = sum((a * b).sum() for a, b in zip(bars, v)).item()
    scale = sum((a.abs() * b.abs()).sum().item() for a, b in zip(u, Jv)) + sum(
        (a.abs() * b.abs()).sum().item() for a, b in zip(bars, v))
    return lhs, rhs, scale


@_JIT_WARNING
@pytest.mark.parametrize("phase", ["first_step", "after_3_steps"])
@pytest.mark.parametrize("granularity", ["float", "0d", "element"])
@pytest.mark.parametrize("case", _params(CASES))
def test_dot_product(case: OptimCase, granularity: str, phase: str) -> None:
    gen = torch.Generator().manual_seed(13)
    for group in (0, 1):
        for shape in VJP_SHAPES[case.torch_cls]:
            theta, G, state, hyper = _point(case, shape, phase, gen, group, case.impl.hyper_names, granularity)
            lhs, rhs, scale = _dot_product_gap(case, theta, G, state, hyper, gen)
            assert abs(lhs - rhs) <= VJP_TOL * scale, f"shape {shape}: <u, Jv> = {lhs!r}, <J^T u, v> = {rhs!r}"


# --------------------------------------------------------------------------------------------
# Oracle 3: hypergradients through GimliUpdater against the full autograd unroll, and against
# central differences of real training runs.
# --------------------------------------------------------------------------------------------


def _muon_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 5, bias=False), nn.Tanh(), nn.Linear(5, 3, bias=False)).double()


#: (id, model, torch class, kwargs, overrides of the second param group)
_HYPERGRAD_CONFIGS = [
    ("adafactor-mlp", "mlp", Adafactor, dict(lr=0.05), dict(lr=0.02)),
    ("adafactor-conv-active", "conv", Adafactor, dict(lr=0.05, eps=(3e-3, 0.05), d=1.3, weight_decay=0.05,
                                                      beta2_decay=-0.6), dict(eps=(None, 1e-3), d=1.0)),
    ("muon-matrices", "muon_mlp", Muon, dict(lr=0.05, weight_decay=0.1), dict(lr=0.02, momentum=0.8)),
    ("muon-no_nesterov-match_rms", "muon_mlp", Muon,
     dict(lr=0.05, nesterov=False, adjust_lr_fn="match_rms_adamw", ns_steps=4, eps=1e-3), dict(weight_decay=0.0)),
]


def _updater(arch: str, cls: type, kwargs: dict[str, Any], group2: dict[str, Any], learn: dict[str, str],
             seed: int = 1, unroll: int = 4) -> GimliUpdater:
    model = _muon_model(seed) if arch == "muon_mlp" else build_model(arch, seed)
    groups = two_groups(model)
    groups[-1].update(group2)
    opt = cls(groups, **kwargs)
    return GimliUpdater(model, opt, ce_loss, ce_loss, unroll=unroll, learn=learn, learn_init=True)


@pytest.mark.parametrize("granularity", ["group", "tensor", "element"])
@pytest.mark.parametrize("cfg", _HYPERGRAD_CONFIGS, ids=[c[0] for c in _HYPERGRAD_CONFIGS])
def test_hypergradients_match_autograd_unroll(cfg: tuple, granularity: str) -> None:
    """Every learnable hyperparameter at once, and θ_0, against the full autograd unroll."""
    _, arch, cls, kwargs, group2 = cfg
    names = get_optimizer(cls).hyper_names
    updater = _updater(arch, cls, kwargs, group2, {n: granularity for n in names})
    batches, val = make_batches(4, seed=1)
    errors = check_hypergradients(updater, batches, val)
    assert set(errors) >= set(names) and any(k.startswith("init.") for k in errors)
    assert max(errors.values()) <= HYPERGRAD_TOL, errors


def test_muon_hypergradients_with_biases_outside_the_optimizer() -> None:
    """Muon over the weight matrices only: the biases stay fixed in the inner loop and are
    learned as initial values (learn_init)."""
    model = build_model("mlp", seed=2)
    weights = [p for p in model.parameters() if p.dim() == 2]
    opt = Muon(weights, lr=0.05, weight_decay=0.05)
    learn = {n: g for n, g in zip(MUON.hyper_names, ["group", "tensor", "element"] * 3)}
    updater = GimliUpdater(model, opt, ce_loss, ce_loss, unroll=3, learn=learn, learn_init=True)
    batches, val = make_batches(3, seed=2)
    errors = check_hypergradients(updater, batches, val)
    assert {"init.1.bias", "init.3.bias"} <= set(errors)
    assert max(errors.values()) <= HYPERGRAD_TOL, errors


def _finite_difference_check(cls: type, kwargs: dict[str, Any], names: Sequence[str], seed: int,
                             context: Any = contextlib.nullcontext) -> None:
    """Hypergradients of a 4-step unroll from a fresh state against central differences of the
    validation loss after 4 steps of the real ``cls``."""
    model = _muon_model(seed) if cls is Muon else build_model("mlp", seed)
    batches, val = make_batches(4, seed=seed)
    impl = get_optimizer(cls)
    m = copy.deepcopy(model)
    probe = cls(m.parameters(), **kwargs)
    base = impl.read_hyper(probe.param_groups[0])
    ours = GimliUpdater(m, probe, ce_loss, ce_loss, unroll=4, learn={n: "group" for n in names}
                        ).hypergradient(batches, val).hypergrads

    def val_loss(name: str, value: float) -> float:
        mm = copy.deepcopy(model)
        opt = cls(mm.parameters(), **kwargs)
        impl.write_hyper(opt.param_groups[0], name, value)
        with context():
            for batch in batches:
                opt.zero_grad()
                ce_loss(mm, batch).backward()
                opt.step()
        with torch.no_grad():
            return float(ce_loss(mm, val))

    def central(name: str, h: float) -> float:
        return (val_loss(name, base[name] + h) - val_loss(name, base[name] - h)) / (2 * h)

    for name in names:
        # Richardson's extrapolation of two central differences: O(h^4). The Newton-Schulz
        # polynomial is so curved in its coefficients that one central difference with
        # h = 1e-4 |a| is off by 2e-4 relative (O(h^2)).
        h = 1e-4 * abs(base[name])
        fd = (4 * central(name, h / 2) - central(name, h)) / 3
        assert fd != 0.0, name
        assert abs(float(ours[name][0]) - fd) <= 1e-5 * max(abs(fd), 1e-6), (name, float(ours[name][0]), fd)


def test_adafactor_hypergradients_match_finite_differences_of_torch_optim() -> None:
    """torch.optim.Adafactor itself; eps2 above the parameters' RMS so that it has a path."""
    _finite_difference_check(Adafactor, dict(lr=0.05, eps=(None, 0.3), d=1.3, weight_decay=0.05, beta2_decay=-0.7),
                             ("lr", "beta2_decay", "eps2", "d", "weight_decay"), seed=5)


def test_muon_hypergradients_match_finite_differences_of_float64_muon() -> None:
    """torch.optim.Muon with its iteration in float64 (differences of the bfloat16 one would
    measure its rounding, not its derivative)."""
    _finite_difference_check(Muon, dict(lr=0.05, weight_decay=0.1), ("lr", "momentum", "weight_decay", "ns_a", "ns_c"),
                             seed=5, context=muon_in_float64)


# --------------------------------------------------------------------------------------------
# opt.state[p] in and out.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _params([CASES[0], CASES[2], CASES[3], CASES[5]]))
def test_state_round_trip_through_torch(case: OptimCase) -> None:
    """``import_state`` of torch's state after 3 steps, ``export_state`` loaded into a fresh torch
    optimizer (``load_state_dict``): the same next step as the original optimizer, and ours."""
    gen = torch.Generator().manual_seed(3)
    shapes = [s for group in GROUP_SHAPES[case.torch_cls] for s in group]
    params = [nn.Parameter(random_like(s, gen)) for s in shapes]
    opt = _torch_optimizer(case, params)
    for _ in range(3):
        for p in params:
            p.grad = random_like(p.shape, gen)
        opt.step()
    impl = case.impl
    group_of = {id(p): g for g, group in enumerate(opt.param_groups) for p in group["params"]}
    hyper = [impl.read_hyper(opt.param_groups[group_of[id(p)]]) for p in params]
    ours = [impl.import_state(opt.state[p], p, h) for p, h in zip(params, hyper)]
    exported = [impl.export_state(s, p) for s, p in zip(ours, params)]
    for p, e in zip(params, exported):
        assert set(e) == set(opt.state[p])
        for key, value in opt.state[p].items():
            assert e[key].dtype == value.dtype and e[key].shape == value.shape and torch.equal(e[key], value), key
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    fresh = _torch_optimizer(case, twins)
    sd = opt.state_dict()
    sd["state"] = {i: e for i, e in enumerate(exported)}
    fresh.load_state_dict(sd)
    grads = [random_like(p.shape, gen) for p in params]
    theta_ours = [p.detach().clone() for p in params]
    for k, (p, t, G) in enumerate(zip(params, twins, grads)):
        p.grad, t.grad = G.clone(), G.clone()
        theta_ours[k], _ = impl.step(theta_ours[k], G, ours[k], hyper[k])
    with muon_in_float64() if case.torch_cls is Muon else contextlib.nullcontext():
        opt.step()
        fresh.step()
    for p, t, mine in zip(params, twins, theta_ours):
        assert torch.equal(p, t)
        assert_rel(mine, p.detach(), STEP_TOL, f"{case.id}: our next step")


# --------------------------------------------------------------------------------------------
# What only these two have.
# --------------------------------------------------------------------------------------------


def test_adafactor_factors_tensors_of_two_or_more_dimensions() -> None:
    """Row and column statistics over the last two dimensions for ≥ 2-D, the full second moment
    for vectors and scalars: as torch keeps them, and created at the first step."""
    shapes = [(), (7,), (3, 5), (2, 1, 3), (2, 3, 4)]
    params = [nn.Parameter(torch.randn(s, dtype=DTYPE)) for s in shapes]
    opt = Adafactor(params)
    for p in params:
        p.grad = torch.randn(p.shape, dtype=DTYPE)
    opt.step()
    hyper = ADAFACTOR.read_hyper(opt.param_groups[0])
    for p in params:
        fresh = ADAFACTOR.import_state({}, p, hyper)
        assert fresh["step"] == 0.0 and all(fresh[k] is None for k in ("row_var", "col_var", "variance"))
        _, state = ADAFACTOR.step(p.detach(), p.grad, fresh, hyper)
        present = {k: v.shape for k, v in state.items() if isinstance(v, Tensor)}
        assert present == {k: v.shape for k, v in opt.state[p].items() if k != "step"}, p.shape
        if p.dim() >= 2:
            assert present["row_var"] == p.shape[:-1] + (1,) and present["col_var"] == p.shape[:-2] + (1, p.shape[-1])
        else:
            assert present == {"variance": p.shape}


def test_adafactor_eps1_none_reads_as_the_dtype_eps() -> None:
    """Note [Adafactor's eps1 when None]: the machine epsilon of the group's dtype; a learned
    value written back replaces the None."""
    for dtype in (torch.float32, torch.float64):
        opt = Adafactor([nn.Parameter(torch.zeros(3, dtype=dtype))])
        assert opt.param_groups[0]["eps"][0] is None
        assert ADAFACTOR.read_hyper(opt.param_groups[0])["eps1"] == torch.finfo(dtype).eps
    opt = Adafactor([nn.Parameter(torch.zeros(3, dtype=DTYPE))], eps=(None, 0.01))
    ADAFACTOR.write_hyper(opt.param_groups[0], "eps1", 1e-5)
    assert opt.param_groups[0]["eps"] == (1e-5, 0.01)
    assert ADAFACTOR.read_hyper(opt.param_groups[0])["eps1"] == 1e-5


def test_adafactor_declaration() -> None:
    h = {x.name: x for x in ADAFACTOR.hyper}
    assert ADAFACTOR.hyper_names == ("lr", "beta2_decay", "eps1", "eps2", "d", "weight_decay")
    assert (h["eps1"].key, h["eps1"].index, h["eps2"].key, h["eps2"].index) == ("eps", 0, "eps", 1)
    assert (h["beta2_decay"].low, h["beta2_decay"].high, h["d"].low) == (None, 0.0, 1.0)
    assert not ADAFACTOR.elementwise and ADAFACTOR.flag_names == ("maximize",)


def test_muon_declaration_and_lr_adjustment() -> None:
    h = {x.name: x for x in MUON.hyper}
    assert MUON.hyper_names == ("lr", "weight_decay", "momentum", "eps", "ns_a", "ns_b", "ns_c")
    assert [(h[n].key, h[n].index) for n in ("ns_a", "ns_b", "ns_c")] == [("ns_coefficients", i) for i in range(3)]
    assert not MUON.elementwise and set(MUON.flag_names) == {"nesterov", "ns_steps", "adjust_lr_fn"}
    opt = Muon([nn.Parameter(torch.zeros(2, 3, dtype=DTYPE))])
    hyper = MUON.read_hyper(opt.param_groups[0])
    assert hyper["adjust_lr_fn"] == "original" and hyper["ns_steps"] == 5 and hyper["nesterov"] is True
    assert (hyper["ns_a"], hyper["ns_b"], hyper["ns_c"]) == opt.param_groups[0]["ns_coefficients"]
    for shape in [(3, 5), (6, 2), (4, 4)]:
        for fn in (None, "original", "match_rms_adamw"):
            assert lr_ratio(torch.Size(shape), fn) == torch_muon._adjust_lr(1.0, fn, torch.Size(shape))
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        LrAdjustment("rms")
    with pytest.raises(ValueError, match="cannot learn 'ns_steps'"):
        parse_learn(MUON, {"ns_steps": "group"})


def test_muon_rejects_a_parameter_that_is_not_a_matrix() -> None:
    """torch.optim.Muon checks only the parameters it is built with; one added later reaches
    GimliUpdater, which names it and the fix."""
    model = build_model("mlp", seed=0)
    opt = Muon([p for p in model.parameters() if p.dim() == 2])
    opt.add_param_group({"params": [model[1].bias]})
    with pytest.raises(ValueError, match=r"Muon only takes 2-D parameters, but parameter '1.bias' has shape \(5,\)"
                       r".*second optimizer for the rest, or Adam/AdamW for everything"):
        GimliUpdater(model, opt, ce_loss, ce_loss, unroll=1, learn={"lr": "group"})
    with pytest.raises(ValueError, match="Muon only takes 2-D parameters"):
        MUON.check_param("w", torch.zeros(2, 3, 4))
    MUON.check_param("w", torch.zeros(2, 3))


def test_muon_per_element_coefficients_are_the_shared_polynomial() -> None:
    """Note [Per-element Newton-Schulz coefficients]: b and c per element, all equal, give the
    step of the shared values; with different values the VJP still matches autograd."""
    gen = torch.Generator().manual_seed(4)
    case = MUON_CASES[0]
    for shape in [(3, 5), (6, 2)]:
        theta, G, state, hyper = _point(case, shape, "after_3_steps", gen, 0, ("ns_b", "ns_c"), "0d")
        shared = MUON.step(theta, G, state, hyper)[0]
        element = MUON.step(theta, G, state, learn(hyper, ("ns_b", "ns_c"), "element", theta))[0]
        assert_rel(element, shared, STEP_TOL, f"shape {shape}")
        varied = learn(hyper, MUON.hyper_names, "element", theta)
        for n in ("ns_a", "ns_b", "ns_c", "eps", "lr"):
            varied[n] = varied[n] * (1 + 0.05 * torch.randn(shape, generator=gen, dtype=DTYPE))
        bar = {"momentum_buffer": random_like(shape, gen)}
        _assert_vjp_matches(case, theta, G, state, varied, random_like(shape, gen), bar, f"varied, shape {shape}")


def test_adafactor_per_element_beta2_decay_on_factored_moments() -> None:
    """Note [Per-element beta2_decay on factored moments]: equal values give torch's factored
    update; varied values are differentiated exactly."""
    gen = torch.Generator().manual_seed(5)
    case = ADAFACTOR_CASES[0]
    for shape in [(3, 5), (2, 3, 4), (7,)]:
        theta, G, state, hyper = _point(case, shape, "after_3_steps", gen, 0, ("beta2_decay",), "0d")
        shared = ADAFACTOR.step(theta, G, state, hyper)
        element = ADAFACTOR.step(theta, G, state, learn(hyper, ("beta2_decay",), "element", theta))
        assert_rel(element[0], shared[0], STEP_TOL, f"shape {shape}")
        for k in tensor_keys(shared[1]):
            assert_rel(element[1][k], shared[1][k], STEP_TOL, f"shape {shape}: {k}")
        varied = learn(hyper, ADAFACTOR.hyper_names, "element", theta)
        for n in ("beta2_decay", "eps2", "lr", "d"):
            varied[n] = varied[n] * (1 + 0.1 * torch.rand(shape, generator=gen, dtype=DTYPE))
        state_next = ADAFACTOR.step(theta, G, state, varied)[1]
        bar = {k: random_like(state_next[k].shape, gen) for k in tensor_keys(state_next)}
        _assert_vjp_matches(case, theta, G, state, varied, random_like(shape, gen), bar, f"varied, shape {shape}")
