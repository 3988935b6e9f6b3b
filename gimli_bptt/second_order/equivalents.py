# SPDX-License-Identifier: Apache-2.0
"""The built-in second-order equivalents: fused attention on the math backend, hardsigmoid as relu6, embedding_bag
as embedding and a reduction; importing this module registers them."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .registry import _register

_HARDSIGMOID_SLOPE: dict[tuple[torch.dtype, str], float] = {}


def _hardsigmoid_slope(dtype: torch.dtype, device: torch.device) -> float:
    """The slope PyTorch's own ``hardsigmoid_backward`` uses: 1/6 rounded to float32, in every dtype."""
    key = (dtype, device.type)
    slope = _HARDSIGMOID_SLOPE.get(key)
    if slope is None:
        one = torch.ones((), dtype=dtype, device=device)
        slope = _HARDSIGMOID_SLOPE[key] = float(torch.ops.aten.hardsigmoid_backward(one, torch.zeros_like(one)))
    return slope


def hardsigmoid_relu6(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``F.hardsigmoid`` with a double backward: the values ``relu6(x + 3) / 6``, the derivative
    ``where(-3 < x < 3, slope, 0)``.

    Both are PyTorch's to the bit: the values in every floating dtype (float16 and bfloat16 in
    float32, as PyTorch's kernel), and the first derivative with PyTorch's own slope, which is
    1/6 rounded to float32 even for float64 (so the gradient of a kept graph equals the one
    of the plain tape pass). The second derivative is zero almost everywhere, as it should be.
    """
    opmath = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    x = input.to(opmath)
    value = (F.relu6(x.detach() + 3.0) / 6.0).to(input.dtype)  # detach, not no_grad: no forward-mode tangent either
    slope = _hardsigmoid_slope(opmath, input.device)
    linear = torch.where((x > -3.0) & (x < 3.0), x, 0.0) * slope  # carries the derivative, not the value
    out = value + (linear - linear.detach()).to(input.dtype)  # value + 0, exactly
    return input.copy_(out) if inplace else out


def attention_math(*args: Any, **kwargs: Any) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on PyTorch's math backend (a composition of differentiable ops)."""
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kwargs)


def embedding_bag_gathered(input: torch.Tensor, weight: torch.Tensor, offsets: Optional[torch.Tensor] = None,
                           max_norm: Optional[float] = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                           mode: str = "mean", sparse: bool = False, per_sample_weights: Optional[torch.Tensor] = None,
                           include_last_offset: bool = False, padding_idx: Optional[int] = None) -> torch.Tensor:
    """``F.embedding_bag`` as ``F.embedding`` followed by the bag's sum, mean or max over its rows.

    The same bags (fixed-length rows of a 2-D ``input``, or ``offsets`` into a 1-D one, empty bags
    giving zeros), ``padding_idx`` entries left out of the sum and the count, ``per_sample_weights``
    (sum mode) and ``max_norm`` (the same in-place renormalisation of ``weight``); the values and
    first derivatives agree with PyTorch's to rounding (the sums run in another order), and every
    op has a double backward. ``scale_grad_by_freq=True`` is refused (NotImplementedError).
    """
    if mode not in ("sum", "mean", "max"):
        raise ValueError(f"embedding_bag: mode must be 'sum', 'mean' or 'max', got {mode!r}")
    if scale_grad_by_freq:
        raise NotImplementedError(
            "embedding_bag(scale_grad_by_freq=True) has no twice-differentiable equivalent in gimli_bptt (PyTorch's "
            "first derivative with it does not scale by each index's frequency as F.embedding does); use "
            "nn.Embedding(scale_grad_by_freq=True) and reduce each bag yourself, or scale_grad_by_freq=False")
    if per_sample_weights is not None and mode != "sum":
        raise NotImplementedError("embedding_bag: per_sample_weights is only supported for mode='sum' "
                                  f"(got mode={mode!r})")
    rows = F.embedding(input, weight, None, max_norm, norm_type, scale_grad_by_freq, sparse)
    keep = None if padding_idx is None else (input != (padding_idx % weight.shape[0]))
    if input.dim() == 2:  # fixed-length bags, one per row
        if offsets is not None:
            raise ValueError("embedding_bag: offsets must be None when input is 2-D")
        w = None if per_sample_weights is None else per_sample_weights.unsqueeze(-1).to(rows.dtype)
        if keep is not None:
            mask = keep.unsqueeze(-1).to(rows.dtype)
            w = mask if w is None else w * mask
        if mode == "max":
            filled = rows if keep is None else rows.masked_fill(~keep.unsqueeze(-1), float("-inf"))
            out = filled.max(dim=1).values
            return out if keep is None else torch.where(keep.any(1, keepdim=True), out, torch.zeros_like(out))
        total = (rows if w is None else rows * w).sum(1)
        if mode == "sum":
            return total
        count = torch.full(total.shape[:1], float(input.shape[1]), dtype=rows.dtype, device=rows.device)
        if keep is not None:
            count = keep.sum(1).to(rows.dtype)
        return total / count.clamp_min(1.0).unsqueeze(-1)
    if input.dim() != 1 or offsets is None:
        raise ValueError("embedding_bag: a 1-D input needs offsets")
    bags = offsets.shape[0] - (1 if include_last_offset else 0)
    n = input.shape[0]
    bag = torch.searchsorted(offsets[:bags].contiguous(), torch.arange(n, device=input.device), right=True) - 1
    if keep is not None:  # the padding entries join no bag
        bag = bag[keep]
        rows = rows[keep]
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights[keep]
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.unsqueeze(-1).to(rows.dtype)
    dim = weight.shape[1]
    if mode == "max":
        count = torch.bincount(bag, minlength=bags)
        pos = torch.arange(bag.shape[0], device=input.device) - torch.cumsum(count, 0).sub(count)[bag]
        dense = rows.new_full((bags, max(int(count.max()) if count.numel() else 0, 1), dim), float("-inf"))
        dense = dense.index_put((bag, pos), rows)
        out = dense.max(dim=1).values
        return torch.where((count > 0).unsqueeze(-1), out, torch.zeros_like(out))
    total = rows.new_zeros(bags, dim).index_add(0, bag, rows)
    if mode == "sum":
        return total
    count = torch.bincount(bag, minlength=bags).to(rows.dtype)
    return total / count.clamp_min(1.0).unsqueeze(-1)


_register(
    F.scaled_dot_product_attention, attention_math, how="on PyTorch's math backend (torch.nn.attention.SDPBackend.MATH)",
    aten=("_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_flash_attention_backward",
          "_scaled_dot_product_efficient_attention_backward", "_scaled_dot_product_cudnn_attention_backward",
          "_scaled_dot_product_fused_attention_overrideable_backward", "_flash_attention_backward",
          "_efficient_attention_backward"),
)
_register(F.hardsigmoid, hardsigmoid_relu6, "as relu6(x + 3) / 6 (with PyTorch's own slope)", ("hardsigmoid_backward",))
_register(F.embedding_bag, embedding_bag_gathered, "as F.embedding and a sum, mean or max over each bag",
          ("_embedding_bag_backward", "_embedding_bag_dense_backward", "_embedding_bag_per_sample_weights_backward"))


__all__ = ["attention_math", "embedding_bag_gathered", "hardsigmoid_relu6"]
