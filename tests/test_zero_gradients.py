# SPDX-License-Identifier: Apache-2.0
"""Coordinates whose gradient is exactly zero at every inner step, under every optimizer whose step
takes a root or a quotient of its state: the hypergradient is the finite limit, equal to central
differences of real ``torch.optim`` training, where a plain autograd unroll gives NaN.

Such coordinates are common: GPT-2's last position embedding (under the causal mask no earlier
token attends to it, and its own prediction is not in the loss: bench/bench_hf.py), the LoRA A
matrices while B = 0, embeddings of tokens absent from the batches, the weights of an input
feature that is always zero (the case built here). Their second moment stays v = 0, and autograd
multiplies d√v/dv = ∞ by a zero cotangent: NaN, which the next Hessian-vector product spreads to
every hypergradient. The hand-written VJPs take the limit (Note [Adam at a zero second moment]).
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gimli_bptt import GimliUpdater
from gimli_bptt.functional import FunctionalModel

from optim_table import Row, params, row
from problems import build_model, ce_loss, make_batches
from test_hypergrad import _difference, _step, _torch_val_loss

#: The default configuration of each optimizer whose step divides by a root of its state (Adam,
#: AdamW, NAdam, RAdam once rectified, RMSprop, Adagrad, Adafactor), by a maximum of it (Adamax) or by a
#: root of it plus eps (Adadelta).
ROOT_ROWS = ("adam-default", "adam-amsgrad", "adamw-default", "nadam-default", "radam-default", "adamax-default",
             "rmsprop-default", "rmsprop-centered", "adagrad-default", "adadelta-default", "adafactor-default")
#: Where torch.optim's own differentiable step takes √v (or divides by it) at v = 0 within UNROLL steps: a
#: plain autograd unroll gives NaN there. RAdam's first steps are unrectified (no √v while rho_t <= 5);
#: Adamax's max(b2 u, |g| + eps) and Adadelta's √(v + eps) are finite at a zero gradient; Adafactor clamps its
#: factored estimate at eps1².
NAN_IN_AUTOGRAD = {"adam-default", "adam-amsgrad", "adamw-default", "nadam-default", "rmsprop-default",
                   "rmsprop-centered", "adagrad-default"}
#: The first param group's step saturates at g / (c|g| + eps): the finite difference of a weight decay that
#: enters the gradient at 0 needs a step below eps / |θ| (the dead coordinates are in the first group).
SATURATE = {"adam-default", "adam-amsgrad", "nadam-default", "adamax-default", "rmsprop-default", "rmsprop-centered",
            "adagrad-default"}
UNROLL, SEED = 3, 5
#: The input pixels that are zero in every batch: row 0 of the 6x6 image, so the first layer's
#: weight columns 0 to 5 get exactly zero gradient at every step.
DEAD = (slice(None), 0, 0, slice(None))


def _batches() -> tuple[list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
    batches, val = make_batches(UNROLL, seed=SEED)
    for x, _ in batches:
        x[DEAD] = 0.0
    return batches, val  # the validation inputs keep the row: the dead weights matter to L_val


def _model() -> nn.Module:
    return build_model("mlp", seed=SEED)


def _assert_zero_gradient_coordinates(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> None:
    m = copy.deepcopy(model)
    for batch in batches:
        g = torch.autograd.grad(ce_loss(m, batch), m[1].weight)[0]
        assert float(g[:, :6].abs().max()) == 0.0 and float(g[:, 6:].abs().max()) > 0.0


def _derivative(f: Callable[[float], float], base: float, h: float, low: float | None, high: float | None
                ) -> tuple[float, float]:
    """df/dx at ``base`` and an estimate of its error, from the best of the steps h, 4h, 16h.

    The dead coordinates take no part in some hyperparameters' effect (eps: their update is 0 for
    any eps), so L_val moves less than without them and round-off (1e-16 |L_val| / h) can exceed
    the truncation error at the row's step. Each step's error is its change from half that step
    (the truncation error of a central difference falls 4x) plus the round-off; the smallest wins.
    """
    best = (0.0, float("inf"))
    for step in (h, 4 * h, 16 * h):
        fine, coarse = _difference(f, base, step / 2, low, high), _difference(f, base, step, low, high)
        err = abs(fine - coarse) / 3 + 1e-15 * abs(f(base)) / step
        if err < best[1]:
            best = (fine, err)
    return best


@pytest.mark.parametrize("r", params("fd", [row(i) for i in ROOT_ROWS]))
def test_zero_gradient_coordinates_give_the_finite_limit(r: Row, float64_default: None) -> None:
    """Every hyperparameter the finite-difference oracle checks (lr, betas, eps, ...), per group, with
    every way the updater can run the optimizer (the per-tensor VJP; Adam's flat ops and their
    compiled kernels)."""
    model = _model()
    batches, val = _batches()
    _assert_zero_gradient_coordinates(model, batches)
    names = r.fd_names()
    by_kernels = {}
    for kernels in ("loop",) + (("reference", "fused") if r.impl.flat is not None else ()):
        m = copy.deepcopy(model)
        opt = r.for_model(m)
        updater = GimliUpdater(m, opt, ce_loss, ce_loss, unroll=UNROLL, learn={n: "group" for n in names},
                               learn_init=True, kernels=kernels)
        grads = updater.hypergradient(batches, val).hypergrads
        for name, g in grads.items():
            assert torch.isfinite(g).all(), f"{r.id}, kernels={kernels}: {name} is not finite: {g}"
        assert float(grads["init.1.weight"][:, :6].abs().max()) > 0  # θ_0 of the dead weights moves L_val
        by_kernels[kernels] = grads
    theta_max = max(float(p.abs().max()) for p in model.parameters())
    for name in names:
        declared = r.impl.hyperparameter(name)
        for group in range(len(opt.param_groups)):
            base = declared.read(opt.param_groups[group])
            h = r.fd.steps.get(name, _step(base, declared.low, declared.high))
            if name == "weight_decay" and r.id in SATURATE and group == 0 and base == 0.0:
                # Weight decay in the gradient wakes the dead coordinates: g = wd θ, and the step
                # g / (c|g| + eps) saturates once wd |θ| passes eps. L_val is smooth in wd on the
                # scale eps / |θ| (Adagrad: 1e-10 / 0.4), so h sits a thousand times below it.
                h = 1e-3 * float(opt.param_groups[group]["eps"]) / theta_max
            f = lambda v: _torch_val_loss(r, model, batches, val, group, name, v)  # noqa: E731
            fd, err = _derivative(f, base, h, declared.low, declared.high)
            for kernels, grads in by_kernels.items():
                got = float(grads[name][group])
                where = (f"{r.id}, kernels={kernels}: {name} of group {group} at {base}: hypergradient {got!r}, "
                         f"finite difference {fd!r} (its error about {err:.1e})")
                if fd == 0.0 and r.fd.may_be_zero(name, group):  # no effect on torch's run (the row says why)
                    assert abs(got) <= r.tol.fd * r.tol.fd_floor, where
                    continue
                assert err <= 1e-3 * max(abs(fd), r.tol.fd_floor), where  # a difference accurate enough to test
                assert abs(got - fd) <= r.tol.fd * max(abs(fd), r.tol.fd_floor) + 2 * err, where


def _torch_autograd_unroll(r: Row, model: nn.Module, batches: list[Any], val: Any) -> list[Tensor]:
    """dL_val/dθ_0 by autograd through ``UNROLL`` steps of ``torch.optim``'s own
    ``differentiable=True`` step: what a user who unrolls torch.optim (or a faithful copy) gets."""
    names = [n for n, _ in model.named_parameters()]
    theta0 = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    buffers = dict(model.named_buffers())
    theta = list(theta0)
    state: dict[int, dict[str, Any]] = {}
    for batch in batches:
        G = torch.autograd.grad(ce_loss(FunctionalModel(model, dict(zip(names, theta)), buffers), batch), theta,
                                create_graph=True)
        nxt = [t.clone() for t in theta]  # not leaves: torch updates them in place, on the graph
        opt = r.torch_cls([{"params": nxt}], differentiable=True, **r.kwargs)
        for k, (p, g) in enumerate(zip(nxt, G)):
            p.grad = g
            if k in state:  # carried over; cloned, so the in-place update leaves the saved versions alone
                opt.state[p] = {key: (v.clone() if isinstance(v, Tensor) else v) for key, v in state[k].items()}
        opt.step()
        state = {k: opt.state[p] for k, p in enumerate(nxt)}
        theta = nxt
    L = ce_loss(FunctionalModel(model, dict(zip(names, theta)), buffers), val)
    return list(torch.autograd.grad(L, theta0))


@pytest.mark.parametrize("r", params("fd", [row(i) for i in ROOT_ROWS]))
def test_plain_autograd_unroll_gives_nan(r: Row, float64_default: None) -> None:
    """The same model and batches, θ_0's hypergradient (MAML's): a plain autograd unroll of
    torch.optim gives NaN where its step takes √v at v = 0; gimli gives the finite value, equal
    to the autograd one wherever that one is finite (the other optimizers: all of it)."""
    if "differentiable" not in r.signature():
        pytest.skip(f"torch.optim.{r.torch_cls.__name__} has no differentiable step to unroll")
    model = _model()
    batches, val = _batches()
    m = copy.deepcopy(model)
    updater = GimliUpdater(m, r.torch_optimizer([list(m.parameters())]), ce_loss, ce_loss, unroll=UNROLL,
                           learn_init=True)
    ours = [updater.hypergradient(batches, val).hypergrads[f"init.{n}"] for n, _ in m.named_parameters()]
    plain = _torch_autograd_unroll(r, model, batches, val)
    nan = torch.cat([torch.isnan(p).flatten() for p in plain])
    assert torch.isfinite(torch.cat([g.flatten() for g in ours])).all()
    if r.id in NAN_IN_AUTOGRAD:
        assert nan.any(), f"{r.id}: expected NaN from autograd through √v at v = 0"
        return
    assert not nan.any()
    for got, want in zip(ours, plain):
        scale = float(max(p.abs().max() for p in plain))
        assert float((got - want).abs().max()) <= r.tol.hypergrad * scale
