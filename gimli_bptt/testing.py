# SPDX-License-Identifier: Apache-2.0
"""Public checks of hypergradients against a plain full autograd unroll."""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from .optim.base import step_all
from .updater import GimliUpdater, Hypergrad, _flat


def reference_hypergradients(updater: GimliUpdater, train_batches: Sequence[Any], val_batch: Any
                             ) -> tuple[Tensor, dict[str, Hypergrad]]:
    """The hypergradients by brute force: the whole unroll on autograd's graph.

    Runs the same J inner steps as :meth:`GimliUpdater.hypergradient`, but with every
    gradient taken with ``create_graph=True`` and the optimizer step differentiated by
    autograd, then one ``torch.autograd.grad`` of L_val with respect to φ. Memory grows with
    J times the activations: use it to check, not to train. Adam's step takes its square
    root through ``_sqrt``, so autograd stays finite where a gradient element is exactly zero
    (see Note [Adam at a zero second moment]).

    Returns:
        ``(val_loss, hypergrads)`` with the keys and shapes of ``MetaStepResult.hypergrads``.
    """
    batches = updater._check_batches(train_batches)
    problem = updater._problem()
    values = {name: ([t.detach().clone().requires_grad_(True) for t in v] if isinstance(v, list)
                     else v.detach().clone().requires_grad_(True))
              for name, v in updater.hyper.values.items()}
    problem.hyper = updater.hyper.per_param(values, detach=False)
    theta0, state, buffers = updater._initial_state()
    theta = [t.requires_grad_(True) for t in theta0]
    with torch.enable_grad():
        for j, batch in enumerate(batches):
            buffers = problem.fresh_buffers(buffers)
            loss = problem.loss(theta, buffers, batch, j)
            G = torch.autograd.grad(loss, theta, create_graph=True, allow_unused=True)
            theta, state = step_all(problem.impl, theta, list(G), state, problem.hyper_at(j))
        view = problem.view(theta, problem.fresh_buffers(buffers))
        L = updater.val_loss(view, val_batch)
        wrt: list[tuple[str, Tensor]] = []
        for name, v in values.items():
            wrt += [(name, t) for t in _flat(v)]
        wrt += [(f"loss.{n}", t) for n, t in updater.loss_params.items()]
        if updater.learn_init:
            named = dict(zip(updater._names, theta0))
            named.update({n: t for n, t in problem.frozen.items()})
            wrt += [(f"init.{n}", named[n]) for n, _ in updater.model.named_parameters()]
        grads = torch.autograd.grad(L, [t for _, t in wrt], allow_unused=True)
    out: dict[str, Hypergrad] = {}
    for (name, t), g in zip(wrt, grads):
        g = torch.zeros_like(t) if g is None else g
        if name in values and isinstance(values[name], list):
            out.setdefault(name, []).append(g)  # type: ignore[union-attr]
        else:
            out[name] = g
    return L.detach(), out


def relative_error(actual: Hypergrad, expected: Hypergrad, floor: float = 0.0) -> float:
    """max |actual - expected| / max(max |expected|, floor) over all elements.

    ``floor`` keeps a hypergradient that is mathematically zero (round-off on both sides,
    e.g. the bias of a layer followed by BatchNorm) from reading as a large relative error.
    """
    a = torch.cat([t.detach().reshape(-1).double() for t in _flat(actual)])
    e = torch.cat([t.detach().reshape(-1).double() for t in _flat(expected)])
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
    """An updater over a copy of the model and optimizer in ``dtype``, with the same φ.

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
    opt = type(updater.opt)(groups)
    for p_old, state in updater.opt.state.items():
        p_new = new_params[index[id(p_old)]]
        opt.state[p_new] = {k: (v.detach().clone().to(dtype) if isinstance(v, Tensor) and k != "step" else copy.deepcopy(v))
                            for k, v in state.items()}
    with _loss_params_as(list(updater.loss_params.values()), dtype):
        twin = GimliUpdater(
            model, opt, updater.train_loss, updater.val_loss, unroll=updater.unroll, learn=updater.learn,
            loss_params=updater.loss_params, learn_init=updater.learn_init, hvp=updater.hvp,
            check_finite=updater.check_finite, meta_opt=torch.optim.SGD, lr_schedule=updater.lr_schedule,
            checkpoint=updater.checkpoint, keep_graphs=updater.keep_graphs, memory_budget=updater.memory_budget,
        )
    with torch.no_grad():
        for t_new, t_old in zip(twin.hyper.leaves(), updater.hyper.leaves()):
            t_new.copy_(t_old)
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
    if dtype is None or dtype == updater._ref.dtype:
        twin = updater
        cast = lambda x: x  # noqa: E731
        ctx: Any = contextlib.nullcontext()
    else:
        twin = converted_copy(updater, dtype)
        cast = lambda x: _cast_tree(x, dtype)  # noqa: E731
        ctx = _loss_params_as(list(updater.loss_params.values()), dtype)
    batches, val = cast(list(train_batches)), cast(val_batch)
    devices = twin._cuda_devices
    with ctx, torch.random.fork_rng(devices=devices):
        start_cpu = torch.get_rng_state()
        start_cuda = [torch.cuda.get_rng_state(d) for d in devices]
        ours = twin.hypergradient(batches, val)
        torch.set_rng_state(start_cpu)
        for d, s in zip(devices, start_cuda):
            torch.cuda.set_rng_state(s, d)
        L, ref = reference_hypergradients(twin, batches, val)
    overall = max((t.detach().abs().max().item() for v in ref.values() for t in _flat(v) if t.numel()), default=0.0)
    floor = 1e-4 * max(overall, abs(float(L)))
    return {name: relative_error(ours.hypergrads[name], ref[name], floor) for name in ref}


__all__ = ["check_hypergradients", "converted_copy", "reference_hypergradients", "relative_error"]
