# SPDX-License-Identifier: Apache-2.0
"""Oracles 3 and 4: every row's hypergradients against a full autograd unroll, and against central
differences of real torch.optim training (tests/optim_table.py); and the engine's other hypergradient paths."""
from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from gimli_bptt import GimliUpdater
from gimli_bptt.testing import check_hypergradients, float64_rtol, reference_hypergradients, relative_error

from optim_table import Row, row
from optim_table import params as row_params
from problems import ARCHS, build_model, ce_loss, make_batches

GRANULARITIES = ("group", "tensor", "element")
#: Random examples per row (a share of the profile's, at least 2).
EXAMPLES = max(2, settings().max_examples // 12)


def _build(r: Row, arch: str, learn: dict[str, str], with_loss_params: bool, learn_init: bool, hvp: str,
           grouped: bool, seed: int, unroll: int) -> GimliUpdater:
    """The row's optimizer over ``arch`` (in its two param groups, or one), a learned loss where asked."""
    model = build_model(arch, seed)
    opt = r.for_model(model, grouped)
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


def _assert_within(r: Row, errors: dict[str, float], where: str) -> None:
    assert errors, f"{r.id}, {where}: no meta-parameter was checked"
    bad = {k: v for k, v in errors.items() if not v <= r.tol.hypergrad}
    assert not bad, f"{r.id}, {where}: relative errors above {r.tol.hypergrad}: {bad}"


# --------------------------------------------------------------------------- oracle 3: the autograd unroll
@pytest.mark.slow
@pytest.mark.parametrize("r", row_params("hypergrad"))
def test_hypergradients_match_autograd_unroll(r: Row) -> None:
    """Every learnable hyperparameter of the row, at each granularity, with a learned loss and θ_0,
    on a BatchNorm conv net over 4 inner steps, both param groups."""
    names = r.impl.hyper_names
    for gran in GRANULARITIES:
        updater = _build(r, "conv_bn", {n: gran for n in names}, True, True, "rev", True, seed=1, unroll=4)
        errors = check_hypergradients(updater, *make_batches(4, seed=1))
        assert set(errors) >= set(names), (sorted(errors), names)
        _assert_within(r, errors, f"every hyperparameter per {gran}")


@st.composite
def configurations(draw: st.DrawFn, r: Row) -> dict[str, Any]:
    """A random meta-learning setup for the row. The first choice of each draw is the simplest
    example hypothesis tries first, so it is a full one: every hyperparameter per group, a learned
    loss and θ_0, two groups, 3 inner steps, reverse-over-reverse."""
    learn = {}
    for name in r.impl.hyper_names:
        gran = draw(st.sampled_from(["group", "tensor", "element", None]), label=name)
        if gran is not None:
            learn[name] = gran
    return dict(
        arch=draw(st.sampled_from(ARCHS)),
        learn=learn,
        with_loss_params=draw(st.sampled_from([True, False])),
        learn_init=draw(st.sampled_from([True, False])),
        grouped=draw(st.sampled_from([True, False])),
        hvp=draw(st.sampled_from(["rev", "fwd"])),
        seed=draw(st.integers(0, 2**16)),
        unroll=draw(st.sampled_from([3, 1, 2, 4, 5, 6, 7, 8])),
    )


@pytest.mark.slow
@pytest.mark.parametrize("r", row_params("hypergrad-random"))
@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.data())
def test_hypergradients_match_autograd_unroll_random(r: Row, data: st.DataObject) -> None:
    """Random models (dropout and BatchNorm included), meta-parameters and granularities, unrolls of
    1 to 8 steps, both HVP modes."""
    cfg = data.draw(configurations(r), label="configuration")
    updater = _build(r, **cfg)
    errors = check_hypergradients(updater, *make_batches(cfg["unroll"], seed=cfg["seed"]))
    _assert_within(r, errors, str(cfg))


# --------------------------------------------------------------------------- oracle 4: torch.optim itself
FD_UNROLL, FD_SEED = 4, 5


def _torch_val_loss(r: Row, model: nn.Module, batches: list[Any], val: Any, group: int, name: str,
                    value: float) -> float:
    """The validation loss after real ``torch.optim`` training, with one group's ``name`` set to ``value``."""
    m = copy.deepcopy(model)
    opt = r.for_model(m)
    r.impl.write_hyper(opt.param_groups[group], name, value)
    with r.torch_context():
        for batch in batches:
            opt.zero_grad()
            ce_loss(m, batch).backward()
            opt.step()
    with torch.no_grad():
        return float(ce_loss(m, val))


def _step(base: float, low: float | None, high: float | None) -> float:
    """The finite-difference step at ``base``: 1e-4 of its scale, the smaller of |base| and its
    distance to a declared bound (beta2 = 0.999 moves the bias corrections on the scale of 1e-3);
    1e-6 at 0, one-sided there. A row sets another where the loss moves on another scale
    (``FiniteDifferences.steps``)."""
    scale = abs(base)
    for bound in (low, high):
        if bound is not None and bound != base:
            scale = min(scale, abs(base - bound))
    return 1e-4 * scale if scale > 0 else 1e-6


def _difference(f: Callable[[float], float], base: float, h: float, low: float | None, high: float | None) -> float:
    """df/dx at ``base``: central, or one-sided to second order where ``base - h`` or ``base + h``
    leaves the declared range (a value at its bound: momentum 0, weight decay 0)."""
    if low is None or base - h >= low:
        if high is None or base + h <= high:
            return (f(base + h) - f(base - h)) / (2 * h)
        return (3 * f(base) - 4 * f(base - h) + f(base - 2 * h)) / (2 * h)
    return (-3 * f(base) + 4 * f(base + h) - f(base + 2 * h)) / (2 * h)


@pytest.mark.slow
@pytest.mark.parametrize("r", row_params("fd"))
def test_hypergradient_matches_finite_differences_of_torch_optim(r: Row, float64_default: None) -> None:
    """An oracle independent of our step functions: every learnable hyperparameter (but the row's
    documented exceptions), per group, from a fresh state (so the first step's lazy state is part
    of it), against central differences of the validation loss after 4 real torch.optim steps."""
    model = build_model("mlp", seed=FD_SEED)
    batches, val = make_batches(FD_UNROLL, seed=FD_SEED)
    names = r.fd_names()
    m = copy.deepcopy(model)
    opt = r.for_model(m)
    updater = GimliUpdater(m, opt, ce_loss, ce_loss, unroll=FD_UNROLL, learn={n: "group" for n in names})
    ours = updater.hypergradient(batches, val).hypergrads
    for name in names:
        declared = r.impl.hyperparameter(name)
        assert ours[name].shape == (len(opt.param_groups),), (name, ours[name].shape)
        for group in range(len(opt.param_groups)):
            base = declared.read(opt.param_groups[group])
            h = r.fd.steps.get(name, _step(base, declared.low, declared.high))
            fd = _difference(lambda v: _torch_val_loss(r, model, batches, val, group, name, v), base, h,
                             declared.low, declared.high)
            got = float(ours[name][group])
            where = f"{r.id}: {name} of group {group} at {base}: hypergradient {got!r}, finite difference {fd!r}"
            assert abs(got - fd) <= r.tol.fd * max(abs(fd), r.tol.fd_floor), where
            if not r.fd.may_be_zero(name, group):
                assert fd != 0.0, f"{where}: no effect on torch's run (declare it in the row's fd.zero, and why)"


# --------------------------------------------------------------------------- the engine's other paths
def test_rev_and_fwd_agree() -> None:
    results = []
    for hvp in ("rev", "fwd"):
        updater = _build(row("adam-lr"), "mlp_bn", {"lr": "tensor", "beta1": "group"}, True, True, hvp, True, seed=3,
                         unroll=5)
        results.append(updater.hypergradient(*make_batches(5, seed=3)))
    floor = 1e-4 * float(results[0].val_loss)  # init.1.bias is round-off: a bias followed by BatchNorm
    # The two modes take the HVP by reverse-over-reverse and forward-over-reverse: other roundings. The
    # hypergradient grows its rounding 2e2 (rev) and 3e2 (fwd) times (hypergradient_amplification,
    # floor=1e-4: Adam with BatchNorm, J = 5), bounded by 1e3.
    tol = float64_rtol(terms=1, condition=1e3)
    for name, value in results[0].hypergrads.items():
        assert relative_error(results[1].hypergrads[name], value, floor) <= tol, name


def test_fwd_mode_falls_back_where_forward_ad_fails() -> None:
    """F.mse_loss has no forward-mode derivative of its backward in torch 2.13: one warning, same numbers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    loss = lambda m, b: F.mse_loss(m(b[0]), b[1])  # noqa: E731
    batches = [(torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)) for _ in range(3)]
    grads = {}
    for hvp in ("rev", "fwd"):
        m = copy.deepcopy(model)
        up = GimliUpdater(m, row("sgd-plain").for_model(m, grouped=False), loss, loss, unroll=3, learn={"lr": "group"},
                          hvp=hvp)
        if hvp == "fwd":
            with pytest.warns(RuntimeWarning, match="forward-mode AD failed"):
                grads[hvp] = up.hypergradient(batches, batches[0]).hypergrads["lr"]
        else:
            grads[hvp] = up.hypergradient(batches, batches[0]).hypergrads["lr"]
    # one learning rate of SGD through a tanh MLP, J = 3: its rounding grows 2 times (hypergradient_amplification)
    assert relative_error(grads["fwd"], grads["rev"]) <= float64_rtol(terms=1, condition=10)


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
    opt = row("adam-weight_decay").torch_optimizer([list(model.head.parameters()) + list(model.unused.parameters())])
    updater = GimliUpdater(model, opt, ce_loss, ce_loss, unroll=3, learn={"lr": "tensor"}, learn_init=True)
    batches, val = make_batches(3, seed=2)
    errors = check_hypergradients(updater, batches, val)
    assert {"init.body.weight", "init.head.weight", "init.unused.weight", "lr"} <= set(errors)
    assert max(errors.values()) <= 1e-9, errors
    grads = updater.hypergradient(batches, val).hypergrads
    assert float(grads["init.body.weight"].abs().max()) > 0
    assert float(grads["init.unused.weight"].abs().max()) == 0.0
    # lr of the unused tensors: never applied, so zero; shape is one entry per optimized tensor
    assert grads["lr"].shape == (4,)
    assert float(grads["lr"][2:].abs().max()) == 0.0


def _torch_unroll_val_loss(r: Row, model: nn.Module, batches: list[Any], val: Any, train_loss: Any,
                           **overrides: Any) -> float:
    """The validation loss after real torch.optim training with the row's optimizer (one group)."""
    m = copy.deepcopy(model)
    opt = r.for_model(m, grouped=False)
    for group in opt.param_groups:
        group.update(overrides)
    for batch in batches:
        opt.zero_grad()
        train_loss(m, batch).backward()
        opt.step()
    with torch.no_grad():
        return float(ce_loss(m, val))


def test_reference_agrees_with_finite_differences_for_loss_params_and_init() -> None:
    r = row("sgd-momentum")
    model = build_model("mlp", seed=7)
    w = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)

    def train_loss(m: Any, b: Any) -> Tensor:
        return ce_loss(m, b) + w * sum((p**2).sum() for p in m.parameters())

    batches, val = make_batches(3, seed=7)
    m = copy.deepcopy(model)
    updater = GimliUpdater(m, r.for_model(m, grouped=False), train_loss, ce_loss, unroll=3, loss_params={"w": w},
                           learn_init=True)
    ours = updater.hypergradient(batches, val).hypergrads
    _, ref = reference_hypergradients(updater, batches, val)
    assert relative_error(ours["loss.w"], ref["loss.w"]) <= 1e-9
    h = 1e-6
    vals = []
    for sign in (1, -1):
        with torch.no_grad():
            w.add_(sign * h)
        vals.append(_torch_unroll_val_loss(r, model, batches, val, train_loss))
        with torch.no_grad():
            w.sub_(sign * h)
    fd = (vals[0] - vals[1]) / (2 * h)
    assert abs(float(ours["loss.w"]) - fd) <= 1e-6 * abs(fd), (float(ours["loss.w"]), fd)


@pytest.mark.parametrize("row_id", ["sgd-momentum-dampening-wd", "adamw-lr-weight_decay"])
def test_inner_lr_schedule_matches_torch_lambda_lr(row_id: str) -> None:
    """A warm-up inside the unroll: the same as torch's LambdaLR, and differentiated through."""
    r = row(row_id)
    warmup = lambda j: min(1.0, (j + 1) / 3)  # noqa: E731
    model = build_model("mlp", seed=11)
    batches, val = make_batches(5, seed=11)
    m = copy.deepcopy(model)
    up = GimliUpdater(m, r.for_model(m, grouped=False), ce_loss, ce_loss, unroll=5, learn={"lr": "tensor"},
                      lr_schedule=warmup)
    errors = check_hypergradients(up, batches, val)
    assert max(errors.values()) <= r.tol.hypergrad, errors
    ours = float(up.hypergradient(batches, val).hypergrads["lr"].sum())  # all tensors share the base lr
    base = float(r.kwargs["lr"])

    def torch_run(lr: float) -> float:
        mm = copy.deepcopy(model)
        opt = r.for_model(mm, grouped=False)
        opt.param_groups[0]["lr"] = opt.param_groups[0]["initial_lr"] = lr
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup)
        for batch in batches:
            opt.zero_grad()
            ce_loss(mm, batch).backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            return float(ce_loss(mm, val))

    h = 1e-7
    fd = (torch_run(base + h) - torch_run(base - h)) / (2 * h)
    assert abs(ours - fd) <= 1e-5 * abs(fd), (ours, fd)


def test_lr_schedule_errors() -> None:
    model = build_model("mlp")
    plain = row("sgd-plain")
    up = GimliUpdater(model, plain.for_model(model, grouped=False), ce_loss, ce_loss, unroll=2, learn=["lr"],
                      lr_schedule=lambda j: -1.0)
    with pytest.raises(ValueError, match=r"lr_schedule\(0\) returned -1.0"):
        up.hypergradient(*make_batches(2))
    with pytest.raises(TypeError, match="lr_schedule must be a function"):
        GimliUpdater(model, plain.for_model(model, grouped=False), ce_loss, ce_loss, learn=["lr"],
                     lr_schedule=0.5)  # type: ignore[arg-type]
