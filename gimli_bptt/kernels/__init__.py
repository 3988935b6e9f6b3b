# SPDX-License-Identifier: Apache-2.0
"""Fused optimizer kernels: availability and dispatch between the compiled ops and their pure-PyTorch twin.

Dispatch (STYLE.md §6, as ``torch.optim``'s ``adam()`` front end with torchopt's twin):
``select_impl(tensors, "auto")`` picks ``"fused"`` when the compiled ops are loaded for the
tensors' device and the tensors suit them (dense, float32/float64, one dtype and device), and
``"reference"`` otherwise; ``GIMLI_DISABLE_KERNELS=1`` forces ``"reference"``. An explicit
``impl="fused"`` that cannot run raises instead of falling back. :func:`info` says what is
loaded, from where, for which devices, and why not (Note [Loading the kernels] in ``ops.py``).
The first use on each device runs every op once against its twin and falls back to the twin
there on a mismatch, warning once (Note [Kernel self-check] in ``selfcheck.py``;
``GIMLI_KERNEL_SELFCHECK=0`` skips it).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import _fake, _reference, ops, selfcheck
from .ops import KernelInfo, info

IMPLS = ("auto", "fused", "reference")
FUSED_DTYPES = (torch.float32, torch.float64)


_REGISTERED: dict[str, bool] = {}


def is_available(device: torch.device | str = "cpu") -> bool:
    """Whether the compiled ops can run on ``device`` (loading or JIT-building them if needed).

    Once the ops are loaded, their fake kernels are registered (Note [Fake kernels] in
    ``_fake.py``), and which device types have kernels never changes: the answer per dispatch
    key is cached (this runs on every inner step). The first call for a device runs the
    self-check there (Note [Kernel self-check] in ``selfcheck.py``); a device that failed it
    has no fused ops from then on.
    """
    if not ops.load():
        return False
    device = torch.device(device)
    key = "CUDA" if device.type == "cuda" else "CPU" if device.type == "cpu" else None
    if key is None:
        return False
    if key not in _REGISTERED:
        _fake.register()
        _REGISTERED[key] = all(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"gimli::{name}", key) for name in ops.OP_NAMES
        )
    return _REGISTERED[key] and selfcheck.passed(device)


def unsuitable(tensors: Sequence[Tensor]) -> str | None:
    """Why the fused ops cannot take these tensors, or None if they can."""
    if not tensors:
        return "no tensors"
    ref = tensors[0]
    for t in tensors:
        if t.layout != torch.strided:
            return f"a {t.layout} tensor (only dense tensors)"
        if t.dtype not in FUSED_DTYPES:
            return f"dtype {t.dtype} (only float32 and float64)"
        if t.dtype != ref.dtype or t.device != ref.device:
            return "tensors of several dtypes or devices in one bucket"
    return None


def select_impl(tensors: Sequence[Tensor], impl: str = "auto") -> str:
    """``"fused"`` or ``"reference"`` for one bucket of tensors (one dtype and device).

    Raises:
        ValueError: an unknown ``impl``.
        RuntimeError: ``impl="fused"`` and the fused ops cannot run these tensors (why is said).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return "reference"
    why = unsuitable(tensors)
    if why is None:
        if ops.disabled():
            why = "GIMLI_DISABLE_KERNELS is set"
        elif not is_available(tensors[0].device):
            err = ops.load_error() or selfcheck.failure(tensors[0].device)
            why = f"no compiled kernels for {tensors[0].device}" + (f" ({err})" if err is not None else "")
    if why is None:
        return "fused"
    if impl == "fused":
        raise RuntimeError(f"fused kernels requested but cannot run: {why}")
    return "reference"


def get_op(name: str, impl: str):  # noqa: ANN201 - a torch op or its twin
    """The op ``name`` of implementation ``impl`` (``"fused"`` or ``"reference"``)."""
    return ops.op(name) if impl == "fused" else getattr(_reference, name)


__all__ = ["FUSED_DTYPES", "IMPLS", "KernelInfo", "get_op", "info", "is_available", "select_impl", "unsuitable"]
