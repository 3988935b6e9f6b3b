# SPDX-License-Identifier: Apache-2.0
"""Flat buffers: the per-tensor optimizer contract of ``step_all``/``step_vjp_all`` over one op call per bucket.

Note [Flat buffers]: the parameter tensors that take a step are bucketed by what the op must
hold fixed (device, dtype, boolean options, Adam's step count, whether a momentum buffer
exists, and for each hyperparameter whether it is a float, a 0-d tensor or an element-wise
tensor). Each bucket is laid end to end in one contiguous buffer per quantity (θ_j, G_j, each
state entry); segment ``offsets`` mark the tensors. The op returns flat outputs, which are
handed back as per-tensor views (``unflatten_dense_tensors``), so θ_{j+1} and σ_{j+1} of a
tape entry live in one buffer each, and the next step finds them already flat (no copy).
Fixed and per-group/per-tensor hyperparameters travel as one float64 value per segment
(expanded inside the kernel through the offsets); element-wise ones as one flat buffer.

Note [Plan cache]: working out the buckets (keys, offsets, fixed-hyperparameter tensors) costs
Python work per tensor, yet within one meta step the J tape steps and the J sweep steps all see
the same shapes, dtypes, flags and hyperparameter objects. ``_plan`` therefore keeps the last
few plans, keyed by a cheap signature: per tensor (shape, dtype, device, whether G is None,
the Adam step relative to the first tensor's / whether a momentum buffer exists), plus the
identity of every hyperparameter value and flag (the plan holds references to them, so an id
cannot be reused while it is cached; a value replaced in a dict is a new object, hence a miss).
Learned hyperparameter tensors are re-read on every call (their values change in place
between meta steps), and Adam's step count is read per call. A hit runs exactly the ops a miss
would, so results are bit-identical; the signature costs ~0.1 ms for 122 tensors, the plan ~3 ms.
"""
from __future__ import annotations

import functools
import operator
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from torch import Tensor

from . import get_op, select_impl
from .ops import disabled
from ._reference import ADAM_HYPER, SGD_HYPER

if TYPE_CHECKING:
    from ..optim.base import DiffOptimizer, Hyper, State

_unflatten = torch._C._nn.unflatten_dense_tensors
_flatten = torch._C._nn.flatten_dense_tensors

#: The kinds of optimizer the flat ops implement, with their hyperparameter slots.
HYPER_SLOTS = {"sgd": SGD_HYPER, "adam": ADAM_HYPER}


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
    return _flatten(tensors)


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
    return first.reshape(-1) if len(tensors) == 1 else _flatten(tensors)


class FlatOutputs(list):
    """The per-tensor outputs of the flat ops (tensors, or state dicts), remembering the flat
    buffers behind them: Note [Flat outputs].

    ``flats[(key, bucket indices)] = (views, buffer)``: ``key`` is None for a list of tensors, else
    the state entry (``"momentum_buffer"``, ...) whose values are the views.

    Note [Flat outputs]: the next op call gathers its inputs from these lists. When every item at
    a bucket's indices is still, by identity, the view recorded for it, the recorded buffer *is*
    their concatenation (views share its memory), so :meth:`_Bucket.gather` returns it without
    looking at the tensors; an item that was replaced fails the identity check and the usual
    path runs. The reverse sweep also uses this to add H·Ḡ into θ̄ in place
    (:func:`owned_indices`): the views of a buffer the op has just allocated belong to no one else.
    """

    def __init__(self, items: Sequence[Any]):
        super().__init__(items)
        self.flats: dict[tuple[Optional[str], tuple[int, ...]], tuple[tuple[Tensor, ...], Tensor]] = {}

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


def _kind(value: Any) -> int:
    """0: a fixed float; 1: a 0-d tensor (learned per group or tensor); 2: element-wise."""
    if not isinstance(value, Tensor):
        return 0
    return 2 if value.dim() > 0 else 1


def _bucket_key(kind: str, theta: Tensor, state: "State", hyper: "Hyper") -> tuple:
    kinds = tuple(_kind(hyper[name]) for name in HYPER_SLOTS[kind])
    if kind == "sgd":
        use_momentum = _kind(hyper["momentum"]) > 0 or hyper["momentum"] != 0
        has_buf = use_momentum and state.get("momentum_buffer") is not None
        flags: tuple = (bool(hyper["nesterov"]), bool(hyper["maximize"]), use_momentum,
                        kinds[3] > 0 or hyper["weight_decay"] != 0, has_buf)
    else:
        flags = (bool(hyper["amsgrad"]), bool(hyper["maximize"]), bool(hyper["decoupled_weight_decay"]),
                 kinds[4] > 0 or hyper["weight_decay"] != 0, float(state["step"]) + 1.0)
    return (theta.device, theta.dtype, flags, kinds)


class _Bucket:
    """The tensors of one bucket and their flat hyperparameters."""

    def __init__(self, kind: str, key: tuple, idx: list[int], theta: Sequence[Tensor], hyper: Sequence["Hyper"]):
        self.kind, self.key, self.idx = kind, key, idx
        self.idx_key = tuple(idx)
        self.device, self.dtype, self.flags, self.kinds = key
        self.all = idx == list(range(len(theta)))  # every tensor, in order: gather without a list
        # shape templates for the views, on the meta device: a cached plan holds no data
        self.theta = [torch.empty(theta[k].shape, dtype=self.dtype, device="meta") for k in idx]
        numels = tuple(t.numel() for t in self.theta)
        self.offsets = _offsets(numels, self.device)
        self.starts = self.offsets.tolist()[:-1] if self.device.type == "cpu" else _starts(numels)
        self.total = sum(numels)
        self.names = HYPER_SLOTS[kind]
        self.fixed: list[Optional[Tensor]] = []
        self.elementwise = self.learned = 0
        for h, (name, kd) in enumerate(zip(self.names, self.kinds)):
            self.fixed.append(_constants(tuple(float(hyper[k][name]) for k in idx), self.device) if kd == 0 else None)
            self.learned |= (kd > 0) << h
            self.elementwise |= (kd == 2) << h
        self._learned: dict[int, tuple[list[Tensor], list[int], Tensor]] = {}
        self._impl: dict[tuple[str, bool], str] = {}

    def hyper(self, hyper: Sequence["Hyper"]) -> list[Tensor]:
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
        return list(_unflatten(buffer, self.theta))

    def gather(self, tensors: Sequence[Tensor]) -> Tensor:
        items = tensors if self.all else [tensors[k] for k in self.idx]
        if type(tensors) is FlatOutputs:
            buffer = tensors.buffer(None, self.idx_key, items)
            if buffer is not None:
                return buffer
        return _flat_planned(items, self.starts, self.total)

    def gather_optional(self, dicts: Sequence["State"], key: str) -> Optional[Tensor]:
        """The flat buffer of ``dicts[k][key]`` (zeros where missing), or None if none has it."""
        items = [dicts[k].get(key) for k in self.idx]
        if type(dicts) is FlatOutputs:
            buffer = dicts.buffer(key, self.idx_key, items)
            if buffer is not None:
                return buffer
        if all(x is None for x in items):
            return None
        if any(x is None for x in items):
            items = [torch.zeros(t.shape, dtype=self.dtype, device=self.device) if x is None else x
                     for x, t in zip(items, self.theta)]
        return _flat_planned(items, self.starts, self.total)

    def hyper_bars(self, bars: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Per-tensor ``{name: cotangent}`` from the op's per-segment or element-wise outputs."""
        out: list[dict[str, Tensor]] = [{} for _ in self.idx]
        for h, (name, kd) in enumerate(zip(self.names, self.kinds)):
            if kd == 0:
                continue
            parts = bars[h].to(self.dtype).unbind(0) if kd == 1 else self.views(bars[h])
            for d, p in zip(out, parts):
                d[name] = p
        return out


def _starts(numels: Sequence[int]) -> list[int]:
    out, pos = [], 0
    for n in numels:
        out.append(pos)
        pos += n
    return out


class _Plan:
    """Buckets of the tensors that take a step, and the indices left to the per-tensor path
    (empty tensors). ``refs`` holds the hyperparameter objects whose ids are in the cache key."""

    def __init__(self, kind: str, theta: Sequence[Tensor], G: Sequence[Optional[Tensor]], state: Sequence["State"],
                 hyper: Sequence["Hyper"], refs: list[Any]):
        groups: dict[tuple, list[int]] = {}
        self.single: list[int] = []
        for k, (t, g) in enumerate(zip(theta, G)):
            if g is None:
                continue
            if t.numel() == 0:
                self.single.append(k)
                continue
            groups.setdefault(_bucket_key(kind, t, state[k], hyper[k]), []).append(k)
        self.buckets = [_Bucket(kind, key, idx, theta, hyper) for key, idx in groups.items()]
        self.refs = refs


_MISSING = object()
_PLANS: "OrderedDict[tuple, _Plan]" = OrderedDict()
_PLAN_CACHE_SIZE = 8


def _plan(kind: str, theta: Sequence[Tensor], G: Sequence[Optional[Tensor]], state: Sequence["State"],
          hyper: Sequence["Hyper"]) -> _Plan:
    """The cached plan for this call's signature, or a new one (Note [Plan cache])."""
    if kind == "adam":
        s0 = float(state[0]["step"]) if state else 0.0
        per = [(t.shape, t.dtype, t.device, g is None, float(s["step"]) - s0) for t, g, s in zip(theta, G, state)]
    else:
        per = [(t.shape, t.dtype, t.device, g is None, s.get("momentum_buffer") is None)
               for t, g, s in zip(theta, G, state)]
    refs = [h.get(name, _MISSING) for h in hyper for name in _HYPER_KEYS[kind]]
    key = (kind, tuple(per), tuple(map(id, refs)))
    plan = _PLANS.get(key)
    if plan is not None and len(plan.refs) == len(refs) and all(map(operator.is_, plan.refs, refs)):
        _PLANS.move_to_end(key)
        return plan
    plan = _PLANS[key] = _Plan(kind, theta, G, state, hyper, refs)
    while len(_PLANS) > _PLAN_CACHE_SIZE:
        _PLANS.popitem(last=False)
    return plan


#: Every hyperparameter and flag that a bucket key or a fixed-hyperparameter tensor reads.
_HYPER_KEYS = {"sgd": SGD_HYPER + ("nesterov", "maximize"),
               "adam": ADAM_HYPER + ("amsgrad", "maximize", "decoupled_weight_decay")}


def _t_next(b: _Bucket, state: Sequence["State"]) -> float:
    return float(state[b.idx[0]]["step"]) + 1.0


def step_all(opt: "DiffOptimizer", theta: Sequence[Tensor], G: Sequence[Optional[Tensor]], state: Sequence["State"],
             hyper: Sequence["Hyper"], impl: str = "auto") -> tuple[list[Tensor], list["State"]]:
    """``optim.base.step_all`` over flat buffers (Algorithm 1, line 6), one op call per bucket."""
    kind = opt.flat
    assert kind in HYPER_SLOTS, f"{opt.name} has no flat implementation"
    theta_next: FlatOutputs = FlatOutputs(theta)
    state_next: FlatOutputs = FlatOutputs(state)
    plan = _plan(kind, theta, G, state, hyper)
    for k in plan.single:
        theta_next[k], state_next[k] = opt.step(theta[k], G[k], state[k], hyper[k])  # type: ignore[arg-type]
    for b in plan.buckets:
        hp = b.hyper(hyper)
        which = b.impl(impl, theta[b.idx[0]])
        th, g = b.gather(theta), b.gather(G)  # type: ignore[arg-type]
        if kind == "sgd":
            nesterov, maximize, use_momentum, has_wd, has_buf = b.flags
            buf = b.gather_optional(state, "momentum_buffer") if has_buf else None
            tn, bn = get_op("sgd_step", which)(th, g, buf, b.offsets, hp, b.elementwise, nesterov, maximize,
                                               use_momentum, has_wd)
            bufs = b.views(bn) if use_momentum else None
            thetas = b.views(tn)
            for j, (k, t) in enumerate(zip(b.idx, thetas)):
                theta_next[k] = t
                s = dict(state[k])
                if bufs is not None:
                    s["momentum_buffer"] = bufs[j]
                state_next[k] = s
            theta_next.record(None, b.idx_key, thetas, tn)
            if bufs is not None:
                state_next.record("momentum_buffer", b.idx_key, bufs, bn)
        else:
            amsgrad, maximize, decoupled, has_wd, _ = b.flags
            t_next = _t_next(b, state)
            m, v = b.gather_optional(state, "exp_avg"), b.gather_optional(state, "exp_avg_sq")
            vmax = b.gather_optional(state, "max_exp_avg_sq") if amsgrad else None
            tn, mn, vn, xn = get_op("adam_step", which)(th, g, m, v, vmax, b.offsets, hp, b.elementwise,
                                                        t_next, amsgrad, maximize, decoupled, has_wd)
            ms, vs = b.views(mn), b.views(vn)
            xs = b.views(xn) if amsgrad else None
            thetas = b.views(tn)
            for j, (k, t) in enumerate(zip(b.idx, thetas)):
                theta_next[k] = t
                s = {"step": t_next, "exp_avg": ms[j], "exp_avg_sq": vs[j]}
                if xs is not None:
                    s["max_exp_avg_sq"] = xs[j]
                state_next[k] = s
            theta_next.record(None, b.idx_key, thetas, tn)
            state_next.record("exp_avg", b.idx_key, ms, mn)
            state_next.record("exp_avg_sq", b.idx_key, vs, vn)
            if xs is not None:
                state_next.record("max_exp_avg_sq", b.idx_key, xs, xn)
    return theta_next, state_next


def step_vjp_all(opt: "DiffOptimizer", theta: Sequence[Tensor], G: Sequence[Optional[Tensor]],
                 state: Sequence["State"], hyper: Sequence["Hyper"], theta_next_bar: Sequence[Tensor],
                 state_next_bar: Sequence["State"], impl: str = "auto"
                 ) -> tuple[list[Tensor], list[Optional[Tensor]], list["State"], list[dict[str, Tensor]]]:
    """``optim.base.step_vjp_all`` over flat buffers (Algorithm 1, lines 11-12)."""
    kind = opt.flat
    assert kind in HYPER_SLOTS, f"{opt.name} has no flat implementation"
    n = len(theta)
    theta_bar: FlatOutputs = FlatOutputs(theta_next_bar)
    G_bar: list[Optional[Tensor]] = [None] * n
    state_bar: FlatOutputs = FlatOutputs(state_next_bar)
    hyper_bar: list[dict[str, Tensor]] = [{} for _ in range(n)]
    plan = _plan(kind, theta, G, state, hyper)
    for k in plan.single:
        theta_bar[k], G_bar[k], state_bar[k], hyper_bar[k] = opt.step_vjp(
            theta[k], G[k], state[k], hyper[k], theta_next_bar[k], state_next_bar[k])  # type: ignore[arg-type]
    for b in plan.buckets:
        hp = b.hyper(hyper)
        which = b.impl(impl, theta[b.idx[0]])
        th, g, tb = b.gather(theta), b.gather(G), b.gather(theta_next_bar)  # type: ignore[arg-type]
        if kind == "sgd":
            nesterov, maximize, use_momentum, has_wd, has_buf = b.flags
            buf = b.gather_optional(state, "momentum_buffer") if has_buf else None
            buf_bar_in = b.gather_optional(state_next_bar, "momentum_buffer") if use_momentum else None
            tbar, gbar, bbar, hbars = get_op("sgd_step_vjp", which)(
                th, g, buf, tb, buf_bar_in, b.offsets, hp, b.elementwise, b.learned, nesterov, maximize,
                use_momentum, has_wd)
            bufs = b.views(bbar) if has_buf else None
            new_state_bar: list["State"] = [{"momentum_buffer": x} for x in bufs] if bufs is not None else [{} for _ in b.idx]
            if bufs is not None:
                state_bar.record("momentum_buffer", b.idx_key, bufs, bbar)
        else:
            amsgrad, maximize, decoupled, has_wd, _ = b.flags
            t_next = _t_next(b, state)
            m, v = b.gather_optional(state, "exp_avg"), b.gather_optional(state, "exp_avg_sq")
            vmax = b.gather_optional(state, "max_exp_avg_sq") if amsgrad else None
            cm = b.gather_optional(state_next_bar, "exp_avg")
            cv = b.gather_optional(state_next_bar, "exp_avg_sq")
            cx = b.gather_optional(state_next_bar, "max_exp_avg_sq") if amsgrad else None
            tbar, gbar, mbar, vbar, xbar, hbars = get_op("adam_step_vjp", which)(
                th, g, m, v, vmax, tb, cm, cv, cx, b.offsets, hp, b.elementwise, b.learned, t_next, amsgrad,
                maximize, decoupled, has_wd)
            ms, vs = b.views(mbar), b.views(vbar)
            xs = b.views(xbar) if amsgrad else None
            new_state_bar = []
            for j in range(len(b.idx)):
                s = {"exp_avg": ms[j], "exp_avg_sq": vs[j]}
                if xs is not None:
                    s["max_exp_avg_sq"] = xs[j]
                new_state_bar.append(s)
            state_bar.record("exp_avg", b.idx_key, ms, mbar)
            state_bar.record("exp_avg_sq", b.idx_key, vs, vbar)
            if xs is not None:
                state_bar.record("max_exp_avg_sq", b.idx_key, xs, xbar)
        thetas = b.views(tbar)
        for k, a, gg, s, h in zip(b.idx, thetas, b.views(gbar), new_state_bar, b.hyper_bars(hbars)):
            theta_bar[k], G_bar[k], state_bar[k], hyper_bar[k] = a, gg, s, h
        theta_bar.record(None, b.idx_key, thetas, tbar)
    return theta_bar, G_bar, state_bar, hyper_bar


__all__ = ["HYPER_SLOTS", "FlatOutputs", "flat", "owned_indices", "step_all", "step_vjp_all"]
