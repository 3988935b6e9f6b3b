# SPDX-License-Identifier: Apache-2.0
"""Parameters outside the inner optimizer: frozen (``requires_grad=False``) and trainable but not
optimized. Both are constants of the unroll; ``learn_init`` learns θ_0 of the second kind only."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gimli_bptt import GimliUpdater
from gimli_bptt.testing import check_hypergradients

D = torch.float64
#: float64 round-off (1e-16) grown by the few hundred multiply-adds of a 3-step unroll of this
#: well-conditioned 30-parameter model (its hypergradients are O(1e-2) to O(1), none cancels to
#: zero): about 1e-13. A wrong or missing term is O(1) relative.
TOL = 1e-10


class Backbone(nn.Module):
    """A frozen feature extractor, a trainable neck outside the optimizer, an optimized head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(4, 6)
        self.neck = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.neck(torch.tanh(self.backbone(x)))))


def _setup(learn_init: bool) -> tuple[GimliUpdater, list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
    torch.manual_seed(0)
    model = Backbone().double()
    model.backbone.requires_grad_(False)
    opt = torch.optim.Adam(model.head.parameters(), lr=0.05)
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 4, dtype=D, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]
    updater = GimliUpdater(model, opt, loss, loss, unroll=3, learn={"lr": "group", "beta1": "group"},
                           learn_init=learn_init)
    return updater, batches[:3], batches[3]


@pytest.mark.parametrize("learn_init", [False, True], ids=["constants", "learn_init"])
def test_frozen_backbone_against_autograd(learn_init: bool) -> None:
    updater, batches, val = _setup(learn_init)
    names = {n for n, _ in updater.named_meta_parameters()}
    init = {"init.neck.weight", "init.neck.bias", "init.head.weight", "init.head.bias"}
    # requires_grad=False is a constant either way: no init.backbone.*
    assert names == ({"lr", "beta1"} | (init if learn_init else set())), names
    errors = check_hypergradients(updater, batches, val)
    assert set(errors) == names
    assert max(errors.values()) <= TOL, errors
    grads = updater.hypergradient(batches, val).hypergrads
    for name, g in grads.items():
        assert torch.isfinite(g).all() and float(g.abs().max()) > 0, name  # each one moves L_val


def test_frozen_parameters_do_not_move() -> None:
    """A meta step with commit=True advances the optimized parameters only; with learn_init the
    meta optimizer moves θ_0 of the neck, never the frozen backbone."""
    updater, batches, val = _setup(True)
    model = updater.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    updater.step(batches, val)
    after = dict(model.named_parameters())
    assert torch.equal(before["backbone.weight"], after["backbone.weight"])
    assert torch.equal(before["backbone.bias"], after["backbone.bias"])
    assert not torch.equal(before["neck.weight"], after["neck.weight"])  # θ_0 learned
    assert all(p.grad is None for p in model.backbone.parameters())


def test_learn_init_hypergradient_of_the_neck_is_the_autograd_one() -> None:
    """init.neck.* from the updater against autograd of L_val through the whole unroll by hand
    (torch.optim.Adam's math, the neck as a leaf, the backbone a constant)."""
    updater, batches, val = _setup(True)
    model = updater.model
    ours = updater.hypergradient(batches, val).hypergrads
    nw, nb = (p.detach().clone().requires_grad_(True) for p in (model.neck.weight, model.neck.bias))
    head = [p.detach().clone().requires_grad_(True) for p in model.head.parameters()]
    bw, bb = model.backbone.weight.detach(), model.backbone.bias.detach()
    lr, (b1, b2), eps = 0.05, (0.9, 0.999), 1e-8

    def f(x: Tensor, hw: Tensor, hb: Tensor) -> Tensor:
        return F.linear(torch.tanh(F.linear(torch.tanh(F.linear(x, bw, bb)), nw, nb)), hw, hb)

    theta, m, v = list(head), [torch.zeros_like(p) for p in head], [torch.zeros_like(p) for p in head]
    for t, (x, y) in enumerate(batches, 1):
        G = torch.autograd.grad(F.cross_entropy(f(x, *theta), y), theta, create_graph=True)
        m = [b1 * mi + (1 - b1) * g for mi, g in zip(m, G)]
        v = [b2 * vi + (1 - b2) * g * g for vi, g in zip(v, G)]
        theta = [p - lr / (1 - b1**t) * mi / ((vi / (1 - b2**t)).sqrt() + eps) for p, mi, vi in zip(theta, m, v)]
    gw, gb = torch.autograd.grad(F.cross_entropy(f(val[0], *theta), val[1]), (nw, nb))
    for got, want in ((ours["init.neck.weight"], gw), (ours["init.neck.bias"], gb)):
        assert float((got - want).abs().max()) <= TOL * float(want.abs().max())


def test_frozen_parameter_inside_the_optimizer_is_skipped_as_torch_optim_skips_it() -> None:
    """``torch.optim.Adam(model.parameters())`` over a frozen backbone (the PEFT habit): torch.optim
    never updates the frozen tensors (their ``.grad`` stays None), so the unroll must not either."""
    torch.manual_seed(0)
    model = Backbone().double()
    model.backbone.requires_grad_(False)
    twin = Backbone().double()
    twin.load_state_dict(model.state_dict())
    twin.backbone.requires_grad_(False)
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 4, dtype=D, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]
    opt = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=0.1)  # holds the frozen backbone too
    updater = GimliUpdater(model, opt, loss, loss, unroll=3, learn={"lr": "group"}, commit=True)
    names = {n for n, _ in updater.named_meta_parameters()}
    errors = check_hypergradients(updater, batches[:3], batches[3])
    assert max(errors.values()) <= TOL, errors
    backbone = [p.clone() for p in model.backbone.parameters()]
    updater.step(batches[:3], batches[3])  # commit=True: the model continues from θ'_J
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.05, weight_decay=0.1)
    for b in batches[:3]:
        twin_opt.zero_grad()
        loss(twin, b).backward()
        twin_opt.step()
    for p, q in zip(model.backbone.parameters(), backbone):
        assert torch.equal(p, q)  # a weight decay step would have moved it
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=TOL, atol=0, msg=n)
    assert names == {"lr"}


def test_an_optimizer_over_frozen_parameters_only_is_an_error() -> None:
    model = Backbone().double().requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    with pytest.raises(ValueError, match="requires_grad=False"):
        GimliUpdater(model, opt, loss, loss, unroll=2, learn={"lr": "group"})
