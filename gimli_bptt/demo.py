# SPDX-License-Identifier: Apache-2.0
"""A small built-in demo: meta-learn the per-layer learning rates of an MLP on a synthetic task, beside the
same training at the fixed starting rate."""
from __future__ import annotations

import copy
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


def _optimizer(cfg: DemoConfig, model: nn.Sequential) -> torch.optim.Optimizer:
    """The inner optimizer, one param group per linear layer (each gets its own learned rate)."""
    groups = [{"params": layer.parameters()} for layer in model if isinstance(layer, nn.Linear)]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}: use 'sgd' or 'adam'")


def run_demo(cfg: DemoConfig, log: Optional[Callable[[str], None]] = print) -> dict[str, list[float]]:
    """Trains an MLP twice from the same initial weights on the same batches: once at the fixed
    starting rate (the baseline), once while meta-learning one learning rate per layer
    (Algorithm 1, one meta step per J inner steps, continuing training from θ'_J).

    Row ``i`` of the printed table is the state after ``i`` rounds of J training steps: the
    validation loss of both models and the learned rates used for the next round (row 0: the
    start, every rate at ``cfg.lr``).

    Returns:
        ``{"val_loss": [...], "val_loss_fixed": [...], "lr_<group>": [...]}``, one value per round,
        the first at the start (before any training step).
    """
    torch.manual_seed(cfg.seed)
    sample = _teacher_task(cfg.seed)
    model = nn.Sequential(nn.Linear(16, cfg.hidden), nn.Tanh(), nn.Linear(cfg.hidden, cfg.hidden), nn.Tanh(),
                          nn.Linear(cfg.hidden, 4))
    baseline = copy.deepcopy(model)  # the same initial weights, trained at the fixed rate
    opt, fixed_opt = _optimizer(cfg, model), _optimizer(cfg, baseline)
    updater = GimliUpdater(
        model, opt, _loss, _loss, unroll=cfg.unroll, learn={"lr": "group"}, hvp=cfg.hvp, commit=True,
        meta_opt=functools.partial(torch.optim.Adam, lr=cfg.meta_lr),
    )
    val_batch = sample(512)

    def val_loss(net: nn.Module) -> float:
        with torch.no_grad():
            return float(_loss(net, val_batch))

    history: dict[str, list[float]] = {"val_loss": [], "val_loss_fixed": []}

    def record(i: int, learned: float, fixed: float) -> None:
        history["val_loss"].append(learned)
        history["val_loss_fixed"].append(fixed)
        rates = [float(g["lr"]) for g in opt.param_groups]
        for g, r in enumerate(rates):
            history.setdefault(f"lr_{g}", []).append(r)
        if log and (i % cfg.print_every == 0 or i == cfg.meta_steps):
            log(f"{i * cfg.unroll:>11}  {fixed:10.4f}  {learned:12.4f}  " + "  ".join(f"{r:.4f}" for r in rates))

    start = time.perf_counter()
    if log:
        log(f"An MLP ({len(opt.param_groups)} layers, {cfg.optimizer.upper()}) on a synthetic 4-class task, trained "
            f"twice from the same weights on the same batches:\n  at the fixed rate {cfg.lr:g} (the baseline), and "
            f"with one rate per layer meta-learned from {cfg.lr:g} by a meta step after every {cfg.unroll} "
            f"training steps.")
        log(f"{'train steps':>11}  {'fixed rate':>10}  {'learned rates':>12}  learned rate of each layer "
            f"(used for the next {cfg.unroll} steps)")
        log(f"{'':>11}  {'val loss':>10}  {'val loss':>12}")
    initial = val_loss(model)
    record(0, initial, initial)
    for i in range(1, cfg.meta_steps + 1):
        batches = _batches(sample, cfg.unroll, cfg.batch)
        result = updater.step(batches, val_batch)  # trains J steps at the current rates, then updates them
        for batch in batches:  # the baseline: the same J steps at the fixed rate
            fixed_opt.zero_grad()
            _loss(baseline, batch).backward()
            fixed_opt.step()
        record(i, float(result.val_loss), val_loss(baseline))
    if log:
        log(f"done in {time.perf_counter() - start:.1f} s: validation loss after {cfg.meta_steps * cfg.unroll} "
            f"training steps {history['val_loss_fixed'][-1]:.4f} at the fixed rate, "
            f"{history['val_loss'][-1]:.4f} with the learned rates (both from {initial:.4f})")
    return history


__all__ = ["DemoConfig", "run_demo"]
