# SPDX-License-Identifier: Apache-2.0
"""Small float64 models, batches and losses shared by the engine tests (optimizer configurations: optim_table.py)."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The architectures test_hypergrad draws (hypothesis tries the first first); build_model also has mlp_bn_dropout.
ARCHS = ("mlp_bn", "mlp", "conv", "conv_bn", "dropout")


def build_model(arch: str, seed: int = 0, width: int = 5) -> nn.Module:
    """A small float64 model of the given architecture on inputs of shape (n, 1, 6, 6)."""
    torch.manual_seed(seed)
    if arch == "mlp":
        m: nn.Module = nn.Sequential(nn.Flatten(), nn.Linear(36, width), nn.Tanh(), nn.Linear(width, 3))
    elif arch == "mlp_bn":
        m = nn.Sequential(nn.Flatten(), nn.Linear(36, width), nn.BatchNorm1d(width), nn.Tanh(), nn.Linear(width, 3))
    elif arch == "conv":
        m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(48, 3))
    elif arch == "conv_bn":
        m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Softplus(), nn.Flatten(), nn.Linear(48, 3))
    elif arch == "mlp_bn_dropout":  # no bias before BatchNorm: its gradient would be pure round-off
        m = nn.Sequential(nn.Flatten(), nn.Linear(36, width, bias=False), nn.BatchNorm1d(width), nn.Tanh(),
                          nn.Dropout(0.3), nn.Linear(width, 3))
    elif arch == "dropout":
        m = nn.Sequential(nn.Flatten(), nn.Linear(36, width), nn.Tanh(), nn.Dropout(0.3), nn.Linear(width, 3))
    else:
        raise ValueError(arch)
    return m.double()


def make_batch(n: int = 8, seed: int | None = None) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.randn(n, 1, 6, 6, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    return x, y


def make_batches(J: int, n: int = 8, seed: int = 0) -> tuple[list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
    return [make_batch(n, seed * 1000 + j) for j in range(J)], make_batch(n, seed * 1000 + 999)


def ce_loss(model: Callable[[Tensor], Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def two_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Parameters split into two param groups: weights and biases (or the first half and the rest)."""
    params = list(model.parameters())
    half = max(1, len(params) // 2)
    return [{"params": params[:half]}, {"params": params[half:]}] if len(params) > 1 else [{"params": params}]
