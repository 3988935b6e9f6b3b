# SPDX-License-Identifier: Apache-2.0
"""A small built-in demo: meta-learn the per-layer learning rates of an MLP on a synthetic task."""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .updater import GimliUpdater


@dataclass
class DemoConfig:
    """Settings of :func:`run_demo` (the command line's flags)."""

    meta_steps: int = 150
    unroll: int = 10
    lr: float = 0.02
    meta_lr: float = 0.01
    hidden: int = 64
    batch: int = 64
    optimizer: str = "sgd"
    hvp: str = "rev"
    seed: int = 0
    print_every: int = 15


def _teacher_task(seed: int, dim: int = 16, classes: int = 4) -> Callable[[int], tuple[Tensor, Tensor]]:
    """A classification task labelled by a fixed random teacher network: no data download."""
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(dim, 32, generator=gen)
    w2 = torch.randn(32, classes, generator=gen)

    def sample(n: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, dim, generator=gen)
        y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
        return x, y

    return sample


def _batches(sample: Callable[[int], tuple[Tensor, Tensor]], n: int, size: int) -> list[tuple[Tensor, Tensor]]:
    return [sample(size) for _ in range(n)]


def _loss(model: Callable[[Tensor], Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def run_demo(cfg: DemoConfig, log: Optional[Callable[[str], None]] = print) -> dict[str, list[float]]:
    """Trains an MLP while meta-learning one learning rate per layer (Algorithm 1, one meta step
    per J inner steps, continuing training from θ'_J).

    Returns:
        ``{"val_loss": [...], "lr_<group>": [...]}``, one value per meta step.
    """
    torch.manual_seed(cfg.seed)
    sample = _teacher_task(cfg.seed)
    model = nn.Sequential(nn.Linear(16, cfg.hidden), nn.Tanh(), nn.Linear(cfg.hidden, cfg.hidden), nn.Tanh(),
                          nn.Linear(cfg.hidden, 4))
    groups = [{"params": layer.parameters()} for layer in model if isinstance(layer, nn.Linear)]
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    elif cfg.optimizer == "adam":
        opt = torch.optim.Adam(groups, lr=cfg.lr)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}: use 'sgd' or 'adam'")
    updater = GimliUpdater(
        model, opt, _loss, _loss, unroll=cfg.unroll, learn={"lr": "group"}, hvp=cfg.hvp, commit=True,
        meta_opt=functools.partial(torch.optim.Adam, lr=cfg.meta_lr),
    )
    val_batch = sample(512)
    history: dict[str, list[float]] = {"val_loss": []}
    start = time.perf_counter()
    if log:
        log(f"meta-learning {len(groups)} per-layer learning rates of {cfg.optimizer.upper()} "
            f"(start {cfg.lr}), J={cfg.unroll} inner steps per meta step, {cfg.meta_steps} meta steps")
        log(f"{'meta step':>9}  {'val loss':>8}  learned rates")
    for i in range(cfg.meta_steps):
        result = updater.step(_batches(sample, cfg.unroll, cfg.batch), val_batch)
        history["val_loss"].append(float(result.val_loss))
        rates = [float(g["lr"]) for g in opt.param_groups]
        for g, r in enumerate(rates):
            history.setdefault(f"lr_{g}", []).append(r)
        if log and (i % cfg.print_every == 0 or i == cfg.meta_steps - 1):
            log(f"{i:>9}  {float(result.val_loss):8.4f}  " + "  ".join(f"{r:.4f}" for r in rates))
    if log:
        log(f"done in {time.perf_counter() - start:.1f} s: validation loss "
            f"{history['val_loss'][0]:.4f} -> {history['val_loss'][-1]:.4f}")
    return history


__all__ = ["DemoConfig", "run_demo"]
