# SPDX-License-Identifier: Apache-2.0
"""The optimizers whose step is not element-wise (Adafactor's factored moments, Muon's orthogonalisation): what the table's oracles do not cover."""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.optim._muon as torch_muon
from torch import Tensor, nn

from gimli_bptt import GimliUpdater
from gimli_bptt.testing import float64_rtol
from gimli_bptt.metaparams import parse_learn
from gimli_bptt.optim import ADAFACTOR, MUON
from gimli_bptt.optim.muon import LrAdjustment, lr_ratio
from gimli_bptt.optim.muon import _forward as muon_forward
from gimli_bptt.testing import check_hypergradients
from optim_table import (DTYPE, Row, assert_rel, learn, newtonschulz_float64, random_like, rel_err,
                         row, rows, tensor_keys, without_bfloat16_cast)
from problems import build_model, ce_loss, make_batches

Adafactor, Muon = torch.optim.Adafactor, torch.optim.Muon

#: Muon and Adafactor rows: as optim_table.Tolerances.step (measured growth <= 6.1 over 20 steps, bound 1e3)
STEP_TOL = float64_rtol(terms=1, condition=1e3)
VJP_TOL = 1e-10
HYPERGRAD_TOL = 1e-9
STEPS = 20
MUON_ROWS = rows(cls=Muon)


def _params(selected: list[Row]) -> list[Any]:
    return [pytest.param(r, id=r.id) for r in selected]


# --------------------------------------------------------------------------------------------
# Muon against torch.optim.Muon itself: the bfloat16 cast is the only difference.
# --------------------------------------------------------------------------------------------

_bfloat16_newtonschulz = torch_muon._zeropower_via_newtonschulz


def test_float64_reference_is_torch_without_the_cast() -> None:
    """The reference of the table's Muon rows (``without_bfloat16_cast``) is torch's iteration:
    given a bfloat16 input it makes torch's bits; in float64 it differs from torch's result."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(6, 4, generator=gen, dtype=DTYPE)
    coeffs = (torch_muon.DEFAULT_A, torch_muon.DEFAULT_B, torch_muon.DEFAULT_C)
    theirs = _bfloat16_newtonschulz(X, coeffs, 5, 1e-7)
    assert theirs.dtype == torch.bfloat16
    assert torch.equal(newtonschulz_float64(X.bfloat16(), coeffs, 5, 1e-7), theirs)
    ours = newtonschulz_float64(X, coeffs, 5, 1e-7)
    assert ours.dtype == DTYPE and rel_err(theirs.double(), ours) > 0
    with without_bfloat16_cast():
        assert torch_muon._zeropower_via_newtonschulz is newtonschulz_float64
    assert torch_muon._zeropower_via_newtonschulz is _bfloat16_newtonschulz


def _drift_from_bfloat16_torch(r: Row, warmup: int, seed: int = 0) -> float:
    """:data:`STEPS` steps of ours and of ``torch.optim.Muon`` itself (bfloat16 inside) on the same
    gradients, after ``warmup`` torch steps.

    The gradients are given, so the momentum buffers and the updates u_j never see θ and agree to
    1e-12; θ_J differs from torch's only by the rounding of each step's Newton-Schulz output,
    e_j = (1 - ηλ) e_{j-1} + ηs (O_j - O_j^bf16), with O_j^bf16 torch's own bfloat16 iteration of
    u_j. So (1) a shadow of our step that uses O_j^bf16 in place of O_j equals torch's θ to 1e-12
    (everything but the cast agrees), and (2) our θ is within Σ_j ηs max|O_j - O_j^bf16| of
    torch's (the tolerance is the rounding torch itself makes, measured on the same inputs), and
    not equal to it. Returns the largest |θ - θ_torch| per unit of accumulated update
    Σ_j ηs max|O_j|.
    """
    gen = torch.Generator().manual_seed(seed)
    by_group = [[nn.Parameter(random_like(s, gen)) for s in g] for g in r.shapes.groups]
    params = [p for g in by_group for p in g]
    opt = r.torch_optimizer(by_group)
    impl = r.impl

    def torch_step() -> list[Tensor]:
        grads = [random_like(p.shape, gen) for p in params]
        for p, G in zip(params, grads):
            p.grad = G.clone()
        opt.step()
        return grads

    for _ in range(warmup):
        torch_step()
    hyper = {id(p): impl.read_hyper(g) for g in opt.param_groups for p in g["params"]}
    theta = [p.detach().clone() for p in params]
    state = [impl.import_state(opt.state[p], p, hyper[id(p)]) for p in params]
    shadow = [t.clone() for t in theta]
    bound, moved = [0.0] * len(params), [0.0] * len(params)
    drift = 0.0
    for j in range(STEPS):
        grads = torch_step()
        for k, (p, G) in enumerate(zip(params, grads)):
            h, where = hyper[id(p)], f"{r.id}, step {warmup + j + 1}, param {k} {tuple(p.shape)}"
            f = muon_forward(theta[k], G, state[k], h)
            O_bf16 = _bfloat16_newtonschulz(f["update"], (h["ns_a"], h["ns_b"], h["ns_c"]), h["ns_steps"],
                                            h["eps"]).to(DTYPE)
            step_size = h["lr"] * lr_ratio(p.shape, h["adjust_lr_fn"])
            shadow[k] = shadow[k] * (1 - h["lr"] * h["weight_decay"]) - step_size * O_bf16
            bound[k] += step_size * (f["O"] - O_bf16).abs().max().item()
            moved[k] += step_size * f["O"].abs().max().item()
            theta[k], state[k] = impl.step(theta[k], G, state[k], h)
            assert_rel(shadow[k], p.detach(), STEP_TOL, f"{where}: θ with torch's bfloat16 Newton-Schulz")
            assert_rel(state[k]["momentum_buffer"], opt.state[p]["momentum_buffer"], STEP_TOL, f"{where}: buffer")
            off = (theta[k] - p.detach()).abs().max().item()
            assert 0 < off <= bound[k] * (1 + 1e-9), (where, off, bound[k])
            drift = max(drift, off / moved[k])
    return drift


@pytest.mark.parametrize("warmup", [0, 3], ids=["empty_state", "after_3_torch_steps"])
@pytest.mark.parametrize("r", _params(MUON_ROWS))
def test_muon_differs_from_torch_by_the_bfloat16_rounding_alone(r: Row, warmup: int) -> None:
    """Note [Muon in the parameters' dtype], for every Muon row. On these random matrices θ drifts
    from torch's by up to 1.2e-1 of the accumulated update: bfloat16 keeps 8 significant bits
    (u = 2^-8), and five iterations that multiply a small singular value by up to a ≈ 3.4 each
    amplify its rounding (the output of one iteration is off by up to 1e-1 of its largest entry)."""
    assert _drift_from_bfloat16_torch(r, warmup) > 0


# --------------------------------------------------------------------------------------------
# Hypergradients of Muon over two matrices in two param groups (the table's BatchNorm conv net
# gives Muon one matrix), and opt.state[p] through torch's state_dict.
# --------------------------------------------------------------------------------------------


def _matrices_only(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 5, bias=False), nn.Tanh(), nn.Linear(5, 3, bias=False)).double()


@pytest.mark.parametrize("granularity", ["group", "tensor", "element"])
@pytest.mark.parametrize("r", _params([row("muon-default"), row("muon-no_nesterov"), row("muon-match_rms_adamw-ns")]))
def test_muon_hypergradients_on_a_model_of_matrices(r: Row, granularity: str) -> None:
    """Every learnable hyperparameter at once, and θ_0, against the full autograd unroll."""
    model = _matrices_only(1)
    opt = r.for_model(model)
    assert len(opt.param_groups) == 2
    updater = GimliUpdater(model, opt, ce_loss, ce_loss, unroll=4, learn={n: granularity for n in MUON.hyper_names},
                           learn_init=True)
    errors = check_hypergradients(updater, *make_batches(4, seed=1))
    assert set(errors) >= set(MUON.hyper_names) and any(k.startswith("init.") for k in errors)
    assert max(errors.values()) <= HYPERGRAD_TOL, errors


@pytest.mark.parametrize("r", _params([row("adafactor-default"), row("adafactor-eps-d-beta2_decay"),
                                       row("muon-default"), row("muon-match_rms_adamw-ns")]))
def test_state_round_trip_through_torch_state_dict(r: Row) -> None:
    """``import_state`` of torch's state after 3 steps is what torch keeps: ``export_state`` gives
    its entries back bit for bit (the step count in torch's scalar dtype), a fresh torch optimizer
    that loads them (``load_state_dict``) takes the original's next step, and so do we."""
    gen = torch.Generator().manual_seed(3)
    by_group = [[nn.Parameter(random_like(s, gen)) for s in g] for g in r.shapes.groups]
    params = [p for g in by_group for p in g]
    opt = r.torch_optimizer(by_group)
    with r.torch_context():
        for _ in range(3):
            for p in params:
                p.grad = random_like(p.shape, gen)
            opt.step()
    impl = r.impl
    hyper = {id(p): impl.read_hyper(g) for g in opt.param_groups for p in g["params"]}
    ours = [impl.import_state(opt.state[p], p, hyper[id(p)]) for p in params]
    exported = [impl.export_state(s, p) for s, p in zip(ours, params)]
    for p, e in zip(params, exported):
        assert set(e) == set(opt.state[p])
        for key, value in opt.state[p].items():
            assert e[key].dtype == value.dtype and e[key].shape == value.shape and torch.equal(e[key], value), key
    twins = [[nn.Parameter(p.detach().clone()) for p in g] for g in by_group]
    fresh = r.torch_optimizer(twins)
    sd = opt.state_dict()
    sd["state"] = dict(enumerate(exported))
    fresh.load_state_dict(sd)
    grads = [random_like(p.shape, gen) for p in params]
    theta = [p.detach().clone() for p in params]
    for k, (p, t, G) in enumerate(zip(params, [t for g in twins for t in g], grads)):
        p.grad, t.grad = G.clone(), G.clone()
        theta[k], _ = impl.step(theta[k], G, ours[k], hyper[id(p)])
    with r.torch_context():
        opt.step()
        fresh.step()
    for p, t, mine in zip(params, [t for g in twins for t in g], theta):
        assert torch.equal(p, t)
        assert_rel(mine, p.detach(), STEP_TOL, f"{r.id}: our next step")


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


def _point(r: Row, shape: tuple[int, ...], gen: torch.Generator, learned: tuple[str, ...]
           ) -> tuple[Tensor, Tensor, dict[str, Any], dict[str, Any]]:
    """``(theta, G, state, hyper)`` after 3 of our steps, ``learned`` as 0-d tensors."""
    hyper = r.hyper(0)
    theta = random_like(shape, gen)
    state = r.impl.import_state({}, theta, hyper)
    for _ in range(3):
        theta, state = r.impl.step(theta, random_like(shape, gen), state, hyper)
    return theta, random_like(shape, gen), state, learn(hyper, learned, "0d", theta)


def _assert_vjp_matches_autograd(r: Row, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                                 gen: torch.Generator, where: str) -> None:
    """``step_vjp`` against ``torch.autograd.grad`` through ``step``, random cotangents for θ' and
    every state entry (relative to the row's floors)."""
    theta_next_bar = random_like(theta.shape, gen)
    state_next = r.impl.step(theta, G, state, hyper)[1]
    state_next_bar = {k: random_like(state_next[k].shape, gen) for k in tensor_keys(state_next)}
    theta_bar, G_bar, state_bar, hyper_bar = r.impl.step_vjp(theta, G, state, hyper, theta_next_bar, state_next_bar)
    leaf = lambda x: x.detach().clone().requires_grad_(True)  # noqa: E731
    t, g = leaf(theta), leaf(G)
    st = {k: (leaf(v) if isinstance(v, Tensor) else v) for k, v in state.items()}
    hy = {k: (leaf(v) if isinstance(v, Tensor) else v) for k, v in hyper.items()}
    t_next, s_next = r.impl.step(t, g, st, hy)
    out = (t_next * theta_next_bar).sum() + sum((s_next[k] * b).sum() for k, b in state_next_bar.items())
    skeys, hkeys = tensor_keys(st), sorted(n for n, v in hy.items() if isinstance(v, Tensor))
    grads = torch.autograd.grad(out, [t, g] + [st[k] for k in skeys] + [hy[n] for n in hkeys])
    floors = {} if r.floors is None else r.floors(r, theta, G, state, hyper, theta_next_bar)
    assert sorted(hyper_bar) == hkeys
    assert_rel(theta_bar, grads[0], VJP_TOL, f"{where}: theta_bar")
    assert_rel(G_bar, grads[1], VJP_TOL, f"{where}: G_bar", floors.get("G", 0.0))
    for k, ref in zip(skeys, grads[2:2 + len(skeys)]):
        assert_rel(state_bar[k], ref, VJP_TOL, f"{where}: state_bar[{k!r}]")
    for n, ref in zip(hkeys, grads[2 + len(skeys):]):
        assert hyper_bar[n].shape == hyper[n].shape, n
        assert_rel(hyper_bar[n], ref, VJP_TOL, f"{where}: hyper_bar[{n!r}]")


def test_muon_per_element_coefficients_are_the_shared_polynomial() -> None:
    """Note [Per-element Newton-Schulz coefficients]: b and c per element, all equal, give the
    step of the shared values; with values that differ per element (the table's oracles learn
    equal ones) the VJP matches autograd."""
    gen = torch.Generator().manual_seed(4)
    r = row("muon-default")
    for shape in [(3, 5), (6, 2)]:
        theta, G, state, hyper = _point(r, shape, gen, ("ns_b", "ns_c"))
        shared = MUON.step(theta, G, state, hyper)[0]
        element = MUON.step(theta, G, state, learn(hyper, ("ns_b", "ns_c"), "element", theta))[0]
        assert_rel(element, shared, STEP_TOL, f"shape {shape}")
        varied = learn(hyper, MUON.hyper_names, "element", theta)
        for n in ("ns_a", "ns_b", "ns_c", "eps", "lr", "momentum"):
            varied[n] = varied[n] * (1 + 0.05 * torch.randn(shape, generator=gen, dtype=DTYPE))
        _assert_vjp_matches_autograd(r, theta, G, state, varied, gen, f"varied, shape {shape}")


def test_adafactor_per_element_hyperparameters_on_factored_moments() -> None:
    """Note [Per-element beta2_decay on factored moments]: equal values give torch's factored
    update; values that differ per element (eps1 clamping some estimates) are differentiated
    exactly."""
    gen = torch.Generator().manual_seed(5)
    r = row("adafactor-eps-d-beta2_decay")
    for shape in [(3, 5), (2, 3, 4), (7,)]:
        theta, G, state, hyper = _point(r, shape, gen, ("beta2_decay",))
        shared = ADAFACTOR.step(theta, G, state, hyper)
        element = ADAFACTOR.step(theta, G, state, learn(hyper, ("beta2_decay",), "element", theta))
        assert_rel(element[0], shared[0], STEP_TOL, f"shape {shape}")
        for k in tensor_keys(shared[1]):
            assert_rel(element[1][k], shared[1][k], STEP_TOL, f"shape {shape}: {k}")
        varied = learn(hyper, ADAFACTOR.hyper_names, "element", theta)
        for n in ADAFACTOR.hyper_names:
            varied[n] = varied[n] * (1 + 0.1 * torch.rand(shape, generator=gen, dtype=DTYPE))
        _assert_vjp_matches_autograd(r, theta, G, state, varied, gen, f"varied, shape {shape}")
