# SPDX-License-Identifier: Apache-2.0
"""The public API of GimliUpdater: what step() changes, what it leaves, and what it returns."""
from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from gimli_bptt import FunctionalModel, GimliUpdater
from gimli_bptt.testing import check_hypergradients, float64_rtol, relative_error

from optim_table import row
from problems import build_model, ce_loss, make_batches
from snapshots import assert_unchanged, snapshot


def _torch_unroll(model: nn.Module, opt: torch.optim.Optimizer, batches: list[Any]) -> None:
    for batch in batches:
        opt.zero_grad()
        ce_loss(model, batch).backward()
        opt.step()


def test_hypergradient_changes_nothing() -> None:
    model = build_model("mlp_bn")
    opt = row("adam-lr").for_model(model)
    up = GimliUpdater(model, opt, ce_loss, ce_loss, unroll=3, learn={"lr": "group"}, learn_init=True)
    before = snapshot(up)
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    up.hypergradient(*make_batches(3))
    assert_unchanged(before, snapshot(up))
    assert groups == [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def test_step_updates_phi_writes_group_rates_and_leaves_the_model() -> None:
    model = build_model("mlp_bn")
    opt = row("sgd-heavy_momentum").for_model(model)
    up = GimliUpdater(model, opt, ce_loss, ce_loss, unroll=3, learn={"lr": "group"},
                      meta_opt=functools.partial(torch.optim.SGD, lr=0.01))
    model_before = copy.deepcopy(model.state_dict())
    lr_before = [grp["lr"] for grp in opt.param_groups]
    result = up.step(*make_batches(3))
    g = result.hypergrads["lr"]
    assert g.shape == (2,)
    expected = torch.tensor(lr_before, dtype=torch.float64) - 0.01 * g
    # one SGD step of the meta optimizer, a - 0.01 g: two roundings, each at most eps (|a| + |0.01 g|)
    bound = float64_rtol(terms=2) * (torch.tensor(lr_before, dtype=torch.float64).abs() + (0.01 * g).abs())
    assert ((up.hyper.values["lr"].detach() - expected).abs() <= bound).all()
    assert all(abs(grp["lr"] - e) <= b for grp, e, b in zip(opt.param_groups, expected.tolist(), bound.tolist()))
    for k, v in model_before.items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert len(opt.state) == 0


def test_result_shapes_for_every_granularity() -> None:
    model = build_model("conv_bn")
    opt = row("adam-lr").for_model(model)
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    up = GimliUpdater(model, opt, lambda m, b: w * ce_loss(m, b), ce_loss, unroll=2,
                      learn={"lr": "group", "beta1": "tensor", "beta2": "element"}, loss_params={"w": w},
                      learn_init=True)
    result = up.hypergradient(*make_batches(2))
    params = list(model.parameters())
    assert result.hypergrads["lr"].shape == (2,)
    assert result.hypergrads["beta1"].shape == (len(params),)
    assert [t.shape for t in result.hypergrads["beta2"]] == [p.shape for p in params]
    assert result.hypergrads["loss.w"].shape == ()
    for name, p in model.named_parameters():
        assert result.hypergrads[f"init.{name}"].shape == p.shape
    assert result.train_losses.shape == (2,)
    names = [n for n, _ in up.named_meta_parameters()]
    assert names[:2] == ["lr", "beta1"] and names[2].startswith("beta2.") and "loss.w" in names
    assert names[-1] == f"init.{list(dict(model.named_parameters()))[-1]}"


# Adam runs without BatchNorm here: the gradient of a bias followed by BatchNorm is pure
# round-off, which Adam's normalisation blows up to a step of size lr in either direction.
@pytest.mark.parametrize("arch, row_id", [("mlp_bn", "sgd-heavy_nesterov"), ("mlp", "adamw-amsgrad")])
def test_commit_continues_from_the_unrolled_state(arch: str, row_id: str) -> None:
    """commit=True leaves the model and optimizer exactly where J steps of torch.optim would."""
    model = build_model(arch)
    twin = copy.deepcopy(model)
    opt = row(row_id).for_model(model, grouped=False)
    twin_opt = row(row_id).for_model(twin, grouped=False)
    _torch_unroll(model, opt, make_batches(2, seed=8)[0])  # existing optimizer state is the starting point
    _torch_unroll(twin, twin_opt, make_batches(2, seed=8)[0])
    up = GimliUpdater(model, opt, ce_loss, ce_loss, unroll=4, learn={"lr": "group"}, commit=True,
                      meta_opt=functools.partial(torch.optim.SGD, lr=0.0))
    batches, val = make_batches(4, seed=9)
    up.step(batches, val)
    _torch_unroll(twin, twin_opt, batches)
    # Ours and torch.optim's steps round differently. J = 6 steps grow the rounding of the parameters, the
    # buffers and the state 2.8e3 times for sgd-heavy_nesterov over BatchNorm (the momentum of the bias
    # before BatchNorm is round-off: measured against 1e-4 of the largest entry) and 2.2 times for
    # adamw-amsgrad (testing.rounding_amplification of torch.optim's run), so 1e4 bounds both.
    tol = float64_rtol(terms=1, condition=1e4)
    pairs = [(name, a, b) for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values())]
    pairs += [(key, torch.as_tensor(opt.state[p][key]), torch.as_tensor(value))
              for p, q in zip(model.parameters(), twin.parameters()) for key, value in twin_opt.state[q].items()]
    floor = 1e-4 * max(float(b.double().abs().max()) for _, _, b in pairs if b.numel())
    for name, a, b in pairs:  # includes BatchNorm running statistics
        assert relative_error(a, b, floor) <= tol, name


def test_buffers_evolve_through_the_inner_loop() -> None:
    """BatchNorm's running statistics at θ'_J are those after J training steps; eval-mode
    validation therefore sees them (and the hypergradient accounts for it)."""
    model = build_model("mlp_bn")
    seen = {}

    def val_loss(m: FunctionalModel, b: Any) -> Tensor:
        seen["mean"] = dict(m.named_buffers())["2.running_mean"].clone()
        return ce_loss(m, b)

    opt = row("sgd-plain").for_model(model, grouped=False)
    up = GimliUpdater(model, opt, ce_loss, val_loss, unroll=3, learn=["lr"])
    batches, val = make_batches(3)
    up.hypergradient(batches, val)
    twin = copy.deepcopy(model)
    _torch_unroll(twin, row("sgd-plain").for_model(twin, grouped=False), batches)
    # the running mean after J = 3 steps of SGD: its rounding grows 1.2 times (rounding_amplification)
    assert relative_error(seen["mean"], twin.state_dict()["2.running_mean"]) <= float64_rtol(terms=1, condition=10)
    assert torch.equal(model.state_dict()["2.running_mean"], torch.zeros(5, dtype=torch.float64))


def test_dropout_is_replayed_exactly() -> None:
    model = build_model("dropout")
    opt = row("sgd-half_momentum").for_model(model, grouped=False)
    up = GimliUpdater(model, opt, ce_loss, ce_loss, unroll=4, learn={"lr": "element"}, learn_init=True)
    errors = check_hypergradients(up, *make_batches(4))
    assert max(errors.values()) <= 1e-9, errors


def test_maml_updates_the_initial_weights() -> None:
    model = build_model("mlp")
    opt = row("sgd-plain").for_model(model, grouped=False)
    up = GimliUpdater(model, opt, ce_loss, ce_loss, unroll=2, learn_init=True,
                      meta_opt=functools.partial(torch.optim.SGD, lr=0.5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = up.step(*make_batches(2))
    for name, p in model.named_parameters():
        step = 0.5 * result.hypergrads[f"init.{name}"]  # θ_0 - 0.5 θ̄_0: two roundings of |θ_0| + |step|
        bound = float64_rtol(terms=2) * (before[name].abs() + step.abs())
        assert ((p.detach() - (before[name] - step)).abs() <= bound).all(), name


@pytest.mark.parametrize("gran", ["group", "tensor", "element"])
def test_train_step_applies_learned_rates_like_torch_optim(gran: str) -> None:
    model = build_model("mlp_bn")
    twin = copy.deepcopy(model)
    r = row("sgd-momentum-dampening-wd")
    opt = r.for_model(model)
    up = GimliUpdater(model, opt, ce_loss, ce_loss, unroll=2, learn={"lr": gran})
    with torch.no_grad():
        for t in up.hyper.leaves():
            t.fill_(0.07)  # as if learned
    twin_opt = r.for_model(twin)
    for group in twin_opt.param_groups:
        group["lr"] = 0.07
    for batch in make_batches(3)[0]:
        loss = up.train_step(batch)
        twin_opt.zero_grad()
        twin_loss = ce_loss(twin, batch)
        twin_loss.backward()
        twin_opt.step()
        # a mean over the batch at θ_j, and θ_J, J = 3: the rounding grows 1.02 times (rounding_amplification)
        assert float(loss) == pytest.approx(float(twin_loss), rel=float64_rtol(terms=1, condition=10))
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert relative_error(a, b) <= float64_rtol(terms=1, condition=10), name


def test_the_model_view_exposes_inner_parameters() -> None:
    model = build_model("mlp")
    seen: list[list[Tensor]] = []

    def train_loss(m: FunctionalModel, b: Any) -> Tensor:
        seen.append([p.detach().clone() for p in m.parameters()])
        assert [n for n, _ in m.named_parameters()] == [n for n, _ in model.named_parameters()]
        return ce_loss(m, b)

    opt = row("sgd-plain").for_model(model, grouped=False)
    GimliUpdater(model, opt, train_loss, ce_loss, unroll=2, learn=["lr"]).hypergradient(*make_batches(2))
    first, second = seen[0], seen[1]
    assert all(torch.equal(a, p) for a, p in zip(first, model.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(first, second))


def test_tied_weights() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(36, 6, bias=False)
            self.dec = nn.Linear(6, 36, bias=False)
            self.dec.weight = nn.Parameter(self.enc.weight.t().contiguous())
            self.head = nn.Linear(36, 3)
            self.head.weight = self.head.weight  # plain

        def forward(self, x: Tensor) -> Tensor:
            h = torch.tanh(self.enc(x.flatten(1)))
            return self.head(torch.nn.functional.linear(h, self.enc.weight.t()))

    torch.manual_seed(0)
    model = Tied().double()
    opt = row("adam-lr").for_model(model, grouped=False)
    up = GimliUpdater(model, opt, ce_loss, ce_loss, unroll=3, learn={"lr": "tensor"}, learn_init=True)
    errors = check_hypergradients(up, *make_batches(3))
    assert max(errors.values()) <= 1e-9, errors


def test_repr_mentions_the_configuration() -> None:
    model = build_model("mlp")
    up = GimliUpdater(model, row("sgd-plain").for_model(model, grouped=False), ce_loss, ce_loss, unroll=5,
                      learn={"lr": "tensor"})
    assert "SGD" in repr(up) and "unroll=5" in repr(up) and "lr:tensor" in repr(up)
