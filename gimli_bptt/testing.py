# SPDX-License-Identifier: Apache-2.0
"""Public checks of hypergradients against a plain full autograd unroll (built from the public API only)."""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from .functional import FunctionalModel
from .metaparams import Hypergrad, flat_list
from .optim import get_optimizer
from .second_order import second_order_safe
from .updater import GimliUpdater


def _cuda_devices(updater: GimliUpdater) -> list[int]:
    return sorted({p.device.index or 0 for p in updater.model.parameters() if p.device.type == "cuda"})


def reference_hypergradients(updater: GimliUpdater, train_batches: Sequence[Any], val_batch: Any
                             ) -> tuple[Tensor, dict[str, Hypergrad]]:
    """The hypergradients by brute force: the whole unroll on autograd's graph.

    Runs the same J inner steps as :meth:`GimliUpdater.hypergradient` with the optimizer's
    per-tensor ``step`` (one tensor at a time), but with every gradient taken with
    ``create_graph=True`` and the steps differentiated by autograd, then one
    ``torch.autograd.grad`` of L_val with respect to φ. The approximations are unrolled by
    their definitions: with ``first_order`` every G_j is taken without a graph (a constant);
    with ``truncate=K`` the parameters, the optimizer state and φ_opt are detached for the
    first J - K steps. Memory grows with J times the
    activations: use it to check, not to train. Adam's step takes its square root through
    ``_sqrt``, so autograd stays finite where a gradient element is exactly zero (see Note
    [Adam at a zero second moment]).

    Returns:
        ``(val_loss, hypergrads)`` with the keys and shapes of ``MetaStepResult.hypergrads``.
    """
    batches = list(train_batches)
    if len(batches) != updater.unroll:
        raise ValueError(f"got {len(batches)} train batches but unroll={updater.unroll}")
    model, opt, impl = updater.model, updater.opt, get_optimizer(updater.opt)
    group_of = {id(p): g for g, group in enumerate(opt.param_groups) for p in group["params"]}
    named = list(model.named_parameters())
    inner = [(n, p) for n, p in named if id(p) in group_of and p.requires_grad]  # torch.optim skips the others
    phi = {name: t.detach().clone().requires_grad_(True) for name, t in updater.named_meta_parameters()
           if not name.startswith(("loss.", "init."))}
    hyper = []
    for k, (pname, p) in enumerate(inner):
        group = group_of[id(p)]
        h = impl.read_hyper(opt.param_groups[group])
        for name, gran in updater.learn.items():
            h[name] = phi[f"{name}.{pname}"] if gran == "element" else phi[name][group if gran == "group" else k]
        hyper.append(h)
    fixed = [impl.read_hyper(opt.param_groups[group_of[id(p)]]) for _, p in inner]
    state = [impl.import_state(opt.state.get(p, {}), p, h) for (_, p), h in zip(inner, fixed)]
    theta = [p.detach().clone().requires_grad_(True) for _, p in inner]
    theta0 = list(theta)
    inner_ids = {id(p) for _, p in inner}
    # learn_init learns θ_0 of the parameters outside the optimizer that require grad; the others are constants
    frozen = {n: (p if updater.learn_init and p.requires_grad else p.detach()) for n, p in named
              if id(p) not in inner_ids}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers() if b is not None}
    schedule = updater.options.lr_schedule
    first_order = updater.options.first_order
    cut = updater.unroll - updater.options.window  # the steps before the truncated window
    if cut:
        hyper_cut = [{k: (v.detach() if isinstance(v, Tensor) else v) for k, v in h.items()} for h in hyper]

    def view(theta: Sequence[Tensor], buffers: dict[str, Tensor]) -> FunctionalModel:
        params = dict(zip([n for n, _ in inner], theta))
        params.update(frozen)
        return FunctionalModel(model, {n: params[n] for n, _ in named}, buffers)

    with torch.enable_grad():
        for j, batch in enumerate(batches):
            if cut and j == cut:  # the truncated window starts at a constant state
                theta = [t.detach().requires_grad_(True) for t in theta]
                state = [{k: (v.detach() if isinstance(v, Tensor) else v) for k, v in s.items()} for s in state]
            buffers = {n: b.clone() for n, b in buffers.items()}
            with second_order_safe(not first_order):  # differentiated twice: Note [Second-order-safe passes]
                loss = updater.train_loss(view(theta, buffers), batch)
            G = torch.autograd.grad(loss, theta, create_graph=not first_order, allow_unused=True)
            scale = 1.0 if schedule is None else float(schedule(j))
            nxt = []
            for k, (t, g, s, h) in enumerate(zip(theta, G, state, hyper_cut if j < cut else hyper)):
                if g is None:
                    nxt.append(t)
                    continue
                t, state[k] = impl.step(t, g, s, h if scale == 1.0 else {**h, "lr": h["lr"] * scale})
                nxt.append(t)
            theta = nxt
        L = updater.val_loss(view(theta, {n: b.clone() for n, b in buffers.items()}), val_batch)
        wrt: list[tuple[str, Tensor]] = [(name, t) for name, t in phi.items()]
        wrt += [(f"loss.{n}", t) for n, t in updater.loss_params.items()]
        if updater.learn_init:
            init = dict(zip([n for n, _ in inner], theta0))
            init.update(frozen)
            wrt += [(f"init.{n}", init[n]) for n, _ in named if init[n].requires_grad]
        grads = torch.autograd.grad(L, [t for _, t in wrt], allow_unused=True)
    out: dict[str, Hypergrad] = {}
    elements: dict[str, list[Tensor]] = {}  # element granularity: one list per name, in the parameters' order
    for (name, t), g in zip(wrt, grads):
        g = torch.zeros_like(t) if g is None else g
        base, _, pname = name.partition(".")
        if updater.learn.get(base) == "element" and not name.startswith(("loss.", "init.")):
            if base not in elements:
                out[base] = elements[base] = []
            elements[base].append(g)
        else:
            out[name] = g
    return L.detach(), out


def relative_error(actual: Hypergrad, expected: Hypergrad, floor: float = 0.0) -> float:
    """max |actual - expected| / max(max |expected|, floor) over all elements.

    ``floor`` keeps a hypergradient that is mathematically zero (round-off on both sides,
    e.g. the bias of a layer followed by BatchNorm) from reading as a large relative error.
    The two must have the same number of tensors and of elements.
    """
    a_list, e_list = flat_list(actual), flat_list(expected)
    if len(a_list) != len(e_list):
        raise ValueError(f"{len(a_list)} tensors against {len(e_list)} expected")
    a = torch.cat([t.detach().reshape(-1).double() for t in a_list])
    e = torch.cat([t.detach().reshape(-1).double() for t in e_list])
    if a.numel() != e.numel():
        raise ValueError(f"{a.numel()} elements against {e.numel()} expected")
    if e.numel() == 0:
        return 0.0
    scale = max(e.abs().max().item(), floor)
    diff = (a - e).abs().max().item()
    if scale == 0.0:
        return diff
    return diff / scale


def _cast_tree(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(_cast_tree(v, dtype) for v in x)
    if isinstance(x, Mapping):
        return {k: _cast_tree(v, dtype) for k, v in x.items()}
    return x


@contextlib.contextmanager
def _loss_params_as(tensors: Sequence[Tensor], dtype: torch.dtype) -> Iterator[None]:
    """Temporarily converts leaf tensors captured by the user's losses, then restores them."""
    saved = [t.data for t in tensors]
    try:
        for t in tensors:
            t.data = t.data.to(dtype)
        yield
    finally:
        for t, d in zip(tensors, saved):
            t.data = d


def converted_copy(updater: GimliUpdater, dtype: torch.dtype) -> GimliUpdater:
    """An updater over a copy of the model and optimizer in ``dtype``, with the same φ and options.

    The user's loss parameters are not copied (the losses capture them): convert them for
    the duration of the computation with :func:`_loss_params_as`.
    """
    model = copy.deepcopy(updater.model).to(dtype)
    index = {id(p): n for n, p in updater.model.named_parameters()}
    new_params = dict(model.named_parameters())
    groups = []
    for group in updater.opt.param_groups:
        g = {k: v for k, v in group.items() if k != "params"}
        g["params"] = [new_params[index[id(p)]] for p in group["params"]]
        groups.append(g)
    opt_cls: Callable[..., torch.optim.Optimizer] = type(updater.opt)  # every torch.optim class takes (params, **options)
    opt = opt_cls(groups)
    for p_old, state in updater.opt.state.items():
        p_new = new_params[index[id(p_old)]]
        opt.state[p_new] = {k: (v.detach().clone().to(dtype) if isinstance(v, Tensor) and k != "step" else copy.deepcopy(v))
                            for k, v in state.items()}
    o = updater.options
    with _loss_params_as(list(updater.loss_params.values()), dtype):
        twin = GimliUpdater(
            model, opt, updater.train_loss, updater.val_loss, unroll=o.unroll, learn=updater.learn,
            loss_params=updater.loss_params, learn_init=o.learn_init, hvp=o.hvp, on_nonfinite=o.on_nonfinite,
            meta_opt=torch.optim.SGD, lr_schedule=o.lr_schedule, memory=o.memory, kernels=o.kernels,
            first_order=o.first_order, truncate=o.truncate,
        )
    theirs = dict(updater.named_meta_parameters())
    with torch.no_grad():
        for name, t_new in twin.named_meta_parameters():
            if not name.startswith(("loss.", "init.")):
                t_new.copy_(theirs[name])
    return twin


def check_hypergradients(updater: GimliUpdater, train_batches: Sequence[Any], val_batch: Any, *,
                         dtype: torch.dtype | None = torch.float64) -> dict[str, float]:
    """Compares the updater's hypergradients with a plain full autograd unroll.

    Both are computed on a copy of the model and optimizer converted to ``dtype`` (float64 by
    default, so that rounding does not hide a wrong derivative; ``None`` keeps the model's
    dtype), from the same random generator state, so dropout draws the same masks. Nothing
    of the updater, the model or the optimizer changes.

    Returns:
        ``{meta-parameter name: max relative error}``; in float64 a correct setup gives about
        1e-12 or less. Each error is relative to the largest entry of that hypergradient, or
        to 1e-4 times the larger of |L_val| and the largest entry of all hypergradients if
        that is larger: a hypergradient that is zero in exact arithmetic (Adam's beta1 after
        one step, a bias followed by BatchNorm) is pure round-off on both sides, and the
        terms that cancel there can be a thousand times larger than the result (Adam's beta2
        terms scale with 1 / (1 - beta2)), so the floor sits well above round-off.
    """
    model_dtype = next(iter(updater.model.parameters())).dtype
    if dtype is None or dtype == model_dtype:
        twin = updater
        cast = lambda x: x  # noqa: E731
        ctx: Any = contextlib.nullcontext()
    else:
        twin = converted_copy(updater, dtype)
        cast = lambda x: _cast_tree(x, dtype)  # noqa: E731
        ctx = _loss_params_as(list(updater.loss_params.values()), dtype)
    batches, val = cast(list(train_batches)), cast(val_batch)
    devices = _cuda_devices(twin)
    with ctx, torch.random.fork_rng(devices=devices):
        start_cpu = torch.get_rng_state()
        start_cuda = [torch.cuda.get_rng_state(d) for d in devices]
        ours = twin.hypergradient(batches, val)
        torch.set_rng_state(start_cpu)
        for d, s in zip(devices, start_cuda):
            torch.cuda.set_rng_state(s, d)
        L, ref = reference_hypergradients(twin, batches, val)
    if set(ours.hypergrads) != set(ref):
        raise AssertionError(f"hypergradient names differ: {sorted(ours.hypergrads)} against {sorted(ref)}")
    overall = max((t.detach().abs().max().item() for v in ref.values() for t in flat_list(v) if t.numel()), default=0.0)
    floor = 1e-4 * max(overall, abs(float(L)))
    return {name: relative_error(ours.hypergrads[name], ref[name], floor) for name in ref}


# --------------------------------------------------------------------------- tolerances
#: float64's unit round-off doubled: the gap between 1 and the next float64, 2.2e-16
EPS64: float = torch.finfo(torch.float64).eps

#: how many rounded operations one term or step stands for (a step of an optimizer is a few
#: flops per element; a dot product or sum adds one rounding per term): the constant c of
#: :func:`float64_rtol`, the same for every tolerance so that each reads as "J terms of a
#: problem of condition κ"
ROUNDING_SAFETY: float = 16.0


def float64_rtol(terms: int, condition: float = 1.0) -> float:
    """The relative tolerance between two float64 computations of one quantity that round differently.

    Two correct computations of the same value (another summation order, a fused kernel, FMA
    contraction on another CPU, a vmapped twin) differ by their forward errors. A result built
    from ``terms`` rounded steps (inner steps, summed terms, chained operations), each with a
    relative error of at most :data:`EPS64`, and whose condition number (relative change of
    the output per relative change of its inputs) is ``condition``, has a forward error of at
    most about ``terms * condition * EPS64`` to first order (Higham, *Accuracy and Stability
    of Numerical Algorithms*, 2nd ed., §1.6 and §3.1). The tolerance is that bound times
    :data:`ROUNDING_SAFETY`: it holds on any IEEE machine and sits orders of magnitude below
    the error of a wrong derivative (a dropped term, a wrong sign, a 1e-8 relative slip).

    Take ``condition`` from the problem, never from the difference one machine showed: bound
    it (1 for a sum of same-signed terms or one element-wise update), or measure the whole
    growth with :func:`rounding_amplification` and round it up to a power of ten (then
    ``terms=1``: the measurement already counts them).

    Args:
        terms: How many rounded steps or terms accumulate into the compared values (>= 1).
        condition: The condition number κ of the compared values (>= 1).

    Returns:
        ``ROUNDING_SAFETY * terms * condition * EPS64``.
    """
    if terms < 1 or not condition >= 1.0:
        raise ValueError(f"float64_rtol needs terms >= 1 and condition >= 1, got terms={terms}, "
                         f"condition={condition}")
    return ROUNDING_SAFETY * terms * condition * EPS64


def rounding_amplification(fn: Callable[[torch.dtype], Any], floor: float = 0.0) -> float:
    """How many times the unit round-off grows into the outputs of ``fn``, measured in float32.

    ``fn(dtype)`` computes the outputs (a tensor or a nested list/tuple/dict of them) with the
    model, data and hyperparameters in ``dtype``. The float32 result differs from the float64
    one by float32's rounding, grown by everything the computation does: the number of steps
    and summed terms, the cancellation inside them (BatchNorm's variance, a backward pass's
    sums), the conditioning of each step (Adam's division by a small second moment). The
    ratio ``relative_error(fn(float32), fn(float64), floor) / eps32`` is that growth; the
    same computation in float64 grows float64's round-off by the same factor, to first order,
    so it is the ``condition`` to give :func:`float64_rtol` (with ``terms=1``: it already
    counts them). A perturbation of the inputs alone misses the rounding of intermediates,
    which is why this probe runs the whole computation in the lower precision.

    Measure it once per test problem and write the value, rounded up to a power of ten, beside
    the tolerance with the command that measured it: it is a property of the problem (the
    same on every machine to within a small factor, which the rounding up and
    :data:`ROUNDING_SAFETY` absorb), not of one machine's rounding.

    Args:
        fn: Computes the outputs in the given dtype.
        floor: Relative to the largest entry of all float64 outputs: the smallest scale an
            output tensor is measured against, as the comparison it serves does (an output
            that is zero in exact arithmetic is round-off and has no relative error).

    Returns:
        ``max over output tensors of max |out32 - out64| / max(max |out64|, floor * largest) / eps32``.
    """
    def flat(out: Any) -> list[Tensor]:
        if isinstance(out, Tensor):
            return [out.detach().double()]
        if isinstance(out, Mapping):
            return [t for v in out.values() for t in flat(v)]
        return [t for v in out for t in flat(v)]

    ref, low = flat(fn(torch.float64)), flat(fn(torch.float32))
    if len(ref) != len(low):
        raise ValueError(f"fn gave {len(low)} tensors in float32 and {len(ref)} in float64")
    largest = max((t.abs().max().item() for t in ref if t.numel()), default=0.0)
    worst = 0.0
    for a, b in zip(low, ref):
        scale = max(b.abs().max().item() if b.numel() else 0.0, floor * largest)
        if scale > 0:
            worst = max(worst, (a - b).abs().max().item() / scale)
    return worst / torch.finfo(torch.float32).eps


def hypergradient_amplification(updater: GimliUpdater, train_batches: Sequence[Any], val_batch: Any,
                                floor: float = 0.0) -> float:
    """:func:`rounding_amplification` of ``updater.hypergradient(train_batches, val_batch)``.

    Runs the hypergradient on copies of the model, the optimizer and the loss parameters in
    float32 and in float64 (:func:`converted_copy`), the batches cast alike; nothing of the
    updater changes. ``floor`` as in :func:`rounding_amplification`.
    """
    def fn(dtype: torch.dtype) -> Any:
        twin = converted_copy(updater, dtype)
        with _loss_params_as(list(updater.loss_params.values()), dtype):
            return twin.hypergradient(_cast_tree(list(train_batches), dtype), _cast_tree(val_batch, dtype)).hypergrads

    return rounding_amplification(fn, floor)


__all__ = ["EPS64", "ROUNDING_SAFETY", "check_hypergradients", "converted_copy",
           "float64_rtol", "hypergradient_amplification", "reference_hypergradients", "relative_error", "rounding_amplification"]
