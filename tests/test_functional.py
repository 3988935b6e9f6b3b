# SPDX-License-Identifier: Apache-2.0
"""FunctionalModel: binding by slots (Note [Binding by slots]) computes what functional_call computes."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from gimli_bptt.functional import FunctionalModel, ModuleSlots


class Tied(nn.Module):
    """A head that shares its weight matrix with the encoder (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(5, 3, bias=False)
        self.dec = nn.Linear(3, 5)
        self.head = nn.Linear(5, 3, bias=False)
        self.head.weight = self.enc.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.dec(self.enc(x))))


class Symmetric(nn.Module):
    def forward(self, w: Tensor) -> Tensor:
        return w.triu() + w.triu(1).transpose(0, 1)


def _parametrized() -> nn.Module:
    m = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))
    parametrize.register_parametrization(m[0], "weight", Symmetric())
    return m


MODELS = {
    "mlp": lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)),
    "batchnorm": lambda: nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3)),
    "tied": Tied,
    "parametrized": _parametrized,
}


def _bound(module: nn.Module, slots: ModuleSlots | None, scale: float) -> tuple[FunctionalModel, dict[str, Tensor]]:
    params = {n: (p.detach() * scale).requires_grad_(True) for n, p in module.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
    return FunctionalModel(module, params, buffers, slots), params


@pytest.mark.parametrize("name", list(MODELS))
def test_slots_compute_what_functional_call_computes(name: str) -> None:
    torch.manual_seed(0)
    module = MODELS[name]().double()
    before = {n: t.detach().clone() for n, t in module.state_dict().items()}
    slots = ModuleSlots(module)
    assert slots.usable
    x = torch.randn(8, 5, dtype=torch.float64)
    fast, p_fast = _bound(module, slots, 1.5)
    slow, p_slow = _bound(module, None, 1.5)
    assert fast._slots is not None and slow._slots is None
    y_fast, y_slow = fast(x), slow(x)
    assert torch.equal(y_fast, y_slow)
    g_fast = torch.autograd.grad(y_fast.square().sum(), list(p_fast.values()))
    g_slow = torch.autograd.grad(y_slow.square().sum(), list(p_slow.values()))
    for a, b in zip(g_fast, g_slow):
        assert torch.equal(a, b)
    for (n, a), b in zip(fast.named_buffers(), slow.buffers()):  # BatchNorm statistics, updated in place
        assert torch.equal(a, b), n
    after = module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before), \
        "the module's own tensors changed"
    for n, p in module.named_parameters():
        assert isinstance(p, nn.Parameter), f"{n} was not restored"


def test_tied_weights_bind_every_alias() -> None:
    module = Tied()
    slots = ModuleSlots(module)
    assert list(slots.params) == [n for n, _ in module.named_parameters()]
    assert len(slots.params["enc.weight"]) == 2  # enc.weight and head.weight are one tensor


def test_module_is_restored_when_forward_raises() -> None:
    class Fails(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:
            raise RuntimeError("boom")

    module = Fails()
    weight = module.lin.weight
    model, _ = _bound(module, ModuleSlots(module), 2.0)
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.zeros(1, 3))
    assert module.lin.weight is weight


def test_modules_that_override_setattr_use_functional_call() -> None:
    module = nn.Sequential(nn.LSTM(4, 6, batch_first=True))
    slots = ModuleSlots(module)
    assert not slots.usable
    model, params = _bound(module, slots, 0.5)
    assert model._slots is None
    out, _ = model(torch.randn(2, 3, 4))
    ref, _ = torch.func.functional_call(module, params, (torch.randn(2, 3, 4),))
    assert out.shape == ref.shape


def test_slots_not_covering_the_names_fall_back() -> None:
    module = nn.Linear(3, 2)
    slots = ModuleSlots(module)
    params = {"weight": torch.zeros(2, 3)}  # no bias: functional_call decides (and raises, strict)
    model = FunctionalModel(module, params, {}, slots)
    assert model._slots is None
    with pytest.raises(RuntimeError, match="bias"):
        model(torch.zeros(1, 3))
