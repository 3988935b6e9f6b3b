# SPDX-License-Identifier: Apache-2.0
"""Scalar state entries as ``torch.optim`` keeps them (NAdam's ``mu_product``, ASGD's ``eta`` and ``mu``)."""
from __future__ import annotations

from typing import Union, overload

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype

Scalar = Union[float, Tensor]


def torch_scalar_dtype() -> torch.dtype:
    """The dtype ``torch.optim`` keeps scalar state in (float32 unless the default dtype is float64)."""
    return _get_scalar_dtype()


@overload
def round_to_torch_scalar(x: float) -> float: ...


@overload
def round_to_torch_scalar(x: Tensor) -> Tensor: ...


def round_to_torch_scalar(x: Scalar) -> Scalar:
    """``x`` rounded as ``torch.optim`` rounds a scalar it keeps in a 0-d state tensor.

    Note [Scalar state precision]: NAdam's ``mu_product`` and ASGD's ``eta`` and ``mu`` live in
    0-d tensors of ``_get_scalar_dtype()``: float32 unless the default dtype is float64, even for
    float64 parameters. ``torch.optim`` rounds them to float32 at every step (a relative change
    of ~1e-8 in the update), so the step rounds them the same way to match torch to 1e-12. The
    rounding is taken to have derivative 1 (the derivative of the exact-arithmetic step): under
    autograd or forward-mode AD it is a straight-through ``x + (round(x) - x).detach()``.
    """
    dtype = _get_scalar_dtype()
    if dtype == torch.float64:
        return x
    if not isinstance(x, Tensor):
        return float(torch.tensor(x, dtype=dtype).item())
    if torch.finfo(x.dtype).bits <= torch.finfo(dtype).bits:
        return x
    rounded = x.detach().to(dtype).to(x.dtype)
    return x + (rounded - x).detach()


def scalar_state_dtype(param: Tensor) -> torch.dtype:
    """The dtype of our copy of a scalar state entry: torch's scalar dtype or the parameter's, the wider."""
    return torch.promote_types(param.dtype, _get_scalar_dtype())


def export_scalar(value: Scalar) -> Tensor:
    """A scalar state entry as ``torch.optim`` keeps it: a tensor of ``_get_scalar_dtype()``."""
    if isinstance(value, Tensor):
        return value.detach().to(_get_scalar_dtype()).clone()
    return torch.tensor(float(value), dtype=_get_scalar_dtype())


__all__ = ["export_scalar", "round_to_torch_scalar", "scalar_state_dtype", "torch_scalar_dtype"]
