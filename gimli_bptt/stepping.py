# SPDX-License-Identifier: Apache-2.0
"""Dispatch of the inner optimizer over all parameter tensors: one tensor at a time, the pure twin, or the fused kernels.

The tape calls :func:`step_all` ([Alg.1 L6]) and the sweep :func:`step_vjp_all`
([Alg.1 L11]-[Alg.1 L12]) and :func:`add_second_order` ([Alg.1 L14]); none of them knows how
the optimizer runs. This is the one module that sees both the optimizers (``optim/``) and the
flat-buffer ops (``kernels/``), so neither imports the other:

- ``"loop"``: the optimizer's per-tensor ``step``/``step_vjp``, one call per tensor (the
  reference; also whenever autograd records the step, see Note [Flat ops under autograd]);
- ``"reference"``: its :class:`~gimli_bptt.optim.declarations.FlatLayout`'s ops from the pure-PyTorch
  twin (:mod:`gimli_bptt.kernels._reference`), one call per bucket of flat buffers;
- ``"fused"``: the same ops compiled (``torch.ops.gimli``), raising if they cannot run;
- ``"auto"`` (default): fused where the kernels are available and suit the tensors, else the
  twin; the loop for optimizers without a flat layout.

A stack of tasks (``tasks=T``) changes nothing here: the inner problem decides once how its
optimizer steps them (:meth:`~gimli_bptt.problem.InnerProblem.step`).

All four give the same numbers (``tests/test_kernels.py``). Tensors the flat ops do not take
(empty ones) come back from :mod:`gimli_bptt.kernels.flat` untouched and run the per-tensor loop here.
"""
from __future__ import annotations

import operator
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .kernels import get_op
from .kernels.flat import Bucket, FlatOutputs, Plan, cached_plan, owned_indices, slot_kind
from ._typing import Grads, Hyper, State
from .optim.base import DiffOptimizer
from .optim.declarations import FlatLayout

KERNEL_MODES = ("auto", "fused", "reference", "loop")



class SegmentBars:
    """φ̄_opt of one VJP over all tensors, as the flat ops return it: per bucket and learned slot,
    one tensor holding every segment's cotangent (``kind`` 1: the sums, shape ``(nseg,)``; 2: the
    element-wise cotangent, flat), plus per-tensor dicts for the tensors handled one at a time.

    :func:`step_vjp_all` returns this with ``segment_bars=True``, for a consumer that adds the
    cotangents into accumulators ([Alg.1 L12]: ``OptimizerHyperparameters.accumulate_all``)
    and so need not split them into per-tensor 0-d tensors first.

    Attributes:
        per_tensor: ``{name: cotangent}`` per tensor (empty for the tensors a bucket covers).
        segments: ``(tensor indices, name, kind, cotangent, per-tensor views or None)``.
    """

    __slots__ = ("per_tensor", "segments")

    def __init__(self, per_tensor: list[dict[str, Tensor]],
                 segments: list[tuple[tuple[int, ...], str, int, Tensor, Optional[list[Tensor]]]]):
        self.per_tensor = per_tensor
        self.segments = segments

    def scale(self, name: str, factor: float) -> None:
        """Multiplies the cotangents of ``name`` by ``factor`` (the chain rule of a learning-rate schedule)."""
        for bars in self.per_tensor:
            if name in bars:
                bars[name] = bars[name] * factor
        self.segments = [(idx, n, kind, t * factor, None if views is None else [v * factor for v in views])
                         if n == name else (idx, n, kind, t, views) for idx, n, kind, t, views in self.segments]

    def as_list(self) -> list[dict[str, Tensor]]:
        """The per-tensor dicts that :func:`step_vjp_all` returns without ``segment_bars``."""
        out = [dict(bars) for bars in self.per_tensor]
        for idx, name, kind, t, views in self.segments:
            parts = t.unbind(0) if kind == 1 else views
            assert parts is not None
            for k, part in zip(idx, parts):
                out[k][name] = part
        return out


def check_kernel_mode(opt: DiffOptimizer, kernels: str) -> None:
    """Raises ``ValueError`` for an unknown mode, or a flat mode the optimizer has no layout for."""
    if kernels not in KERNEL_MODES:
        raise ValueError(f"kernels must be one of {KERNEL_MODES}, got {kernels!r}")
    if opt.flat is None and kernels in ("fused", "reference"):
        raise ValueError(f"{opt.name} has no flat-buffer implementation; use kernels='auto' or 'loop'")


def _differentiable(*lists: Sequence[Any]) -> bool:
    """Whether autograd records the step: grad mode on and some input requires grad."""
    if not torch.is_grad_enabled():
        return False
    for items in lists:
        for x in items:
            if isinstance(x, Tensor) and x.requires_grad:
                return True
            if isinstance(x, dict) and any(isinstance(v, Tensor) and v.requires_grad for v in x.values()):
                return True
    return False


def _use_flat(opt: DiffOptimizer, kernels: str, *inputs: Sequence[Any]) -> bool:
    """Whether the flat-buffer path runs.

    Note [Flat ops under autograd]: the flat ops (compiled or their twin) have no autograd
    formula, and the engine never differentiates through a step (the tape runs under
    ``no_grad``; the sweep's VJP is hand-written). A caller that does, such as the reference
    unroll of :mod:`gimli_bptt.testing`, gets the per-tensor functions, whatever ``kernels`` says.
    """
    check_kernel_mode(opt, kernels)
    layout = opt.flat
    if layout is None or kernels == "loop" or _differentiable(*inputs):
        return False
    if kernels == "auto" and layout.cpu_loop_below:
        theta, hyper = inputs[0], inputs[2]
        if (theta and theta[0].device.type == "cpu" and sum(t.numel() for t in theta) < layout.cpu_loop_below
                and (layout.cpu_loop_if is None or all(map(layout.cpu_loop_if, hyper)))):
            return False  # Note [Small steps run per tensor]
    return True


# Note [Small steps run per tensor]: a flat op pays a fixed cost per call (gathering θ, G and the
# carried cotangents into flat buffers, the per-segment views handed back, the op's dispatch and
# argument checks, the per-segment hyperparameter buffers), while plain SGD's per-tensor step and
# VJP are one to three vectorised torch ops per tensor. Measured on 2 CPU cores (step + VJP of one
# inner step, medians of 200 interleaved calls), the per-tensor loop over 6 tensors took 0.54-0.64x
# the fused path's time without momentum (a 22k-parameter MLP with fixed or learned rates, the
# c-maml conv net alone and with 16 tasks, the sinusoid MLP alone and with 25 tasks), but 1.24-1.29x
# with momentum, where the fused op reads and writes the buffer in the same pass; the fused ops
# pulled ahead on single segments of about a million elements. So ``kernels="auto"`` runs an
# optimizer whose layout sets ``cpu_loop_below`` per tensor on the CPU when its tensors hold fewer
# elements than that in all and ``cpu_loop_if`` holds for every tensor (SGD: half a million
# elements, no momentum buffer); ``kernels="fused"`` and ``"reference"`` still force the flat ops,
# and on accelerators (one launch per bucket instead of several per tensor) the flat ops always
# run. The two paths agree to rounding (tests/test_kernels.py); the choice depends only on the
# tensors' sizes and the fixed hyperparameters, which every step of a meta step shares, so the
# tape, its recomputations and the sweep all take the same path and the plan-independence of the
# hypergradient is kept bit for bit.


# ---------------------------------------------------------------------------- the flat path
# Note [Plan hints]: within one meta step the tape steps from s_j to s_{j+1} with the same plan at
# every j (after the first step or two: SGD's momentum buffer appears at step 0), and the sweep
# reverses each step with the plan the tape used. Working out the plan's signature costs ~25 µs
# per call, a third of the Python work of a call, so the lists the flat path hands back carry a
# hint: the outputs of a step remember the plan they came from (and, once known, the plan the
# next step used on such outputs), and the inputs of a step remember the plan they were stepped
# with. A hint is used only when the lists are still exactly the ones it was made for (the same
# item objects), G has the same None pattern and every hyperparameter value is the same object
# (what the plan cache itself checks), so a call runs exactly the ops a fresh plan would.


class _Hint:
    """How a list of inputs was (or will likely be) stepped: its plan, and the items it was made for."""

    __slots__ = ("plan", "theta", "state", "g_none")

    def __init__(self, plan: Plan, theta: Sequence[Tensor], state: Sequence[State], g_none: tuple[bool, ...]):
        self.plan, self.theta, self.state, self.g_none = plan, tuple(theta), tuple(state), g_none


def _hinted(theta: Sequence[Tensor], G: Grads, state: Sequence[State], hyper: Sequence[Hyper]) -> Optional[Plan]:
    hint = getattr(theta, "hint", None)
    if hint is None or getattr(state, "hint", None) is not hint:
        return None
    plan = hint.plan if isinstance(hint, _Hint) else getattr(hint, "successor", None)
    if plan is None:
        return None
    if isinstance(hint, _Hint):
        if (len(theta) != len(hint.theta) or not all(map(operator.is_, theta, hint.theta))
                or not all(map(operator.is_, state, hint.state)) or hint.g_none != tuple(g is None for g in G)):
            return None
    elif plan.g_none != tuple(g is None for g in G) or not _same_items(theta, state):
        return None
    refs = plan.refs
    k = 0
    for h in hyper:
        for v in h.values():
            if k >= len(refs) or refs[k] is not v:
                return None
            k += 1
    return plan if k == len(refs) else None


def _same_items(theta: Sequence[Tensor], state: Sequence[State]) -> bool:
    """Whether the outputs ``theta``/``state`` of a flat step are still as it made them."""
    made = getattr(theta, "made", None)
    return made is not None and len(theta) == len(made[0]) and all(map(operator.is_, theta, made[0])) and all(
        map(operator.is_, state, made[1]))


def _plan(layout: FlatLayout, theta: Sequence[Tensor], G: Grads, state: Sequence[State],
          hyper: Sequence[Hyper]) -> Plan:
    """The buckets of this call: from a hint (Note [Plan hints]) or the plan cache (Note [Plan cache])."""
    plan = _hinted(theta, G, state, hyper)
    if plan is not None:
        return plan
    counter = layout.counter
    c0 = float(state[0][counter]) if counter is not None and state else 0.0
    g_none = tuple(g is None for g in G)
    per = tuple((t.shape, t.dtype, t.device, tuple(v is None for v in s.values()),
                 float(s[counter]) - c0 if counter is not None else None)
                for t, s in zip(theta, state))
    refs = [v for h in hyper for v in h.values()]

    def build() -> Plan:
        keys: list[Any] = []  # None for a tensor without a gradient
        for t, g, s, h in zip(theta, G, state, hyper):
            if g is None:
                keys.append(None)
                continue
            kinds = tuple(slot_kind(h[name]) for name in layout.hyper)
            count = float(s[counter]) if counter is not None else None
            keys.append((t.device, t.dtype, layout.options(h, s), kinds, count))
        built = Plan(keys, theta, hyper, layout.hyper, refs)
        built.g_none = g_none
        return built

    plan = cached_plan((layout.op, per, g_none), refs, build)
    producer = getattr(theta, "hint", None)
    if getattr(state, "hint", None) is producer and isinstance(producer, Plan):
        producer.successor = plan  # the outputs of ``producer`` are stepped with ``plan``
    return plan


class _Calls:
    """One bucket's constants for its two ops: the ops themselves (per implementation) and the
    state entries each reads and returns (they depend only on the bucket's static options)."""

    __slots__ = ("step_op", "vjp_op", "state_in", "state_out", "bar_in", "bar_out")

    def __init__(self, layout: FlatLayout, b: Bucket, which: str):
        self.step_op = get_op(f"{layout.op}_step", which)
        self.vjp_op = get_op(f"{layout.op}_step_vjp", which)
        self.state_in = layout.state_in(b.options)
        self.state_out = [(j, key) for j, key in enumerate(layout.state_out(b.options)) if key is not None]
        self.bar_in = layout.bar_in(b.options)
        self.bar_out = [(j, key) for j, key in enumerate(layout.bar_out(b.options)) if key is not None]


def _calls(layout: FlatLayout, b: Bucket, kernels: str, sample: Tensor) -> _Calls:
    which = b.impl(kernels, sample)
    calls = b.memo.get(which)
    if calls is None:
        calls = b.memo[which] = _Calls(layout, b, which)
    return calls


def _count(layout: FlatLayout, b: Bucket, state: Sequence[State]) -> Optional[float]:
    """The step count of the step being taken (read now: cached plans outlive it)."""
    return None if layout.counter is None else float(state[b.idx[0]][layout.counter]) + 1.0


def _flat_step(opt: DiffOptimizer, theta: Sequence[Tensor], G: Grads, state: Sequence[State],
               hyper: Sequence[Hyper], kernels: str) -> tuple[list[Tensor], list[State]]:
    layout = opt.flat
    assert layout is not None
    plan = _plan(layout, theta, G, state, hyper)
    theta_next: FlatOutputs = FlatOutputs(theta)
    state_next: FlatOutputs = FlatOutputs(state)
    for k in plan.rest:
        theta_next[k], state_next[k] = opt.step(theta[k], G[k], state[k], hyper[k])  # type: ignore[arg-type]
    counter = layout.counter
    for b in plan.buckets:
        t = _count(layout, b, state)
        calls = _calls(layout, b, kernels, theta[b.idx[0]])
        ins = [b.gather_optional(state, key) for key in calls.state_in]
        outs = calls.step_op(b.gather(theta), b.gather(G), *ins, b.offsets, b.hyper(hyper), b.elementwise,  # type: ignore[arg-type]
                             *layout.args(b.options, t))
        thetas = b.views(outs[0])
        entries = [(key, b.views(outs[1 + j]), outs[1 + j]) for j, key in calls.state_out]
        for j, (k, tk) in enumerate(zip(b.idx, thetas)):
            theta_next[k] = tk
            s = dict(state[k])
            if t is not None:
                s[counter] = t  # type: ignore[index]
            for key, views, _ in entries:
                s[key] = views[j]
            state_next[k] = s
        theta_next.record(None, b.idx_key, thetas, outs[0])
        for key, views, buf in entries:
            state_next.record(key, b.idx_key, views, buf)
    hint = _Hint(plan, theta, state, plan.g_none)
    for inputs in (theta, state):
        if type(inputs) is FlatOutputs:
            inputs.hint = hint  # the sweep reverses this step with this plan
    theta_next.hint = state_next.hint = plan
    theta_next.made = state_next.made = (tuple(theta_next), tuple(state_next))  # type: ignore[attr-defined]
    return theta_next, state_next


def _flat_step_vjp(opt: DiffOptimizer, theta: Sequence[Tensor], G: Grads, state: Sequence[State],
                   hyper: Sequence[Hyper], theta_next_bar: Sequence[Tensor], state_next_bar: Sequence[State],
                   kernels: str) -> tuple[list[Tensor], list[Optional[Tensor]], list[State], SegmentBars]:
    layout = opt.flat
    assert layout is not None
    n = len(theta)
    plan = _plan(layout, theta, G, state, hyper)
    theta_bar: FlatOutputs = FlatOutputs(theta_next_bar)
    G_bar: list[Optional[Tensor]] = [None] * n
    state_bar: FlatOutputs = FlatOutputs(state_next_bar)
    hyper_bar: list[dict[str, Tensor]] = [{} for _ in range(n)]
    segments: list[tuple[tuple[int, ...], str, int, Tensor, Optional[list[Tensor]]]] = []
    for k in plan.rest:
        theta_bar[k], G_bar[k], state_bar[k], hyper_bar[k] = opt.step_vjp(
            theta[k], G[k], state[k], hyper[k], theta_next_bar[k], state_next_bar[k])  # type: ignore[arg-type]
    for b in plan.buckets:
        t = _count(layout, b, state)
        calls = _calls(layout, b, kernels, theta[b.idx[0]])
        ins = [b.gather_optional(state, key) for key in calls.state_in]
        bars_in = [b.gather_optional(state_next_bar, key) for key in calls.bar_in]
        outs = calls.vjp_op(b.gather(theta), b.gather(G), *ins, b.gather(theta_next_bar), *bars_in,  # type: ignore[arg-type]
                            b.offsets, b.hyper(hyper), b.elementwise, b.learned, *layout.args(b.options, t))
        entries = [(key, b.views(outs[2 + j]), outs[2 + j]) for j, key in calls.bar_out]
        thetas = b.views(outs[0])
        for j, (k, tk, gk) in enumerate(zip(b.idx, thetas, b.views(outs[1]))):
            theta_bar[k], G_bar[k] = tk, gk
            state_bar[k] = {key: views[j] for key, views, _ in entries}
        theta_bar.record(None, b.idx_key, thetas, outs[0])
        for key, views, buf in entries:
            state_bar.record(key, b.idx_key, views, buf)
        segments += b.segment_bars(outs[-1])
    return theta_bar, G_bar, state_bar, SegmentBars(hyper_bar, segments)


# ---------------------------------------------------------------------------- the entry points
def step_all(opt: DiffOptimizer, theta: Sequence[Tensor], G: Grads, state: Sequence[State], hyper: Sequence[Hyper],
             kernels: str = "auto") -> tuple[list[Tensor], list[State]]:
    """[Alg.1 L6] for every inner parameter: ``(θ_{j+1}, σ_{j+1})``.

    A tensor whose gradient is ``None`` (it did not take part in the loss) is left as it is,
    with its state, exactly as ``torch.optim`` skips parameters whose ``.grad`` is ``None``.
    The step is element-wise in the tensors or not, as the optimizer is: stacked tasks are the
    inner problem's concern (``InnerProblem.step``, Note [The task dimension] in :mod:`gimli_bptt.tasks`).
    """
    if _use_flat(opt, kernels, theta, G, hyper):
        return _flat_step(opt, theta, G, state, hyper, kernels)
    theta_next: list[Tensor] = []
    state_next: list[State] = []
    for t, g, s, h in zip(theta, G, state, hyper):
        if g is None:
            theta_next.append(t)
            state_next.append(s)
        else:
            tn, sn = opt.step(t, g, s, h)
            theta_next.append(tn)
            state_next.append(sn)
    return theta_next, state_next


def step_vjp_all(opt: DiffOptimizer, theta: Sequence[Tensor], G: Grads, state: Sequence[State],
                 hyper: Sequence[Hyper], theta_next_bar: Sequence[Tensor], state_next_bar: Sequence[State],
                 kernels: str = "auto", segment_bars: bool = False,
                 ) -> tuple[list[Tensor], list[Optional[Tensor]], list[State], Any]:
    """[Alg.1 L11]-[Alg.1 L12] for every inner parameter: ``(θ̄', Ḡ_j, σ̄_j, φ̄_opt per tensor)``.

    A tensor whose gradient was ``None`` was left as it was by the step, so its cotangents pass
    through unchanged and ``Ḡ`` is ``None``. With ``segment_bars`` the flat path returns φ̄_opt
    as a :class:`SegmentBars` (the per-tensor path still returns its list of dicts).
    """
    if _use_flat(opt, kernels, theta, G, hyper, theta_next_bar):
        out = _flat_step_vjp(opt, theta, G, state, hyper, theta_next_bar, state_next_bar, kernels)
        return out if segment_bars else (*out[:3], out[3].as_list())
    theta_bar: list[Tensor] = []
    G_bar: list[Optional[Tensor]] = []
    state_bar: list[State] = []
    hyper_bar: list[dict[str, Tensor]] = []
    for t, g, s, h, tb, sb in zip(theta, G, state, hyper, theta_next_bar, state_next_bar):
        if g is None:
            theta_bar.append(tb)
            G_bar.append(None)
            state_bar.append(sb)
            hyper_bar.append({})
        else:
            a, b, c, d = opt.step_vjp(t, g, s, h, tb, sb)
            theta_bar.append(a)
            G_bar.append(b)
            state_bar.append(c)
            hyper_bar.append(d)
    return theta_bar, G_bar, state_bar, hyper_bar


def gradient_list(G: Sequence[Optional[Tensor]]) -> list[Optional[Tensor]]:
    """G_j as a list that remembers the flat buffer the first flat op gathers from it, so that the
    sweep's VJP of the same step reuses it instead of copying again (Note [Flat outputs])."""
    return FlatOutputs(G)


def add_second_order(theta_bar: list[Tensor], h_theta: Grads) -> list[Tensor]:
    """[Alg.1 L14]: θ̄_j = θ̄' + H_j·Ḡ_j, per tensor (None: no second-order term).

    In place where θ̄' is a view of a buffer the flat op has just allocated for it (Note [Flat
    outputs] in ``kernels/flat.py``): θ̄_j then stays one flat buffer for step j-1's op.
    """
    own = owned_indices(theta_bar)
    mine = [k for k, h in enumerate(h_theta) if h is not None and k in own]
    if mine:
        torch._foreach_add_([theta_bar[k] for k in mine], [h_theta[k] for k in mine])  # type: ignore[misc]
    for k, h in enumerate(h_theta):
        if h is not None and k not in own:
            theta_bar[k] = theta_bar[k] + h
    return theta_bar


__all__ = ["KERNEL_MODES", "SegmentBars", "add_second_order", "check_kernel_mode", "gradient_list", "step_all", "step_vjp_all"]
