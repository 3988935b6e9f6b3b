# SPDX-License-Identifier: Apache-2.0
"""Optimizer state and options beyond the table's oracles: scalar state in torch's precision, NAdam's
per-element mu_product, Adagrad's eagerly built state, fixed options, and learned values written back."""
from __future__ import annotations

import functools

import pytest
import torch

from gimli_bptt import GimliUpdater
from gimli_bptt.testing import float64_rtol
from gimli_bptt.metaparams import parse_learn
from gimli_bptt.optim import ASGD, NADAM, get_optimizer

from optim_checks import check_vjp, run_against_torch, run_steps
from optim_table import DTYPE, Row, assert_rel, learn, params, random_like, row, rows
from problems import build_model, ce_loss, make_batches

#: torch.func.jvp goes through torch.jit.script inside torch, which warns that it is deprecated
#: (a DeprecationWarning in torch 2.13, a FutureWarning in 2.14).
JIT_WARNING = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


# --------------------------------------------------------------------------------------------
# Scalar state in torch's precision.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", params("step", rows(cls=torch.optim.NAdam) + rows(cls=torch.optim.ASGD)))
def test_scalar_state_with_float64_default_dtype(r: Row, float64_default: None) -> None:
    """With float64 as the default dtype torch keeps mu_product / eta / mu unrounded: so do we."""
    run_against_torch(r, warmup=3, granularity="0d", kernel="for_loop", steps=10)


def test_scalar_state_rounding_is_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch keeps mu_product in float32 (the default dtype): with the rounding, NAdam matches torch
    to round-off; without it (the product kept in float64), it is visibly off (the ~1e-8 relative
    change of mu_product reaches the update)."""
    import gimli_bptt.optim.nadam as nadam_module

    r = row("nadam-default")
    hyper = r.hyper()
    gen = torch.Generator().manual_seed(0)
    theta = random_like((5,), gen)
    grads = [random_like((5,), gen) for _ in range(6)]
    p = torch.nn.Parameter(theta.clone())
    opt = r.torch_optimizer([[p]], "for_loop")
    for g in grads:
        p.grad = g.clone()
        opt.step()
    assert opt.state[p]["mu_product"].dtype == torch.float32
    ours, st = run_steps(r, theta, grads, NADAM.import_state({}, theta, hyper), hyper)
    assert float(st["mu_product"]) == float(opt.state[p]["mu_product"])
    rounded_err = (ours - p.detach()).abs().max().item() / (ours - theta).abs().max().item()
    monkeypatch.setattr(nadam_module, "round_to_torch_scalar", lambda x: x)
    unrounded, st = run_steps(r, theta, grads, NADAM.import_state({}, theta, hyper), hyper)
    unrounded_err = (unrounded - p.detach()).abs().max().item() / (unrounded - theta).abs().max().item()
    assert float(st["mu_product"]) != float(opt.state[p]["mu_product"])
    # relative to the total update of the 6 steps: each step rounds θ (not the update), so the bound is
    # 6 steps at the condition |θ| / |θ_6 - θ_0| of the update
    kappa = theta.abs().max().item() / (ours - theta).abs().max().item()
    tol = float64_rtol(terms=6, condition=max(1.0, kappa))
    assert tol < 1e-10 and rounded_err <= tol and unrounded_err > 1e-10, (rounded_err, unrounded_err, tol)


# --------------------------------------------------------------------------------------------
# NAdam: mu_product per element.
# --------------------------------------------------------------------------------------------


@JIT_WARNING
def test_nadam_mu_product_per_element() -> None:
    """beta1 learned per element with different values: mu_product becomes per element, each element
    as the scalar step with that beta1 gives it; the VJP reduces the cotangent of the 0-d start."""
    r = row("nadam-maximize-betas-eps")
    hyper_f = r.hyper()
    gen = torch.Generator().manual_seed(1)
    theta = random_like((4,), gen)
    state = NADAM.import_state({}, theta, hyper_f)
    betas = torch.tensor([0.5, 0.8, 0.9, 0.95], dtype=DTYPE)
    hyper = learn(hyper_f, ("lr", "beta1", "momentum_decay"), "element", theta)
    hyper["beta1"] = betas.clone()
    grads = [random_like((4,), gen) for _ in range(3)]
    ours, st = run_steps(r, theta, grads, state, hyper)
    assert st["mu_product"].shape == (4,) and state["mu_product"].dim() == 0
    for i, b in enumerate(betas.tolist()):
        single, st1 = run_steps(r, theta[i:i + 1], [g[i:i + 1] for g in grads],
                                NADAM.import_state({}, theta[i:i + 1], hyper_f), dict(hyper_f, beta1=b))
        # the same element-wise steps, vectorised or on one element: 3 steps of a well-conditioned
        # update (relative to θ), and mu_product a product of 3 factors in (0, 1)
        assert_rel(ours[i:i + 1], single, float64_rtol(terms=3), f"theta[{i}]")
        assert_rel(st["mu_product"][i], st1["mu_product"], float64_rtol(terms=3), f"mu_product[{i}]")
    check_vjp(r, theta, grads[0], state, hyper, gen, "first step, 0-d mu_product")
    theta1, state1 = NADAM.step(theta, grads[0], state, hyper)
    check_vjp(r, theta1, grads[1], state1, hyper, gen, "second step, per-element mu_product")
    exported = NADAM.export_state(state1, theta1)
    assert exported["mu_product"].shape == (4,)
    assert torch.equal(NADAM.import_state(exported, theta1, hyper_f)["mu_product"], state1["mu_product"])


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
        assert (float(bar) == 0.0) == (t == 1), (t, float(bar))
        theta, state = impl.step(theta, G, state, h)


# --------------------------------------------------------------------------------------------
# Fixed options.
# --------------------------------------------------------------------------------------------


def test_asgd_t0_is_not_learnable() -> None:
    assert "t0" not in ASGD.hyper_names and "t0" in ASGD.flag_names
    with pytest.raises(ValueError, match="cannot learn 't0'"):
        parse_learn(ASGD, {"t0": "group"})


# --------------------------------------------------------------------------------------------
# Learned values written back into param_groups, tuple options (betas, etas, step_sizes) included.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", params("write-back"))
def test_meta_step_writes_every_learned_value_back(r: Row) -> None:
    """Every hyperparameter learned per group, one meta step of SGD: each learned value is the old
    one minus the step, projected into its declared range, and each group's option holds it
    (inside its tuple where it has one: betas, etas, step_sizes)."""
    batches, val = make_batches(2, seed=6)
    model = build_model("mlp", seed=6)
    opt = r.for_model(model)
    names = r.impl.hyper_names
    before = [r.impl.read_hyper(g) for g in opt.param_groups]
    meta_lr = 1e-4
    up = GimliUpdater(model, opt, ce_loss, ce_loss, unroll=2, learn={n: "group" for n in names},
                      meta_opt=functools.partial(torch.optim.SGD, lr=meta_lr))
    result = up.step(batches, val)
    assert not result.skipped, result.nonfinite
    moved = 0
    for name in names:
        declared = r.impl.hyperparameter(name)
        learned = up.hyper.values[name].detach()
        for g, group in enumerate(opt.param_groups):
            expected = torch.tensor(before[g][name], dtype=DTYPE) - meta_lr * result.hypergrads[name][g].detach()
            declared.project_(expected)
            where = f"{r.id}: {name} of group {g}"
            # φ - meta_lr·φ̄ (and a projection) once: two roundings at the condition of the subtraction
            before_g = torch.tensor(before[g][name], dtype=DTYPE)
            step = (meta_lr * result.hypergrads[name][g].detach()).abs()
            kappa = float((before_g.abs() + step) / expected.abs().clamp_min(1e-300))
            assert float(learned[g]) == pytest.approx(float(expected), rel=float64_rtol(terms=2, condition=max(1.0, kappa)),
                                                      abs=1e-300), where
            assert declared.read(group) == float(learned[g]), f"{where}: param_groups hold {declared.read(group)}"
            moved += float(learned[g]) != before[g][name]
    assert moved > 0, f"{r.id}: no learned value moved"
