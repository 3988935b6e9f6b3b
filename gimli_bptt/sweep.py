# SPDX-License-Identifier: Apache-2.0
"""The reverse sweep of Algorithm 1 (lines 8-15): second-order BPTT by hand.

Algorithm 1 of Grefenstette et al. (2019), generalised to stateful optimizers, with the
line numbers that the tags ``[Alg.1 L<n>]`` in this package refer to::

     8: A_opt <- 0; A_loss <- 0
     9: B_J <- ∇_θ L_val(θ'_J)                      (θ̄_J; σ̄_J <- 0)
    10: for j = J-1 ... 0:
    11:     (θ̄', σ̄_j, Ḡ_j, φ̄_opt) <- step_vjp(θ_j, σ_j, G_j; φ_opt; θ̄_{j+1}, σ̄_{j+1})
    12:     A_opt  += φ̄_opt
    13:     A_loss += (∂G_j/∂φ_loss)ᵀ Ḡ_j            (the mixed second derivative)
    14:     θ̄_j   <- θ̄' + H_j Ḡ_j                   (B_j; H_j the Hessian of ℓ_j)
    15: end
    16: φ <- metaopt(φ, (A_opt, A_loss))            (in updater.py)

At the end θ̄_0 is the hypergradient of the initial parameters θ_0 (MAML). The sweep knows no
optimizer: ``step_vjp`` is the optimizer's, and the second-order terms come from
:mod:`gimli_bptt.hvp`.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor

from .hvp import StepSecondOrder
from .hyper import OptimizerHyperparameters
from .kernels.flat import owned_indices
from .optim.base import State, step_vjp_all
from .problem import InnerProblem
from .tape import TapeEntry


def reverse_sweep(
    problem: InnerProblem,
    hyper: OptimizerHyperparameters,
    entries_reversed: Iterable[TapeEntry],
    theta_bar: list[Tensor],
    loss_bar: list[Optional[Tensor]],
    hvp: str,
) -> tuple[list[Tensor], dict[str, Tensor | list[Tensor]], list[Tensor]]:
    """Runs lines 10-15 over the tape, newest entry first.

    Args:
        problem: The inner problem (losses, optimizer, hyperparameters per parameter).
        hyper: φ_opt, whose :meth:`~OptimizerHyperparameters.accumulate` maps per-tensor
            cotangents to the learned granularity.
        entries_reversed: Tape entries for j = J-1 ... 0.
        theta_bar: B_J = ∇_θ L_val(θ'_J) per inner parameter (line 9).
        loss_bar: ∂L_val/∂φ_loss per loss leaf (its direct term; None for zero).
        hvp: ``"rev"`` or ``"fwd"`` (see :mod:`gimli_bptt.hvp`).

    Returns:
        ``(θ̄_0, A_opt, A_loss)``.
    """
    theta_bar = list(theta_bar)
    state_bar: list[State] = [{} for _ in theta_bar]
    A_opt = hyper.zeros()  # [Alg.1 L8]
    A_loss = [torch.zeros_like(leaf) if b is None else b.detach().clone()
              for leaf, b in zip(problem.loss_leaves, loss_bar)]  # [Alg.1 L8] + direct term of L_val
    for entry in entries_reversed:  # [Alg.1 L10]
        step = StepSecondOrder(problem, entry, hvp)
        with torch.no_grad():  # a hand-written VJP: nothing to record (and no per-tensor requires_grad scan)
            theta_bar, G_bar, state_bar, hyper_bar = step_vjp_all(  # [Alg.1 L11]
                problem.impl, entry.theta, step.G, entry.state, problem.hyper_at(entry.j), theta_bar, state_bar
            )
        scale = problem.lr_scale(entry.j)  # d lr_j / d lr = the schedule's factor
        if scale != 1.0:
            for bars in hyper_bar:
                if "lr" in bars:
                    bars["lr"] = bars["lr"] * scale
        hyper.accumulate_all(A_opt, hyper_bar)  # [Alg.1 L12]
        h_theta, h_loss = step.apply(G_bar)
        for i, h in enumerate(h_loss):  # [Alg.1 L13]
            if h is not None:
                A_loss[i] += h
        # [Alg.1 L14]: in place where θ̄' is a view of the buffer the flat op just allocated for it
        # (Note [Flat outputs] in kernels/flat.py: θ̄_j then stays one flat buffer for step j-1's op)
        own = owned_indices(theta_bar)
        mine = [k for k, h in enumerate(h_theta) if h is not None and k in own]
        if mine:
            torch._foreach_add_([theta_bar[k] for k in mine], [h_theta[k] for k in mine])
        for k, h in enumerate(h_theta):
            if h is not None and k not in own:
                theta_bar[k] = theta_bar[k] + h
    return theta_bar, A_opt, A_loss


__all__ = ["reverse_sweep"]
