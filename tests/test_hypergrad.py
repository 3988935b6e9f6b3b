# SPDX-License-Identifier: Apache-2.0
"""Oracle 3: hypergradients against a full autograd unroll, and against finite differences of torch.optim."""
from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from gimli_bptt import GimliUpdater
from gimli_bptt.testing import check_hypergradients, reference_hypergradients, relative_error

from problems import ARCHS, OPTIMIZER_NAMES, build_model, ce_loss, make_batches, optimizer_row, two_groups

TOL = 1e-9


def _build(arch: str, opt_name: str, learn: dict[str, str], with_loss_params: bool, learn_init: bool,
           hvp: str, grouped: bool, seed: int, unroll: int) -> GimliUpdater:
    model = build_model(arch, seed)
    _, cls, kwargs, _ = optimizer_row(opt_name)
    if grouped:
        groups = two_groups(model)
        groups[-1]["lr"] = kwargs["lr"] * 0.5
        opt = cls(groups, **kwargs)
    else:
        opt = cls(model.parameters(), **kwargs)
    loss_params: dict[str, Tensor] = {}
    if with_loss_params:
        n = len(list(model.parameters()))
        loss_params = {
            "scale": torch.tensor(1.0, dtype=torch.float64, requires_grad=True),
            "l2": torch.full((n,), 1e-2, dtype=torch.float64, requires_grad=True),
        }

        def train_loss(m: Any, batch: Any) -> Tensor:
            penalty = sum(c * (p**2).sum() for c, p in zip(loss_params["l2"], m.parameters()))
            return loss_params["scale"] * ce_loss(m, batch) + penalty
    else:
        train_loss = ce_loss
    if not learn and not with_loss_params and not learn_init:
        learn = {"lr": "group"}
    return GimliUpdater(model, opt, train_loss, ce_loss, unroll=unroll, learn=learn, loss_params=loss_params,
                        learn_init=learn_init, hvp=hvp)


@st.composite
def configurations(draw: st.DrawFn) -> dict[str, Any]:
    opt_name = draw(st.sampled_from(OPTIMIZER_NAMES))
    learnable = optimizer_row(opt_name)[3]
    names = draw(st.lists(st.sampled_from(learnable), unique=True, max_size=len(learnable)))
    learn = {n: draw(st.sampled_from(["group", "tensor", "element"])) for n in names}
    return dict(
        arch=draw(st.sampled_from(ARCHS)),
        opt_name=opt_name,
        learn=learn,
        with_loss_params=draw(st.booleans()),
        learn_init=draw(st.booleans()),
        grouped=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        J=draw(st.integers(1, 8)),
    )


@pytest.mark.parametrize("hvp", ["rev", "fwd"])
@given(cfg=configurations())
def test_hypergradients_match_autograd_unroll(hvp: str, cfg: dict[str, Any]) -> None:
    J = cfg.pop("J")
    updater = _build(hvp=hvp, unroll=J, **cfg)
    batches, val = make_batches(J, seed=cfg["seed"])
    errors = check_hypergradients(updater, batches, val)
    assert errors, "no meta-parameter was checked"
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


@pytest.mark.parametrize("opt_name", OPTIMIZER_NAMES)
def test_every_optimizer_every_granularity(opt_name: str) -> None:
    """Every learnable hyperparameter of every optimizer, at each granularity, on a BatchNorm conv net."""
    learnable = optimizer_row(opt_name)[3]
    for gran in ("group", "tensor", "element"):
        updater = _build("conv_bn", opt_name, {n: gran for n in learnable}, True, True, "rev", True, seed=1, unroll=4)
        batches, val = make_batches(4, seed=1)
        errors = check_hypergradients(updater, batches, val)
        assert set(errors) >= set(learnable)
        assert max(errors.values()) <= TOL, errors


def test_rev_and_fwd_agree() -> None:
    results = []
    for hvp in ("rev", "fwd"):
        updater = _build("mlp_bn", "adam", {"lr": "tensor", "beta1": "group"}, True, True, hvp, True, seed=3, unroll=5)
        batches, val = make_batches(5, seed=3)
        results.append(updater.hypergradient(batches, val))
    floor = 1e-4 * float(results[0].val_loss)  # init.1.bias is round-off: a bias followed by BatchNorm
    for name, value in results[0].hypergrads.items():
        assert relative_error(results[1].hypergrads[name], value, floor) <= 1e-11, name


def test_fwd_mode_falls_back_where_forward_ad_fails() -> None:
    """F.mse_loss has no forward-mode derivative of its backward in torch 2.13: one warning, same numbers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    loss = lambda m, b: F.mse_loss(m(b[0]), b[1])  # noqa: E731
    batches = [(torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)) for _ in range(3)]
    grads = {}
    for hvp in ("rev", "fwd"):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        up = GimliUpdater(m, opt, loss, loss, unroll=3, learn={"lr": "group"}, hvp=hvp)
        if hvp == "fwd":
            with pytest.warns(RuntimeWarning, match="forward-mode AD failed"):
                grads[hvp] = up.hypergradient(batches, batches[0]).hypergrads["lr"]
        else:
            grads[hvp] = up.hypergradient(batches, batches[0]).hypergrads["lr"]
    assert torch.allclose(grads["rev"], grads["fwd"], rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- finite differences of torch.optim
def _torch_unroll_val_loss(model: nn.Module, opt_cls: type, kwargs: dict[str, Any], batches: list[Any],
                           val: Any, train_loss: Any) -> float:
    m = copy.deepcopy(model)
    opt = opt_cls(m.parameters(), **kwargs)
    for batch in batches:
        opt.zero_grad()
        train_loss(m, batch).backward()
        opt.step()
    with torch.no_grad():
        return float(ce_loss(m, val))


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "sgd_nesterov", "adam", "adamw", "adam_amsgrad"])
def test_hypergradient_matches_finite_differences_of_torch_optim(opt_name: str) -> None:
    """An oracle independent of our step functions: central differences through real torch.optim steps."""
    _, cls, kwargs, learnable = optimizer_row(opt_name)
    model = build_model("mlp", seed=5)
    batches, val = make_batches(4, seed=5)
    m = copy.deepcopy(model)
    opt = cls(m.parameters(), **kwargs)
    updater = GimliUpdater(m, opt, ce_loss, ce_loss, unroll=4, learn={n: "group" for n in learnable})
    ours = updater.hypergradient(batches, val).hypergrads
    for name in learnable:
        key = "betas" if name.startswith("beta") else name
        base = kwargs.get(key, dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                     momentum=0.0, dampening=0.0)[key])
        if base == 0.0:
            continue  # at the boundary of its domain: torch.optim rejects base - h
        h = 1e-6 * max(abs(base[0] if isinstance(base, tuple) else base), 1e-3)
        vals = []
        for sign in (1, -1):
            kw = dict(kwargs)
            if key == "betas":
                b = list(kw.get("betas", (0.9, 0.999)))
                b[0 if name == "beta1" else 1] += sign * h
                kw["betas"] = tuple(b)
            else:
                kw[key] = base + sign * h
            vals.append(_torch_unroll_val_loss(model, cls, kw, batches, val, ce_loss))
        fd = (vals[0] - vals[1]) / (2 * h)
        assert ours[name].shape == (1,)
        assert abs(float(ours[name][0]) - fd) <= 1e-5 * max(abs(fd), 1e-3), (name, float(ours[name][0]), fd)


def test_frozen_parameters_and_unused_parameters() -> None:
    """Parameters outside the optimizer stay fixed (learned as init with learn_init, as in ANIL), and a
    parameter the loss never touches is skipped by the step, as torch.optim skips a None grad."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(36, 5)
            self.head = nn.Linear(5, 3)
            self.unused = nn.Linear(2, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(torch.tanh(self.body(x.flatten(1))))

    torch.manual_seed(0)
    model = Net().double()
    opt = torch.optim.Adam(list(model.head.parameters()) + list(model.unused.parameters()), lr=0.01, weight_decay=0.1)
    updater = GimliUpdater(model, opt, ce_loss, ce_loss, unroll=3, learn={"lr": "tensor"}, learn_init=True)
    batches, val = make_batches(3, seed=2)
    errors = check_hypergradients(updater, batches, val)
    assert {"init.body.weight", "init.head.weight", "init.unused.weight", "lr"} <= set(errors)
    assert max(errors.values()) <= TOL, errors
    grads = updater.hypergradient(batches, val).hypergrads
    assert float(grads["init.body.weight"].abs().max()) > 0
    assert float(grads["init.unused.weight"].abs().max()) == 0.0
    # lr of the unused tensors: never applied, so zero; shape is one entry per optimized tensor
    assert grads["lr"].shape == (4,)
    assert float(grads["lr"][2:].abs().max()) == 0.0


def test_reference_agrees_with_finite_differences_for_loss_params_and_init() -> None:
    model = build_model("mlp", seed=7)
    w = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)

    def train_loss(m: Any, b: Any) -> Tensor:
        return ce_loss(m, b) + w * sum((p**2).sum() for p in m.parameters())

    batches, val = make_batches(3, seed=7)
    m = copy.deepcopy(model)
    updater = GimliUpdater(m, torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.5), train_loss, ce_loss,
                           unroll=3, loss_params={"w": w}, learn_init=True)
    ours = updater.hypergradient(batches, val).hypergrads
    _, ref = reference_hypergradients(updater, batches, val)
    assert relative_error(ours["loss.w"], ref["loss.w"]) <= TOL
    h = 1e-6
    vals = []
    for sign in (1, -1):
        with torch.no_grad():
            w.add_(sign * h)
        vals.append(_torch_unroll_val_loss(model, torch.optim.SGD, dict(lr=0.2, momentum=0.5), batches, val, train_loss))
        with torch.no_grad():
            w.sub_(sign * h)
    fd = (vals[0] - vals[1]) / (2 * h)
    assert abs(float(ours["loss.w"]) - fd) <= 1e-6 * abs(fd)


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adamw"])
def test_inner_lr_schedule_matches_torch_lambda_lr(opt_name: str) -> None:
    """A warm-up inside the unroll: the same as torch's LambdaLR, and differentiated through."""
    _, cls, kwargs, _ = optimizer_row(opt_name)
    warmup = lambda j: min(1.0, (j + 1) / 3)  # noqa: E731
    model = build_model("mlp", seed=11)
    batches, val = make_batches(5, seed=11)
    m = copy.deepcopy(model)
    up = GimliUpdater(m, cls(m.parameters(), **kwargs), ce_loss, ce_loss, unroll=5, learn={"lr": "tensor"},
                      lr_schedule=warmup)
    errors = check_hypergradients(up, batches, val)
    assert max(errors.values()) <= TOL, errors
    ours = float(up.hypergradient(batches, val).hypergrads["lr"].sum())  # all tensors share the base lr

    def torch_run(lr: float) -> float:
        mm = copy.deepcopy(model)
        opt = cls(mm.parameters(), **{**kwargs, "lr": lr})
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup)
        for batch in batches:
            opt.zero_grad()
            ce_loss(mm, batch).backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            return float(ce_loss(mm, val))

    h = 1e-7
    fd = (torch_run(kwargs["lr"] + h) - torch_run(kwargs["lr"] - h)) / (2 * h)
    assert abs(ours - fd) <= 1e-5 * abs(fd)


def test_lr_schedule_errors() -> None:
    model = build_model("mlp")
    up = GimliUpdater(model, torch.optim.SGD(model.parameters(), lr=0.1), ce_loss, ce_loss, unroll=2,
                      learn=["lr"], lr_schedule=lambda j: -1.0)
    with pytest.raises(ValueError, match=r"lr_schedule\(0\) returned -1.0"):
        up.hypergradient(*make_batches(2))
    with pytest.raises(TypeError, match="lr_schedule must be a function"):
        GimliUpdater(model, torch.optim.SGD(model.parameters(), lr=0.1), ce_loss, ce_loss, learn=["lr"],
                     lr_schedule=0.5)  # type: ignore[arg-type]
