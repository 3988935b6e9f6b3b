# SPDX-License-Identifier: Apache-2.0
"""Flat buffers: many parameter tensors laid end to end, in buckets that one fused op call updates.

This module knows buffers, buckets and hyperparameter slots, never an optimizer: what an
optimizer's state and options mean for its op is its own ``FlatLayout`` (``optim/declarations.py``),
and :mod:`gimli_bptt.stepping` puts the two together.

Note [Flat buffers]: the parameter tensors that take a step are bucketed by what the op must
hold fixed (device, dtype, the op's static options, the step count, and for each
hyperparameter slot whether it is a float, a 0-d tensor or an element-wise tensor). Each
bucket is laid end to end in one contiguous buffer per quantity (θ_j, G_j, each state entry); segment ``offsets`` mark the tensors. The op returns flat outputs, which are
handed back as per-tensor views (``unflatten_dense_tensors``), so θ_{j+1} and σ_{j+1} of a
tape entry live in one buffer each, and the next step finds them already flat (no copy).
Fixed and per-group/per-tensor hyperparameters travel as one float64 value per segment
(expanded inside the kernel through the offsets); element-wise ones as one flat buffer.

Note [Plan cache]: working out the buckets (keys, offsets, fixed-hyperparameter tensors) costs
Python work per tensor, yet within one meta step the J tape steps and the J sweep steps all see
the same shapes, dtypes, flags and hyperparameter objects. :func:`cached_plan` therefore keeps
the last few plans, keyed by a cheap signature that the caller builds (per tensor: shape,
dtype, device, whether G is None, which state entries are None, the step count relative to the
first tensor's), plus the identity of every hyperparameter value and flag (the plan holds
references to them, so an id cannot be reused while it is cached; a value replaced in a dict
is a new object, hence a miss). Learned hyperparameter tensors are re-read on every call
(their values change in place between meta steps), and the step count is read per call. A
hit runs exactly the ops a miss would, so results are bit-identical; the signature costs ~0.1 ms for 122 tensors, the plan ~3 ms.
"""
from __future__ import annotations

import functools
import operator
from collections import OrderedDict
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from . import select_impl
from .ops import disabled

_unflatten = torch._C._nn.unflatten_dense_tensors
_flatten = torch._C._nn.flatten_dense_tensors

@functools.lru_cache(maxsize=256)
def _offsets(numels: tuple[int, ...], device: torch.device) -> Tensor:
    out = [0]
    for n in numels:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=1024)
def _constants(values: tuple[float, ...], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.float64, device=device)


def flat(tensors: Sequence[Tensor]) -> Tensor:
    """One contiguous 1-D buffer holding ``tensors`` end to end: their own buffer when they are
    already consecutive views of one (the outputs of the previous step), else a copy."""
    first = tensors[0]
    if len(tensors) == 1:
        return first.reshape(-1)
    base = first._base
    if base is not None and base.dim() == 1 and base.is_contiguous():
        pos = base.storage_offset()
        for t in tensors:
            if t._base is not base or t.storage_offset() != pos or not t.is_contiguous():
                break
            pos += t.numel()
        else:
            if pos == base.storage_offset() + base.numel():
                return base
    return _flatten(list(tensors))


def _flat_planned(tensors: Sequence[Tensor], starts: list[int], total: int) -> Tensor:
    """:func:`flat` for tensors whose numels are known to be the plan's (``starts`` = segment
    starts, ``total`` = their sum): the view check without per-tensor arithmetic."""
    first = tensors[0]
    base = first._base
    if (base is not None and base.dim() == 1 and base.numel() == total and base.is_contiguous()
            and all(t._base is base for t in tensors)):
        pos = base.storage_offset()
        if [t.storage_offset() - pos for t in tensors] == starts and all(t.is_contiguous() for t in tensors):
            return base
    return first.reshape(-1) if len(tensors) == 1 else _flatten(list(tensors))


class FlatOutputs(list):
    """The per-tensor outputs of the flat ops (tensors, or state dicts), remembering the flat
    buffers behind them: Note [Flat outputs].

    ``flats[(key, bucket indices)] = (views, buffer)``: ``key`` is None for a list of tensors, else
    the state entry (``"momentum_buffer"``, ...) whose values are the views, or ``GATHERED`` for a
    copy of the items (which are then not views of it).

    Note [Flat outputs]: the next op call gathers its inputs from these lists. When every item at
    a bucket's indices is still, by identity, the view recorded for it, the recorded buffer *is*
    their concatenation (views share its memory), so :meth:`_Bucket.gather` returns it without
    looking at the tensors; an item that was replaced fails the identity check and the usual
    path runs. :func:`owned_indices` tells which items are such views: the views of a buffer an op has just
    allocated belong to no one else, so they may be updated in place.
    """

    def __init__(self, items: Sequence[Any]):
        super().__init__(items)
        self.flats: dict[tuple[Optional[str], tuple[int, ...]], tuple[tuple[Tensor, ...], Tensor]] = {}
        self.hint: Any = None  # what the caller knows of how these outputs will be used next

    def record(self, key: Optional[str], idx: tuple[int, ...], views: Sequence[Tensor], buffer: Tensor) -> None:
        self.flats[(key, idx)] = (tuple(views), buffer)

    def buffer(self, key: Optional[str], idx: tuple[int, ...], items: Sequence[Any]) -> Optional[Tensor]:
        """The recorded buffer of ``key`` at ``idx`` if ``items`` (the current values there) are its views."""
        hit = self.flats.get((key, idx))
        if hit is None or len(hit[0]) != len(items) or not all(map(operator.is_, items, hit[0])):
            return None
        return hit[1]


def owned_indices(tensors: Sequence[Tensor]) -> set[int]:
    """The indices of ``tensors`` that are still views of a buffer a flat op allocated for this
    list (Note [Flat outputs]); empty for any other sequence."""
    flats = getattr(tensors, "flats", None)
    if not flats:
        return set()
    out: set[int] = set()
    for (key, idx), (views, _) in flats.items():
        if key is None and all(tensors[k] is v for k, v in zip(idx, views)):
            out.update(idx)
    return out


#: The key under which :meth:`Bucket.gather` remembers a copy it made of a list's items.
GATHERED = "<gathered>"


def slot_kind(value: Any) -> int:
    """How a hyperparameter slot travels: 0, a fixed float; 1, a 0-d tensor (learned per group or
    tensor); 2, an element-wise tensor."""
    if not isinstance(value, Tensor):
        return 0
    return 2 if value.dim() > 0 else 1


class Bucket:
    """The tensors of one bucket (indices ``idx`` of the caller's lists) and their flat hyperparameters.

    Args:
        key: ``(device, dtype, options, kinds, count)``: what every tensor of the bucket shares
            (the op's static options, the kind of each slot (:func:`slot_kind`), the step count).
        idx: The positions of the bucket's tensors in the caller's lists.
        theta: The caller's parameter tensors (only their shapes are kept).
        hyper: The caller's per-tensor hyperparameter dicts.
        slots: The names of the op's hyperparameter slots, in its order.
    """

    def __init__(self, key: tuple, idx: list[int], theta: Sequence[Tensor], hyper: Sequence[Mapping[str, Any]],
                 slots: Sequence[str]):
        self.key, self.idx = key, idx
        self.idx_key = tuple(idx)
        self.device, self.dtype, self.options, self.kinds, _ = key
        self.all = idx == list(range(len(theta)))  # every tensor, in order: gather without a list
        # shape templates for the views, on the meta device: a cached plan holds no data
        self.theta = [torch.empty(theta[k].shape, dtype=self.dtype, device="meta") for k in idx]
        numels = tuple(t.numel() for t in self.theta)
        self.offsets = _offsets(numels, self.device)
        self.starts = self.offsets.tolist()[:-1] if self.device.type == "cpu" else _starts(numels)
        self.total = sum(numels)
        self.names = tuple(slots)
        self.fixed: list[Optional[Tensor]] = []
        self.elementwise = self.learned = 0
        for h, (name, kd) in enumerate(zip(self.names, self.kinds)):
            self.fixed.append(_constants(tuple(float(hyper[k][name]) for k in idx), self.device) if kd == 0 else None)
            self.learned |= (kd > 0) << h
            self.elementwise |= (kd == 2) << h
        self._learned: dict[int, tuple[list[Tensor], list[int], Tensor]] = {}
        self._impl: dict[tuple[str, bool, Any], str] = {}
        self.memo: dict[Any, Any] = {}  # the caller's per-bucket constants (how it calls its ops)

    def hyper(self, hyper: Sequence[Mapping[str, Any]]) -> list[Tensor]:
        """The op's hyperparameter inputs: the cached fixed ones, the learned ones read now.

        A learned slot's float64 tensor is reused while its values are the same tensor objects
        at the same version (``Tensor._version`` counts in-place writes), which holds for the
        2J steps of one meta step; the meta optimizer's update bumps the version.
        """
        out: list[Tensor] = []
        for h, (name, kd, fixed) in enumerate(zip(self.names, self.kinds, self.fixed)):
            if fixed is not None:
                out.append(fixed)
                continue
            values = [hyper[k][name] for k in self.idx]
            versions = [v._version for v in values]
            cached = self._learned.get(h)
            if cached is not None and cached[1] == versions and all(map(operator.is_, cached[0], values)):
                out.append(cached[2])
                continue
            if kd == 2 and any(v.shape != t.shape for v, t in zip(values, self.theta)):
                # an element-wise value shaped like a parameter, for tensors with a leading (task)
                # dimension: broadcast over it (the op reads one value per element)
                values = [v.expand(t.shape) for v, t in zip(values, self.theta)]
            value = torch.stack(values).to(torch.float64) if kd == 1 else flat(values).to(torch.float64)
            self._learned[h] = (values, versions, value)
            out.append(value)
        return out

    def impl(self, impl: str, sample: Tensor) -> str:
        """``select_impl`` for this bucket (``sample`` is one of its tensors), cached: the answer
        depends only on ``impl``, ``GIMLI_DISABLE_KERNELS`` and the tensors' device, dtype and
        layout, and the first two of those are the bucket's."""
        key = (impl, disabled(), sample.layout)
        which = self._impl.get(key)
        if which is None:
            which = self._impl[key] = select_impl([sample], impl)
        return which

    def views(self, buffer: Tensor) -> list[Tensor]:
        """Per-tensor views of a flat buffer of this bucket."""
        return list(_unflatten(buffer, self.theta))

    def gather(self, tensors: Sequence[Tensor]) -> Tensor:
        """The flat buffer of ``tensors`` at the bucket's indices (no copy when it exists already).

        A copy made from a :class:`FlatOutputs` is remembered in it (under ``GATHERED``, never as
        the list's own buffer), so that gathering the same items again, as the sweep does with
        the tape's G_j, reuses it.
        """
        items = tensors if self.all else [tensors[k] for k in self.idx]
        if type(tensors) is FlatOutputs:
            buffer = tensors.buffer(None, self.idx_key, items)
            if buffer is None:
                buffer = tensors.buffer(GATHERED, self.idx_key, items)
            if buffer is None:
                buffer = _flat_planned(items, self.starts, self.total)
                tensors.record(GATHERED, self.idx_key, items, buffer)
            return buffer
        return _flat_planned(items, self.starts, self.total)

    def gather_optional(self, dicts: Sequence[Mapping[str, Any]], key: Optional[str]) -> Optional[Tensor]:
        """The flat buffer of ``dicts[k][key]`` (zeros where missing), or None if none has it (or ``key`` is None)."""
        if key is None:
            return None
        items = [dicts[k].get(key) for k in self.idx]
        if type(dicts) is FlatOutputs:
            buffer = dicts.buffer(key, self.idx_key, items)
            if buffer is not None:
                return buffer
        if all(x is None for x in items):
            return None
        present: list[Tensor] = [torch.zeros(t.shape, dtype=self.dtype, device=self.device) if x is None else x
                                 for x, t in zip(items, self.theta)]
        return _flat_planned(present, self.starts, self.total)

    def segment_bars(self, bars: Sequence[Tensor]) -> list[tuple[tuple[int, ...], str, int, Tensor, Optional[list[Tensor]]]]:
        """The op's hyperparameter cotangents as ``(indices, name, kind, cotangent, views)`` per
        learned slot: kind 1, the per-segment sums (shape ``(nseg,)``, in the element dtype);
        kind 2, the element-wise cotangent (flat) and its per-tensor views."""
        out: list[tuple[tuple[int, ...], str, int, Tensor, Optional[list[Tensor]]]] = []
        for h, (name, kd) in enumerate(zip(self.names, self.kinds)):
            if kd == 1:
                out.append((self.idx_key, name, 1, bars[h].to(self.dtype), None))
            elif kd == 2:
                out.append((self.idx_key, name, 2, bars[h], self.views(bars[h])))
        return out


def _starts(numels: Sequence[int]) -> list[int]:
    out, pos = [], 0
    for n in numels:
        out.append(pos)
        pos += n
    return out


class Plan:
    """The buckets of one call's tensors, and the indices the flat ops do not take (``rest``:
    empty tensors), which the caller handles one at a time. ``refs`` holds the objects whose ids
    are in the cache key (Note [Plan cache]); ``successor`` is the plan the outputs of this one
    were stepped with next, when known, and ``g_none`` (set by the caller that builds the plan)
    which tensors have no gradient (Note [Plan hints] in ``stepping.py``)."""

    successor: Optional["Plan"] = None
    g_none: tuple[bool, ...]

    def __init__(self, keys: Sequence[Optional[Hashable]], theta: Sequence[Tensor],
                 hyper: Sequence[Mapping[str, Any]], slots: Sequence[str], refs: list[Any]):
        groups: dict[Hashable, list[int]] = {}
        self.rest: list[int] = []
        for k, (key, t) in enumerate(zip(keys, theta)):
            if key is None:
                continue
            if t.numel() == 0:
                self.rest.append(k)
                continue
            groups.setdefault(key, []).append(k)
        self.buckets = [Bucket(key, idx, theta, hyper, slots) for key, idx in groups.items()]  # type: ignore[arg-type]
        self.refs = refs


_PLANS: "OrderedDict[tuple, Plan]" = OrderedDict()
_PLAN_CACHE_SIZE = 8


def cached_plan(signature: Hashable, refs: list[Any], build: Callable[[], Plan]) -> Plan:
    """The plan cached under ``signature`` and the identities of ``refs``, or ``build()`` (Note [Plan cache])."""
    key = (signature, tuple(map(id, refs)))
    plan = _PLANS.get(key)
    if plan is not None and len(plan.refs) == len(refs) and all(map(operator.is_, plan.refs, refs)):
        _PLANS.move_to_end(key)
        return plan
    plan = _PLANS[key] = build()
    plan.refs = refs
    while len(_PLANS) > _PLAN_CACHE_SIZE:
        _PLANS.popitem(last=False)
    return plan


def clear_plans() -> None:
    """Forgets every cached plan."""
    _PLANS.clear()


__all__ = ["Bucket", "FlatOutputs", "Plan", "cached_plan", "clear_plans", "flat", "owned_indices", "slot_kind"]
