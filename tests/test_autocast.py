# SPDX-License-Identifier: Apache-2.0
"""Mixed precision on the CPU: losses under ``torch.autocast(bfloat16)`` give the hypergradient of the
autocast training (float32 parameters and optimizer state, bfloat16 matrix products); parameters
stored in float16 or bfloat16 are rejected with the fix; frozen ones may stay in bfloat16."""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gimli_bptt import GimliUpdater
from gimli_bptt.testing import reference_hypergradients, relative_error

#: Both sides run the same bfloat16 products on the same float32 inputs, but the hypergradient's
#: cotangents reach them summed in another order (one Hessian-vector product per step against one
#: backward pass through the whole unroll). An input that differs in float32's last bit can round
#: to a neighbouring bfloat16 value: one bfloat16 ulp (2^-8 relative) in that product. The
#: hypergradients here are sums whose terms are at most a few times the result (well-conditioned
#: two-layer networks, three steps), so 4 ulps (2^-6 = 1.6e-2) bounds the difference; the
#: computations are otherwise the same and agree to about 1e-7 here. A wrong term is O(1).
TOL = 2.0**-6
UNROLL = 3


def autocast_loss(model: Any, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.dtype == torch.bfloat16  # the products ran in bfloat16
    return F.cross_entropy(logits.float(), y)


def _batches() -> tuple[list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(UNROLL + 1)]
    return batches[:UNROLL], batches[UNROLL]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def _assert_matches_autograd_under_autocast(updater: GimliUpdater) -> dict[str, Any]:
    batches, val = _batches()
    ours = updater.hypergradient(batches, val)
    L, ref = reference_hypergradients(updater, batches, val)  # the same losses: the same autocast
    assert set(ours.hypergrads) == set(ref)
    for name, value in ref.items():
        err = relative_error(ours.hypergrads[name], value)
        assert err <= TOL, (name, err)
        assert torch.isfinite(ours.hypergrads[name]).all() and float(ours.hypergrads[name].abs().max()) > 0, name
    assert abs(float(ours.val_loss) - float(L)) <= TOL * abs(float(L))
    return ours.hypergrads


def _updater(optimizer: str, first_order: bool = False) -> GimliUpdater:
    """Learning rates large enough that the second-order terms carry a tenth of the hypergradient or more."""
    model = _mlp()
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        learn = {"lr": "tensor", "beta1": "group"}
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        learn = {"lr": "tensor", "momentum": "group"}
    return GimliUpdater(model, opt, autocast_loss, autocast_loss, unroll=UNROLL, learn=learn, first_order=first_order)


@pytest.mark.parametrize("optimizer", ["sgd-momentum", "adam"])
def test_autocast_bfloat16_against_autograd(optimizer: str) -> None:
    ours = _assert_matches_autograd_under_autocast(_updater(optimizer))
    # The check can fail: without the second-order terms (H·Ḡ, [Alg.1 L13-L14]) the learning rates'
    # hypergradient moves by 0.36 (SGD) and 0.78 (Adam) relative, far outside TOL.
    first_order = _updater(optimizer, first_order=True).hypergradient(*_batches()).hypergrads
    assert relative_error(first_order["lr"], ours["lr"]) > 8 * TOL


def test_autocast_differs_from_float32() -> None:
    """The autocast hypergradient is that training's own: off the float32 one by bfloat16's rounding."""
    grads = {}
    for name, loss in (("autocast", autocast_loss), ("float32", lambda m, b: F.cross_entropy(m(b[0]), b[1]))):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        grads[name] = GimliUpdater(model, opt, loss, loss, unroll=UNROLL, learn={"lr": "tensor"}
                                   ).hypergradient(*_batches()).hypergrads["lr"]
    err = relative_error(grads["autocast"], grads["float32"])
    assert 2.0**-16 < err < 2.0**-3, err  # above float32's round-off, within a few bfloat16 ulps


def test_frozen_bfloat16_backbone_under_autocast() -> None:
    """A frozen backbone stored in bfloat16 (a constant of the unroll) and a float32 head."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    model[0].to(torch.bfloat16).requires_grad_(False)
    opt = torch.optim.Adam(model[2].parameters(), lr=1e-2)
    updater = GimliUpdater(model, opt, autocast_loss, autocast_loss, unroll=UNROLL, learn={"lr": "tensor"})
    _assert_matches_autograd_under_autocast(updater)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_against_autograd(dtype: torch.dtype) -> None:
    """The same check on CUDA (float16: no GradScaler; the losses here are O(1), far from float16's underflow)."""
    def loss(model: Any, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        with torch.autocast("cuda", dtype=dtype):
            logits = model(x.cuda())
        assert logits.dtype == dtype
        return F.cross_entropy(logits.float(), y.cuda())

    model = _mlp().cuda()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    _assert_matches_autograd_under_autocast(GimliUpdater(model, opt, loss, loss, unroll=UNROLL, learn={"lr": "tensor"}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_are_rejected_with_the_fix(dtype: torch.dtype) -> None:
    model = _mlp().to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.raises(TypeError, match=r"parameter '0.weight' is stored in torch\.(b)?float16") as info:
        GimliUpdater(model, opt, autocast_loss, autocast_loss, unroll=UNROLL, learn={"lr": "group"})
    assert "torch.autocast(device_type, dtype=torch.bfloat16)" in str(info.value)
