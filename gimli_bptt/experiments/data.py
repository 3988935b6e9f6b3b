# SPDX-License-Identifier: Apache-2.0
"""The UCI handwritten digits shipped inside scikit-learn: loading, splits, minibatches and few-shot tasks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from . import require_extras

Batch = tuple[Tensor, Tensor]


def load_digits_tensors(device: str | torch.device = "cpu") -> Batch:
    """All 1797 digits as ``(x, y)``: ``x`` of shape ``(N, 1, 8, 8)`` scaled to [0, 1], ``y`` in 0..9.

    The data ships inside scikit-learn (``sklearn.datasets.load_digits``); nothing is downloaded.
    """
    require_extras()
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    return x.to(device), y.to(device)


@dataclass
class Splits:
    """Disjoint train / validation / test splits of the digits (stratified by class)."""

    train: Batch
    val: Batch
    test: Batch


def split_digits(x: Tensor, y: Tensor, seed: int, val_frac: float = 0.1, test_frac: float = 0.2) -> Splits:
    """Splits ``(x, y)`` per class into train, validation and test parts.

    Args:
        x, y: The whole data set.
        seed: Seeds the permutation; the same seed gives the same split.
        val_frac: Fraction of every class held out for validation (may be 0).
        test_frac: Fraction of every class held out for testing.
    """
    gen = torch.Generator().manual_seed(seed)
    parts: dict[str, list[Tensor]] = {"train": [], "val": [], "test": []}
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y.cpu() == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = int(round(test_frac * len(idx)))
        n_val = int(round(val_frac * len(idx)))
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:])
    out = {}
    for name, chunks in parts.items():
        idx = torch.cat(chunks).to(x.device)
        out[name] = (x[idx], y[idx])
    return Splits(**out)


def minibatches(data: Batch, batch_size: int, gen: torch.Generator, drop_last: bool = True) -> list[Batch]:
    """One epoch of shuffled minibatches of ``data`` (the order is drawn from ``gen``)."""
    x, y = data
    perm = torch.randperm(len(y), generator=gen).to(x.device)
    stop = len(y) - len(y) % batch_size if drop_last and len(y) >= batch_size else len(y)
    return [(x[perm[i:i + batch_size]], y[perm[i:i + batch_size]]) for i in range(0, stop, batch_size)]


def sample_batches(data: Batch, n: int, batch_size: int, gen: torch.Generator) -> list[Batch]:
    """``n`` minibatches drawn with replacement across batches (without replacement within one)."""
    x, y = data
    out = []
    for _ in range(n):
        idx = torch.randperm(len(y), generator=gen)[:batch_size].to(x.device)
        out.append((x[idx], y[idx]))
    return out


def corrupt_labels(y: Tensor, fraction: float, gen: torch.Generator, num_classes: int = 10) -> tuple[Tensor, Tensor]:
    """Replaces the labels of exactly ``round(fraction * len(y))`` examples by a different class.

    The corrupted examples are drawn without replacement from ``gen``; each one's new label is
    drawn uniformly from the ``num_classes - 1`` classes other than its true one (so every
    corrupted label is wrong).

    Returns:
        ``(noisy_y, corrupted)``: the new labels and the boolean mask of the corrupted examples.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the fraction of corrupted labels must be in [0, 1], got {fraction}")
    if num_classes < 2:
        raise ValueError(f"corrupting a label needs at least 2 classes, got {num_classes}")
    n = len(y)
    k = int(round(fraction * n))
    idx = torch.randperm(n, generator=gen)[:k].to(y.device)
    shift = torch.randint(1, num_classes, (k,), generator=gen).to(y.device)
    noisy = y.clone()
    noisy[idx] = (y[idx] + shift) % num_classes
    corrupted = torch.zeros(n, dtype=torch.bool, device=y.device)
    corrupted[idx] = True
    return noisy, corrupted


@dataclass
class Task:
    """One N-way K-shot task: a support set to adapt on and a query set to score, labels 0..N-1."""

    support: Batch
    query: Batch


class TaskSampler:
    """Draws N-way K-shot tasks from a subset of the digit classes.

    Every task picks ``ways`` of ``classes`` at random, relabels them 0..ways-1 in random order,
    and draws ``shots`` support and ``queries`` query examples per class, disjoint.

    Args:
        x, y: The data set.
        classes: The digit classes tasks are drawn from (e.g. 0-4 for meta-training).
        ways, shots, queries: N, K and the number of query examples per class.
        seed: Seeds the sampler's own generator.
    """

    def __init__(self, x: Tensor, y: Tensor, classes: Sequence[int], ways: int, shots: int, queries: int,
                 seed: int):
        if ways > len(classes):
            raise ValueError(f"{ways}-way tasks need at least {ways} classes, got {len(classes)}")
        self.x = x
        self.classes = list(classes)
        self.ways, self.shots, self.queries = ways, shots, queries
        self.index = {c: torch.nonzero(y.cpu() == c).flatten() for c in self.classes}
        for c, idx in self.index.items():
            if len(idx) < shots + queries:
                raise ValueError(f"class {c} has {len(idx)} examples, fewer than shots + queries = {shots + queries}")
        self.gen = torch.Generator().manual_seed(seed)

    def sample(self) -> Task:
        """One task."""
        pick = torch.randperm(len(self.classes), generator=self.gen)[: self.ways].tolist()
        sx, sy, qx, qy = [], [], [], []
        for label, k in enumerate(pick):
            idx = self.index[self.classes[k]]
            idx = idx[torch.randperm(len(idx), generator=self.gen)[: self.shots + self.queries]]
            sx.append(idx[: self.shots])
            qx.append(idx[self.shots:])
            sy.append(torch.full((self.shots,), label, dtype=torch.long))
            qy.append(torch.full((self.queries,), label, dtype=torch.long))
        dev = self.x.device
        s_idx, q_idx = torch.cat(sx).to(dev), torch.cat(qx).to(dev)
        return Task((self.x[s_idx], torch.cat(sy).to(dev)), (self.x[q_idx], torch.cat(qy).to(dev)))


__all__ = ["Batch", "Splits", "Task", "TaskSampler", "corrupt_labels", "load_digits_tensors", "minibatches",
           "sample_batches", "split_digits"]
