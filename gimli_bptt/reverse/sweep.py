# SPDX-License-Identifier: Apache-2.0
"""The reverse sweep of Algorithm 1, [Alg.1 L8]-[Alg.1 L15]: second-order BPTT by hand.

Generalised to stateful optimizers (σ_j, the optimizer state, travels with θ'_j; the
transcription of all 18 lines is in the package docstring, :mod:`gimli_bptt`)::

     8: A_opt <- 0; A_loss <- ∂L_val/∂φ_loss (the direct term; 0 in the paper)
     9: B_J <- ∇_θ L_val(θ'_J);  σ̄_J <- 0
    10: for j = J-1 ... 0:
    11:     (θ̄', σ̄_j, Ḡ_j, φ̄_opt) <- step_vjp(θ'_j, σ_j, G_j; φ_opt; B_{j+1}, σ̄_{j+1})    (Ḡ_j = B_{j+1}·O_j)
    12:     A_opt  += φ̄_opt
    13:     A_loss += (∂G_j/∂φ_loss)ᵀ Ḡ_j
    14:     B_j    <- θ̄' + H_j Ḡ_j                                  (H_j the Hessian of ℓ_j)
    15: end

At the end B_0 is the hypergradient of the initial parameters θ_0 (MAML).

Note [First order]: with ``first_order=True`` lines 13 and the second term of line 14 are dropped:
G_j is taken as a constant of θ_j, so H_j·Ḡ_j = 0 and (∂G_j/∂φ_loss)ᵀ·Ḡ_j = 0. What remains is
exact: the optimizer's own Jacobians in θ and its state (weight decay inside the optimizer
included), line 12 and the direct term of L_val::

    B_j = (∂opt'_j/∂θ)ᵀ B_{j+1} (+ the state's cotangent),    A_opt += (∂opt'_j/∂φ_opt)ᵀ B_{j+1}

For MAML with plain SGD (∂θ'/∂θ = I) this is FOMAML: ∇_{θ_0} ≈ ∇_θ L_val(θ'_J). No gradient
graph is built or kept: the cost is the forward pass plus the optimizer's VJPs.

The sweep knows no optimizer, no kernel and no task dimension: ``step_vjp`` is the inner
problem's (``InnerProblem.step_vjp``, through :mod:`gimli_bptt.stepping`), and the
second-order terms come from :mod:`gimli_bptt.hvp`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor

from .. import engine
from .._typing import State
from ..errors import NonFiniteError
from ..hvp import StepSecondOrder
from ..metaparams import OptimizerHyperparameters
from ..problem import InnerProblem, replay_rng
from ..stepping import add_second_order
from .tape import TapeEntry, TapeResult


@dataclass
class SweepResult:
    """What lines 9-15 computed: L_val, B_0 and the accumulators.

    Attributes:
        val_loss: L_val(θ'_J), detached (distributed: the mean over the ranks).
        theta0_bar: B_0, the gradient with respect to θ_0, per inner parameter.
        A_opt: The cotangents of φ_opt at its learned granularity.
        A_loss: The cotangents of each loss leaf (the user's loss parameters, then the frozen
            parameters with ``learn_init``).
        task_val_losses: With tasks, each task's L_val (shape ``(T,)``), else None.
    """

    val_loss: Tensor
    theta0_bar: list[Tensor]
    A_opt: dict[str, Tensor | list[Tensor]]
    A_loss: list[Tensor]
    task_val_losses: Optional[Tensor] = None


def validation_gradient(problem: InnerProblem, end: TapeResult, val_loss: Callable[[Any, Any], Tensor],
                        val_batch: Any, unroll: int) -> tuple[Tensor, Optional[Tensor], list[Tensor], list[Optional[Tensor]]]:
    """[Alg.1 L9]: ``(L_val(θ'_J), per-task L_val or None, B_J, ∂L_val/∂φ_loss)``; distributed, the
    means over the ranks. With tasks, L_val is the mean of the tasks' validation losses.

    Raises:
        NonFiniteError: L_val is NaN or infinite (when the problem checks finiteness).
        ValueError: ``val_loss`` does not depend on the model's parameters.
    """
    if problem.compiled is not None and problem.reducer is None:
        ok, out = problem.compiled.validation(problem, end.theta, problem.fresh_buffers(end.buffers), val_batch,
                                              lambda: _eager_validation_gradient(problem, end, val_loss, val_batch, unroll))
        if not ok:
            return out  # type: ignore[no-any-return]
        L, task_L, B_J, direct = out
        if problem.check_finite and not math.isfinite(L.item()):
            raise NonFiniteError(f"val_loss is {L.item()} after {unroll} inner steps")
        return L, task_L, B_J, direct
    return _eager_validation_gradient(problem, end, val_loss, val_batch, unroll)


def _eager_validation_gradient(problem: InnerProblem, end: TapeResult, val_loss: Callable[[Any, Any], Tensor],
                               val_batch: Any, unroll: int
                               ) -> tuple[Tensor, Optional[Tensor], list[Tensor], list[Optional[Tensor]]]:
    theta_J = [t.detach().requires_grad_(True) for t in end.theta]
    with torch.enable_grad():
        L, task_L = problem.validation_loss(val_loss, theta_J, problem.fresh_buffers(end.buffers), val_batch)
        if problem.reducer is None and problem.check_finite and not math.isfinite(L.item()):
            raise NonFiniteError(f"val_loss is {L.item()} after {unroll} inner steps")
        if not L.requires_grad:
            raise ValueError("val_loss does not depend on the model's parameters")
        grads = list(engine.grad((L,), theta_J + problem.loss_leaves))
    if problem.reducer is not None:  # one collective: L_val, B_J and ∂L_val/∂φ_loss
        out = problem.all_reduce_mean([L.detach()] + grads, [L] + theta_J + problem.loss_leaves,
                                      "L_val, B_J and the direct term ∂L_val/∂φ_loss (validation)")
        L, grads = out[0], out[1:]  # type: ignore[assignment]
        if problem.check_finite and not math.isfinite(L.item()):
            raise NonFiniteError(f"val_loss (the mean over the ranks) is {L.item()} after {unroll} inner steps")
    n = len(theta_J)
    B_J = [torch.zeros_like(t) if g is None else g for t, g in zip(theta_J, grads[:n])]
    return L.detach(), None if task_L is None else task_L.detach(), B_J, grads[n:]


def reverse_sweep(problem: InnerProblem, phi_opt: OptimizerHyperparameters, end: TapeResult,
                  entries_reversed: Iterable[TapeEntry], val_loss: Callable[[Any, Any], Tensor], val_batch: Any,
                  hvp: str, second_order: bool = True) -> SweepResult:
    """Runs [Alg.1 L8]-[Alg.1 L15] over the tape, newest entry first.

    Args:
        problem: The inner problem (losses, optimizer, hyperparameters per parameter).
        phi_opt: φ_opt, whose :meth:`~OptimizerHyperparameters.accumulate_all` maps per-tensor
            cotangents to the learned granularity.
        end: s_J, the end of the tape's first pass.
        entries_reversed: Tape entries for j = J-1 ... 0.
        val_loss: ``val_loss(model, batch)``.
        val_batch: Its batch.
        hvp: ``"rev"`` or ``"fwd"`` (see :mod:`gimli_bptt.hvp`).
        second_order: False for the first-order approximation (Note [First order]): the terms
            of [Alg.1 L13] and the second term of [Alg.1 L14] are dropped, so G_j (kept on the
            tape) is a constant and no graph is built.
    """
    L, task_L, B, direct = validation_gradient(problem, end, val_loss, val_batch, len(end.losses))  # [Alg.1 L9]
    A_opt = phi_opt.zeros()  # [Alg.1 L8]
    A_loss = [torch.zeros_like(leaf) if d is None else d.detach().clone() for leaf, d in zip(problem.loss_leaves, direct)]
    state_bar: list[State] = [{} for _ in B]  # σ̄_J = 0
    for entry in entries_reversed:  # [Alg.1 L10]
        B, state_bar, phi_bar, h_loss = reverse_step(problem, entry, B, state_bar, hvp, second_order)  # [Alg.1 L11], L14
        phi_opt.accumulate_all(A_opt, problem.hyper_bar_at(entry.j, phi_bar))  # [Alg.1 L12]
        for a, h in zip(A_loss, h_loss):  # [Alg.1 L13]
            if h is not None:
                a += h
    return SweepResult(L, B, A_opt, A_loss, task_L)


def reverse_step(problem: InnerProblem, entry: TapeEntry, B: list[Tensor], state_bar: list[State], hvp: str,
                 second_order: bool) -> tuple[list[Tensor], list[State], Any, Sequence[Optional[Tensor]]]:
    """[Alg.1 L11]-[Alg.1 L14] of one tape entry: ``(B_j, σ̄_j, φ̄_opt, (∂G_j/∂φ_loss)ᵀ·Ḡ_j per loss leaf)``
    from B_{j+1} and σ̄_{j+1} (a None term is zero; first order: all None).

    With compiled steps this is one compiled call (Note [Compiled meta-steps] in
    :mod:`gimli_bptt.compiled`), except on several ranks, where the collectives run between its parts.
    """
    def eager() -> tuple[list[Tensor], list[State], Any, Sequence[Optional[Tensor]]]:
        return _eager_reverse_step(problem, entry, B, state_bar, hvp, second_order)

    compiled = problem.compiled
    if compiled is None or problem.reducer is not None:
        return eager()
    scale = problem.schedule_factor(entry.j)
    if not second_order:
        assert entry.G is not None, "the first-order sweep reads G_j from the tape (keep_G)"
        ok, out = compiled.first_order_step(entry.theta, entry.G, entry.state, problem.hyper, scale, B, state_bar, eager)
        if not ok:
            return out  # type: ignore[no-any-return]
        theta_bar, _, state_bar_j, phi_bar = out
        return theta_bar, state_bar_j, phi_bar, [None] * len(problem.loss_leaves)
    with replay_rng(entry.rng, problem.cuda_devices):
        ok, out = compiled.reverse_step(problem, entry.theta, problem.fresh_buffers(entry.buffers), entry.batch,
                                        entry.state, problem.hyper, scale, B, state_bar, entry.j, eager)
    return out  # type: ignore[no-any-return]


def _eager_reverse_step(problem: InnerProblem, entry: TapeEntry, B: list[Tensor], state_bar: list[State], hvp: str,
                        second_order: bool) -> tuple[list[Tensor], list[State], Any, Sequence[Optional[Tensor]]]:
    step = StepSecondOrder(problem, entry, hvp) if second_order else None
    G = step.G if step is not None else entry.G
    assert G is not None, "the first-order sweep reads G_j from the tape (keep_G)"
    with torch.no_grad():  # a hand-written VJP: nothing to record
        theta_bar, G_bar, state_bar, phi_bar = problem.step_vjp(  # [Alg.1 L11]
            entry.theta, G, entry.state, problem.hyper_at(entry.j), B, state_bar)
    if step is None:  # first order: H_j·Ḡ_j and the mixed term are zero
        return theta_bar, state_bar, phi_bar, [None] * len(problem.loss_leaves)
    h_theta, h_loss = step.apply(G_bar)
    return add_second_order(theta_bar, h_theta), state_bar, phi_bar, h_loss  # [Alg.1 L14]


__all__ = ["SweepResult", "reverse_sweep", "validation_gradient"]
