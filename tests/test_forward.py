# SPDX-License-Identifier: Apache-2.0
"""mode="forward": tangents carried along the inner loop give reverse mode's hypergradients, offline and online."""
from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from gimli_bptt import GimliUpdater, NonFiniteError
from gimli_bptt.testing import float64_rtol, relative_error

from optim_table import ROWS, Row
from problems import build_model, ce_loss, make_batches
from snapshots import assert_unchanged, snapshot

TOL = 1e-10
# (no bias right before BatchNorm: its gradient is round-off, which Adafactor's eps1 ~ 1e-16 amplifies)
ARCH = "mlp_bn_dropout"
_ROWS = [pytest.param(r, id=r.id) for r in ROWS if "hypergrad" not in r.skips]
_ONE_ROW_PER_OPTIMIZER = [pytest.param(r, id=r.id) for r in
                          {r.impl.name: r for r in reversed([p.values[0] for p in _ROWS])}.values()]


def _updater(row: Row, mode: str, learn: dict[str, str], J: int = 4, arch: str = ARCH, grouped: bool = True,
             **options: Any) -> GimliUpdater:
    model = build_model(arch, seed=3)
    return GimliUpdater(model, row.for_model(model, grouped), ce_loss, ce_loss, unroll=J, learn=learn, mode=mode,
                        **options)


def _assert_same(forward: dict[str, Tensor], reverse: dict[str, Tensor], tol: float = TOL) -> None:
    assert forward.keys() == reverse.keys()
    scale = max(float(v.abs().max()) for v in reverse.values())
    for name, v in reverse.items():
        assert forward[name].shape == v.shape, name
        err = float((forward[name] - v).abs().max()) / max(float(v.abs().max()), 1e-6 * scale)
        assert err <= tol, f"{name}: forward vs reverse relative error {err:.2e}"


def _both(row: Row, learn: dict[str, str], seed: int = 3, J: int = 4, **options: Any) -> tuple[Any, Any]:
    out = []
    for mode in ("forward", "reverse"):
        torch.manual_seed(seed)  # dropout draws the same masks in both
        out.append(_updater(row, mode, learn, J, **options).hypergradient(*make_batches(J, seed=seed)))
    return out[0], out[1]


@pytest.mark.parametrize("row", _ROWS)
def test_forward_equals_reverse(row: Row) -> None:
    """Every hyperparameter of every row, learned together: the first per tensor, the others per
    group (the random test below draws the granularities)."""
    names = row.impl.hyper_names
    fwd, rev = _both(row, {n: "tensor" if k == 0 else "group" for k, n in enumerate(names)})
    _assert_same(fwd.hypergrads, rev.hypergrads)
    assert torch.equal(fwd.val_loss, rev.val_loss)


@pytest.mark.parametrize("row", _ONE_ROW_PER_OPTIMIZER)
def test_one_direction(row: Row) -> None:
    """m = 1 (one param group, one learned scalar) takes the path without vmap (Note [One direction])."""
    learn = {row.impl.hyper_names[0]: "group"}
    out = []
    for mode in ("forward", "reverse"):
        torch.manual_seed(3)
        up = _updater(row, mode, learn, grouped=False)
        out.append(up.hypergradient(*make_batches(4, seed=3)))
    assert out[0].hypergrads[row.impl.hyper_names[0]].shape == (1,)
    _assert_same(out[0].hypergrads, out[1].hypergrads)


@settings(max_examples=15, deadline=None)
@given(row=st.sampled_from([p.values[0] for p in _ROWS]), J=st.integers(1, 6), seed=st.integers(0, 2**10),
       granularity=st.sampled_from(["group", "tensor"]), first_order=st.booleans(),
       arch=st.sampled_from(["mlp", "mlp_bn_dropout", "conv"]), schedule=st.booleans())
def test_forward_random(row: Row, J: int, seed: int, granularity: str, first_order: bool, arch: str,
                        schedule: bool) -> None:
    if not row.shapes.accepts((3, 1, 3, 3)) and arch == "conv":
        arch = "mlp"
    names = row.impl.hyper_names[: 1 + seed % len(row.impl.hyper_names)]
    options: dict[str, Any] = dict(first_order=first_order, arch=arch)
    if schedule and "lr" in row.impl.hyper_names:
        options["lr_schedule"] = lambda j: 0.5 + 0.25 * j
    fwd, rev = _both(row, {n: granularity for n in names}, seed, J, **options)
    _assert_same(fwd.hypergrads, rev.hypergrads, tol=1e-9)


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adam])
def test_online_hypergradient_is_reverse_mode_over_the_same_trajectory(cls: type) -> None:
    row = next(r for r in ROWS if r.torch_cls is cls and (cls is not torch.optim.SGD or r.kwargs.get("momentum")))
    learn = {name: "group" if k % 2 else "tensor" for k, name in enumerate(row.impl.hyper_names[:2])}
    J = 5
    batches, val = make_batches(J, seed=7)
    online = _updater(row, "forward", learn, J, arch="mlp_bn")
    start_model = copy.deepcopy(online.model.state_dict())
    start_opt = copy.deepcopy(online.opt.state_dict())
    for batch in batches:
        online.train_step(batch)
    ours = online.online_hypergradient(val)
    assert ours.train_losses.shape == (J,)
    offline = _updater(row, "reverse", learn, J, arch="mlp_bn")
    offline.model.load_state_dict(start_model)
    offline.opt.load_state_dict(start_opt)
    _assert_same(ours.hypergrads, offline.hypergradient(batches, val).hypergrads)
    if cls is torch.optim.Adam:
        return  # (Adam divides the round-off gradient of the bias before BatchNorm by its own size)
    # the model really trained: train_step wrote θ_J, the buffers and the state, as torch.optim would
    twin = copy.deepcopy(offline.model)
    opt = row.for_model(twin)
    opt.load_state_dict(start_opt)
    for batch in batches:
        opt.zero_grad()
        ce_loss(twin, batch).backward()
        opt.step()
    # J = 5 steps of SGD with momentum over BatchNorm: the rounding grows 1.03 times (rounding_amplification)
    for a, b in zip(online.model.state_dict().values(), twin.state_dict().values()):
        assert relative_error(a, b) <= float64_rtol(terms=1, condition=10)


def test_online_step_updates_and_resets_or_decays() -> None:
    row = next(r for r in ROWS if r.torch_cls is torch.optim.SGD and r.kwargs.get("momentum"))
    up = _updater(row, "forward", {"lr": "group"}, arch="mlp", meta_opt=functools.partial(torch.optim.SGD, lr=1e-2))
    batches, val = make_batches(3, seed=8)
    for batch in batches:
        up.train_step(batch)
    before = float(up.hyper.values["lr"][0])
    result = up.online_step(val)
    assert float(up.hyper.values["lr"][0]) != before and up.meta_steps == 1
    assert float(up.opt.param_groups[0]["lr"]) == float(up.hyper.values["lr"][0])  # written back
    assert up.online_hypergradient(val).train_losses.numel() == 0  # reset: no trajectory
    for batch in batches:
        up.train_step(batch)
    carried = up._online
    assert carried is not None
    up.online_step(val, decay=0.5)
    assert up._online is not None and torch.allclose(up._online.theta[0], 0.5 * carried.theta[0])
    assert result.hypergrads["lr"].shape == (len(up.opt.param_groups),)
    with pytest.raises(ValueError, match="decay must be in"):
        up.online_step(val, decay=1.5)


def test_a_failed_forward_step_changes_nothing() -> None:
    row = next(r for r in ROWS if r.torch_cls is torch.optim.Adam)
    up = _updater(row, "forward", {"lr": "tensor"}, J=3, arch="mlp_bn")
    batches, val = make_batches(3, seed=9)
    x, y = batches[2]
    batches[2] = (torch.full_like(x, float("nan")), y)
    before = snapshot(up)
    with pytest.raises(NonFiniteError, match="inner step 2"):
        up.step(batches, val)
    assert_unchanged(before, snapshot(up))


def test_forward_mode_keeps_no_tape() -> None:
    row = next(r for r in ROWS if r.torch_cls is torch.optim.SGD)
    up = _updater(row, "forward", {"lr": "group"}, J=6, arch="mlp")
    up.hypergradient(*make_batches(6, seed=1))
    stats = up.last_tape_stats
    assert stats is not None and stats.schedule == "forward" and stats.max_slots_used == 1 and stats.graphs_kept == 0


@pytest.mark.parametrize("options, learn, match", [
    (dict(), {"lr": "element"}, "learned per element"),
    (dict(learn_init=True), {"lr": "group"}, "learn θ_0 with mode='reverse'"),
    (dict(truncate=2), {"lr": "group"}, "truncate= and mode='forward' contradict"),
    (dict(tasks=2), {"lr": "group"}, "does not take tasks"),
    (dict(mode="sideways"), {"lr": "group"}, "mode must be one of"),
])
def test_bad_forward_options(options: dict[str, Any], learn: dict[str, str], match: str) -> None:
    row = next(r for r in ROWS if r.torch_cls is torch.optim.SGD)
    mode = options.pop("mode", "forward")
    with pytest.raises(ValueError, match=match):
        _updater(row, mode, learn, arch="mlp", **options)


def test_forward_mode_rejects_loss_parameters_and_too_many_scalars() -> None:
    model = build_model("mlp", seed=1)
    w = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="loss_params with mode='reverse'"):
        GimliUpdater(model, torch.optim.SGD(model.parameters(), lr=0.1), ce_loss, ce_loss, learn={"lr": "group"},
                     loss_params={"w": w}, mode="forward")
    wide = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(40)]).double()
    with pytest.raises(ValueError, match="at most 64"):
        GimliUpdater(wide, torch.optim.SGD(wide.parameters(), lr=0.1), ce_loss, ce_loss, learn={"lr": "tensor"},
                     mode="forward")
    up = GimliUpdater(model, torch.optim.SGD(model.parameters(), lr=0.1), ce_loss, ce_loss, learn={"lr": "group"})
    with pytest.raises(RuntimeError, match="mode='forward'"):
        up.online_hypergradient(make_batches(1)[1])
