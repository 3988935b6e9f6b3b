# SPDX-License-Identifier: Apache-2.0
"""Deep snapshots of everything a meta step may touch, to assert that nothing changed."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from gimli_bptt import GimliUpdater


def snapshot(updater: GimliUpdater) -> dict[str, Any]:
    return {
        "model": copy.deepcopy(updater.model.state_dict()),
        "opt": copy.deepcopy(updater.opt.state_dict()),
        "phi": [t.detach().clone() for t in updater.meta_parameters()],
        "phi_grad": [None if t.grad is None else t.grad.clone() for t in updater.meta_parameters()],
        "meta_opt": copy.deepcopy(updater.meta_opt.state_dict()),
    }


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and bool(
            torch.equal(a, b) or (torch.isnan(a) & torch.isnan(b) | (a == b)).all())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def bit_identical(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two hypergradient dicts with the same keys, the same number of tensors under each and every
    tensor equal bit for bit (same shape and dtype, ``torch.equal``)."""
    tensors = lambda v: v if isinstance(v, list) else [v]  # noqa: E731
    return a.keys() == b.keys() and all(
        len(tensors(a[k])) == len(tensors(b[k])) and all(
            x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(tensors(a[k]), tensors(b[k])))
        for k in a)


def assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in before:
        assert _equal(before[key], after[key]), f"{key} changed"
