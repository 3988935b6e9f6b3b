# SPDX-License-Identifier: Apache-2.0
"""Small float64 models, optimizers and data shared by the engine tests."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ARCHS = ("mlp", "mlp_bn", "conv", "conv_bn", "dropout")  # drawn by test_hypergrad; build_model also has mlp_bn_dropout

#: (name, torch class, kwargs, hyperparameters that can be learned)
OPTIMIZERS: list[tuple[str, type, dict[str, Any], tuple[str, ...]]] = [
    ("sgd", torch.optim.SGD, dict(lr=0.1), ("lr", "weight_decay")),
    ("sgd_momentum", torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
     ("lr", "momentum", "dampening", "weight_decay")),
    ("sgd_nesterov", torch.optim.SGD, dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.02),
     ("lr", "momentum", "weight_decay")),
    ("sgd_maximize", torch.optim.SGD, dict(lr=0.05, momentum=0.5, maximize=True), ("lr", "momentum")),
    ("adam", torch.optim.Adam, dict(lr=0.01), ("lr", "beta1", "beta2", "eps", "weight_decay")),
    ("adam_amsgrad", torch.optim.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.01, eps=1e-3),
     ("lr", "beta1", "beta2", "eps", "weight_decay")),
    ("adamw", torch.optim.AdamW, dict(lr=0.01, weight_decay=0.05), ("lr", "beta1", "beta2", "eps", "weight_decay")),
    ("adam_maximize", torch.optim.Adam, dict(lr=0.01, maximize=True), ("lr", "beta1", "beta2")),
]
# --- Adagrad, RMSprop, Adadelta, Adamax (issue 3, part a) ---
OPTIMIZERS += [
    ("adagrad", torch.optim.Adagrad, dict(lr=0.05, lr_decay=0.02, weight_decay=0.01, initial_accumulator_value=0.1),
     ("lr", "lr_decay", "weight_decay", "eps")),
    ("rmsprop", torch.optim.RMSprop, dict(lr=0.01, weight_decay=0.01),
     ("lr", "alpha", "eps", "weight_decay", "momentum")),
    ("rmsprop_centered_momentum", torch.optim.RMSprop,
     dict(lr=0.005, alpha=0.9, centered=True, momentum=0.5, maximize=True, eps=1e-4),
     ("lr", "alpha", "eps", "weight_decay", "momentum")),
    ("adadelta", torch.optim.Adadelta, dict(lr=0.5, rho=0.8, weight_decay=0.01), ("lr", "rho", "eps", "weight_decay")),
    ("adamax", torch.optim.Adamax, dict(lr=0.01, weight_decay=0.01, eps=1e-4),
     ("lr", "beta1", "beta2", "eps", "weight_decay")),
]
# --- end of issue 3, part a ---

# --- issue 3, part B: NAdam, RAdam, ASGD, Rprop ---
_NADAM_HYPER = ("lr", "beta1", "beta2", "eps", "weight_decay", "momentum_decay")
_RADAM_HYPER = ("lr", "beta1", "beta2", "eps", "weight_decay")
OPTIMIZERS += [
    ("nadam", torch.optim.NAdam, dict(lr=0.01, weight_decay=0.01, eps=1e-3), _NADAM_HYPER),
    ("nadamw_maximize", torch.optim.NAdam,
     dict(lr=0.01, weight_decay=0.05, decoupled_weight_decay=True, maximize=True, momentum_decay=0.1), _NADAM_HYPER),
    # rectified from inner step 6 on (beta2 = 0.9): unrolls of 6 to 8 steps cross the switch.
    ("radam", torch.optim.RAdam, dict(lr=0.01, betas=(0.9, 0.9), weight_decay=0.01), _RADAM_HYPER),
    ("radam_decoupled", torch.optim.RAdam, dict(lr=0.01, weight_decay=0.05, decoupled_weight_decay=True),
     _RADAM_HYPER),
    ("asgd", torch.optim.ASGD, dict(lr=0.05, lambd=0.01, t0=2.0, weight_decay=0.01),
     ("lr", "lambd", "alpha", "weight_decay")),
    ("rprop", torch.optim.Rprop, dict(lr=0.01, step_sizes=(2e-3, 0.02)),
     ("lr", "etaminus", "etaplus", "step_size_min", "step_size_max")),
]
# --- end part B ---
OPTIMIZER_NAMES = [o[0] for o in OPTIMIZERS]


def optimizer_row(name: str) -> tuple[str, type, dict[str, Any], tuple[str, ...]]:
    return next(o for o in OPTIMIZERS if o[0] == name)


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
