# SPDX-License-Identifier: Apache-2.0
"""Meta-batches of tasks (``GimliUpdater(tasks=T)``): where the task dimension lives.

Note [The task dimension]: with ``tasks=T`` every tensor of the inner loop gains a leading
dimension of size T, one slice per task: θ'_j, the optimizer state σ_j and G_j on the tape,
their cotangents in the sweep, and the module's buffers (each task has its own BatchNorm
statistics). φ is shared by the tasks. The losses stay the user's single-task functions; they
are vectorised with ``torch.func.vmap`` (:func:`vmapped_losses`), which returns one loss per
task, and autograd differentiates their *sum*: since the tasks share nothing in the inner loop,
the gradient of the sum with respect to the stacked θ'_j is each task's own G_j, and the
Hessian-vector product of the sum is each task's own H_j·Ḡ_j, so Algorithm 1 runs unchanged
on the stacked tensors. The validation loss is the *mean* over the tasks, so B_J, every
cotangent after it and the accumulated φ̄ are the mean over the tasks of the per-task
hypergradients (the MAML objective); θ_0, shared, gets the sum of its T slices' cotangents.

The element-wise optimizers (all but Adafactor and Muon) apply unchanged to stacked tensors
(their hyperparameters broadcast over the task dimension, and a cotangent is summed back to a
hyperparameter's shape by ``reduce_like``) and run through :mod:`gimli_bptt.stepping` like a
single task (the fused kernels see a stacked tensor as one longer segment); the others run per
task under ``torch.func.vmap`` (:func:`step_per_task`, :func:`step_vjp_per_task`). Which of the
two is decided once, when the inner problem is built (``InnerProblem.step`` and ``step_vjp``),
so the tape, the sweep and the stepping functions carry no task flag; the validation loss's mean
over the tasks is the problem's too (``InnerProblem.validation_loss``).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ._typing import Grads, Hyper, State
from .optim.base import DiffOptimizer
from .reverse.meter import tensors_in


def stack(t: Tensor, tasks: int) -> Tensor:
    """T copies of ``t`` along a new leading dimension (a tensor of its own, not a view)."""
    return t.detach().unsqueeze(0).expand(tasks, *t.shape).clone()


def stack_state(state: Mapping[str, Any], tasks: int) -> dict[str, Any]:
    """One tensor's optimizer state with every tensor shaped like the parameter stacked per task.

    Scalars (the step count) and 0-d state entries (NAdam's ``mu_product``, ASGD's ``eta``,
    which depend on the hyperparameters only) stay shared by the tasks.
    """
    return {k: (stack(v, tasks) if isinstance(v, Tensor) and v.dim() > 0 else v) for k, v in state.items()}


def check_task_batch(batch: Any, tasks: int, what: str) -> None:
    """Every tensor of ``batch`` has a leading task dimension of size ``tasks``.

    Raises:
        ValueError: naming the first tensor that does not.
    """
    found = False
    for k, t in enumerate(tensors_in(batch)):
        found = True
        if t.dim() == 0 or t.shape[0] != tasks:
            raise ValueError(
                f"{what}: with tasks={tasks} every tensor of a batch needs a leading task dimension of size "
                f"{tasks}; tensor {k} has shape {tuple(t.shape)} (stack the tasks' batches with torch.stack, "
                "or use tasks=None for one task per call)"
            )
    if not found:
        raise ValueError(f"{what}: with tasks={tasks} a batch must hold tensors with a leading task dimension")


def vmapped_losses(one: Callable[[list[Tensor], dict[str, Tensor], Any], Tensor], theta: list[Tensor],
                   buffers: dict[str, Tensor], batch: Any, what: str) -> Tensor:
    """``one(θ[t], buffers[t], batch[t])`` for every task t, vectorised: the (T,) per-task losses.

    Random draws differ between tasks (``randomness="different"``) and replay like any other
    draw from torch's generators.

    Raises:
        ValueError: ``one`` cannot be vectorised (data-dependent Python control flow, ``.item()``,
            an op without a batching rule); the message names the cause and the fix.
    """
    try:
        return torch.func.vmap(one, in_dims=(0, 0, 0), randomness="different")(theta, buffers, batch)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        if "vmap" not in str(exc) and "Batching rule" not in str(exc) and "batched" not in str(exc).lower():
            raise
        raise ValueError(
            f"{what} cannot be vectorised over the tasks with torch.func.vmap ({first}). Write it with "
            "vmap-compatible operations (no .item(), no Python branches on tensor values, no in-place updates "
            "of tensors that are not per task), or use tasks=None and one hypergradient() call per task"
        ) from exc


def _task_dims(state: State) -> dict[str, Optional[int]]:
    """vmap's in_dims of one tensor's state: its per-task tensors along 0, the rest shared."""
    return {k: (0 if isinstance(v, Tensor) and v.dim() > 0 else None) for k, v in state.items()}


def step_per_task(opt: DiffOptimizer, theta: Sequence[Tensor], G: Grads, state: Sequence[State],
                  hyper: Sequence[Hyper]) -> tuple[list[Tensor], list[State]]:
    """[Alg.1 L6] of an optimizer that is not element-wise (``stepping.step_all``), task by task
    under ``torch.func.vmap``."""
    theta_next, state_next = [], []
    for t, g, s, h in zip(theta, G, state, hyper):
        if g is None:
            theta_next.append(t)
            state_next.append(s)
            continue
        scalars = {k: v for k, v in s.items() if not isinstance(v, Tensor)}
        tensors = {k: v for k, v in s.items() if isinstance(v, Tensor)}

        def one(t1: Tensor, g1: Tensor, s1: dict[str, Tensor], h: Hyper = h) -> tuple[Tensor, dict[str, Tensor], dict]:
            tn, sn = opt.step(t1, g1, {**scalars, **s1}, h)
            return tn, {k: v for k, v in sn.items() if isinstance(v, Tensor)}, {
                k: torch.tensor(float(v)) for k, v in sn.items() if not isinstance(v, Tensor) and v is not None}

        tn, sn_t, sn_s = torch.func.vmap(one, in_dims=(0, 0, _task_dims(tensors)))(t, g, tensors)
        sn: State = dict(sn_t)
        sn.update({k: float(v.reshape(-1)[0]) for k, v in sn_s.items()})
        theta_next.append(tn)
        state_next.append(sn)
    return theta_next, state_next


def step_vjp_per_task(opt: DiffOptimizer, theta: Sequence[Tensor], G: Grads, state: Sequence[State],
                      hyper: Sequence[Hyper], theta_next_bar: Sequence[Tensor], state_next_bar: Sequence[State],
                      ) -> tuple[list[Tensor], list[Optional[Tensor]], list[State], list[dict[str, Tensor]]]:
    """[Alg.1 L11]-[Alg.1 L12] (``stepping.step_vjp_all``) task by task under ``torch.func.vmap``;
    φ̄_opt and the cotangents of shared state entries are summed over the tasks (φ and those
    entries are shared by them)."""
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
            continue
        scalars = {k: v for k, v in s.items() if not isinstance(v, Tensor)}
        tensors = {k: v for k, v in s.items() if isinstance(v, Tensor)}
        bars = {k: v for k, v in sb.items() if v is not None}

        def one(t1: Tensor, g1: Tensor, s1: dict[str, Tensor], tb1: Tensor, sb1: dict[str, Tensor],
                h: Hyper = h) -> tuple:
            return opt.step_vjp(t1, g1, {**scalars, **s1}, h, tb1, sb1)

        a, b, c, d = torch.func.vmap(one, in_dims=(0, 0, _task_dims(tensors), 0, _task_dims(bars)))(t, g, tensors, tb, bars)
        shared = {k for k, v in tensors.items() if v.dim() == 0}
        theta_bar.append(a)
        G_bar.append(b)
        state_bar.append({k: (v.sum(0) if k in shared else v) for k, v in c.items()})
        hyper_bar.append({k: v.sum(0) for k, v in d.items()})
    return theta_bar, G_bar, state_bar, hyper_bar


__all__ = ["check_task_batch", "stack", "stack_state", "step_per_task", "step_vjp_per_task", "vmapped_losses"]
