# SPDX-License-Identifier: Apache-2.0
"""One reverse-mode hypergradient, [Alg.1 L4]-[Alg.1 L15]: the memory plan, the tape, the sweep.

The updater hands over the inner problem ([Alg.1 L2]) and the copied state s_0 ([Alg.1 L3]);
this runs the tape under the plan ``memory=`` gives (:mod:`gimli_bptt.reverse.plan`), after the
untaped first J - K steps of a truncated unroll, and the reverse sweep over the K steps of the
window, first order or not (:mod:`gimli_bptt.reverse.sweep`), and reports what the tape did.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from ..errors import NonFiniteError
from ..metaparams import OptimizerHyperparameters
from ..memory import Memory
from ..problem import InnerProblem
from ..progress import Progress
from .meter import TapeStats
from .plan import plan_tape
from .sweep import SweepResult, reverse_sweep
from .tape import InnerState, Tape, TapeResult, advance_untaped


def reverse_hypergradient(problem: InnerProblem, start: InnerState, batches: Sequence[Any], phi_opt: OptimizerHyperparameters,
                          val_loss: Callable[[Any, Any], Tensor], val_batch: Any, *, memory: Memory,
                          budget: tuple[Optional[int], Optional[str]], state_bytes: Callable[[bool], int], hvp: str,
                          first_order: bool, window: int, progress: Optional[bool]) -> tuple[SweepResult, TapeResult, TapeStats]:
    """Lines 4-15 for the J = ``len(batches)`` inner steps, the last ``window`` of them differentiated.

    Args:
        problem, start, batches: The inner problem, s_0 and the J batches.
        phi_opt: φ_opt (accumulates A_opt at its granularity).
        val_loss, val_batch: L_val and its batch ([Alg.1 L9]).
        memory: The memory policy; ``budget`` its budget for this meta step (and where it came
            from); ``state_bytes(keep_G)`` the bytes of one inner state.
        hvp: The second-order mode; ``first_order`` drops the second-order terms.
        window: K (J without truncation).
        progress: The progress bar option (None: on a terminal for J ≥ 100).
    """
    J = len(batches)
    if problem.compiled is not None and problem.compiled.runs_whole(J, memory, problem.reducer is not None):
        whole = _whole_meta_step(problem, start, batches, phi_opt, val_batch, window, first_order, budget)
        if whole is not None:
            return whole
    keep_G = first_order or (hvp == "fwd" and problem.compiled is None)  # the sweep needs G_j but no graph
    size = state_bytes(keep_G) if memory.needs_state_bytes else None
    # compiled steps recompute each step inside the compiled reverse step: no graph is kept
    graphs = not first_order and problem.compiled is None
    plan = plan_tape(memory, window, hvp if graphs else "none", size, budget[0])
    show = progress if progress is not None else (None if J >= 100 else False)
    bar = Progress(J + window + plan.recomputed_steps, "unroll", enabled=show)
    try:
        prefix: list[Tensor] = []
        if window < J:  # truncated: the first J - K steps leave no tape
            start, prefix = advance_untaped(problem, start, batches[: J - window])
            problem.check_losses(torch.stack(prefix))  # on an accelerator: Note [Deferred finiteness check]
        tape = Tape(problem, start, batches[J - window:], plan, keep_G=keep_G, progress=bar, offset=J - window)
        end = tape.forward()  # [Alg.1 L4]-[Alg.1 L7]
        if prefix:
            end = TapeResult(end.theta, end.state, end.buffers, torch.cat([torch.stack(prefix), end.losses]))
        swept = reverse_sweep(problem, phi_opt, end, tape.entries_reversed(), val_loss, val_batch, hvp,
                              second_order=not first_order)  # [Alg.1 L8]-[Alg.1 L15]
    finally:
        bar.close()
    recomputed = tape.forward_steps > window
    stats = TapeStats(schedule="checkpointed" if recomputed else "graphs" if tape.graphs_kept else "full",
                      forward_steps=tape.forward_steps, max_slots_used=tape.max_slots_used, graphs_kept=tape.graphs_kept,
                      graph_bytes=tape.graph_bytes, state_bytes=size, budget=budget[0], budget_source=budget[1],
                      compile_seconds=None if problem.compiled is None else problem.compiled.take_compile_seconds())
    return swept, end, stats


__all__ = ["reverse_hypergradient"]


def _whole_meta_step(problem: InnerProblem, start: InnerState, batches: Sequence[Any], phi_opt: OptimizerHyperparameters,
                     val_batch: Any, window: int, first_order: bool, budget: tuple[Optional[int], Optional[str]]
                     ) -> Optional[tuple[SweepResult, TapeResult, TapeStats]]:
    """Lines 4-15 as one compiled call (Note [Whole meta steps] in :mod:`gimli_bptt.compiled`), or None
    where it cannot be compiled (the caller then runs the steps one by one)."""
    compiled = problem.compiled
    assert compiled is not None
    J = len(batches)
    scales = [problem.lr_scale(j) for j in range(J)]
    out = compiled.whole_meta_step(problem, start.theta, start.buffers, batches, start.state, problem.hyper, scales,
                                   val_batch, window, not first_order)
    if out is None:
        return None
    L, task_L, B, A_per_tensor, A_learned, losses, theta_J, state_J, buffers_J = out
    problem.check_losses(losses, every_device=True)
    if problem.check_finite and not math.isfinite(L.item()):
        raise NonFiniteError(f"val_loss is {L.item()} after {J} inner steps")
    A_opt = phi_opt.zeros()
    phi_opt.accumulate_all(A_opt, A_per_tensor)  # [Alg.1 L12], at φ_opt's granularity
    swept = SweepResult(L.detach(), [b.detach() for b in B], A_opt, [a.detach() for a in A_learned],
                        None if task_L is None else task_L.detach())
    stats = TapeStats(schedule="whole", forward_steps=J, max_slots_used=window, graphs_kept=window, graph_bytes=None,
                      state_bytes=None, budget=budget[0], budget_source=budget[1],
                      compile_seconds=compiled.take_compile_seconds())
    return swept, TapeResult(theta_J, state_J, buffers_J, losses), stats
