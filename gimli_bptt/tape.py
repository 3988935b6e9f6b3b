# SPDX-License-Identifier: Apache-2.0
"""The forward tape: Algorithm 1, lines 3-7, recording what the reverse sweep needs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .optim.base import State, step_all
from .problem import InnerProblem, RngState, capture_rng, same_rng


@dataclass
class TapeEntry:
    """The inner state *before* step j, and what is needed to replay that step.

    Attributes:
        j: The inner step.
        theta: θ'_j, the inner parameters (immutable: steps are out of place).
        state: σ_j, the optimizer state of each inner parameter.
        buffers: The module's buffers before step j (BatchNorm statistics), or ``{}``.
        batch: A reference to the batch of step j (never copied).
        rng: The generator states before ℓ_j, or None if ℓ_j drew no random numbers.
        G: G_j when kept on the tape (forward-over-reverse HVP), else None.
    """

    j: int
    theta: list[Tensor]
    state: list[State]
    buffers: dict[str, Tensor]
    batch: Any
    rng: Optional[RngState]
    G: Optional[list[Optional[Tensor]]]


@dataclass
class TapeResult:
    """The recorded entries, the final inner state and the inner losses."""

    entries: list[TapeEntry]
    theta: list[Tensor]
    state: list[State]
    buffers: dict[str, Tensor]
    losses: Tensor


def inner_step(problem: InnerProblem, theta: list[Tensor], state: list[State], buffers: dict[str, Tensor],
               batch: Any, j: int) -> tuple[Tensor, list[Optional[Tensor]], list[Tensor], list[State],
                                            dict[str, Tensor], Optional[RngState]]:
    """Lines 5-6 once: returns ``(ℓ_j, G_j, θ_{j+1}, σ_{j+1}, buffers_{j+1}, rng_j)``."""
    rng_before = capture_rng(problem.cuda_devices)
    buffers_next = problem.fresh_buffers(buffers)
    loss, G = problem.gradient(theta, buffers_next, batch, j)
    rng = None if same_rng(rng_before, capture_rng(problem.cuda_devices)) else rng_before
    with torch.no_grad():
        theta_next, state_next = step_all(problem.impl, theta, G, state, problem.hyper)
    return loss, G, theta_next, state_next, buffers_next, rng


def record_tape(problem: InnerProblem, theta0: list[Tensor], state0: list[State], buffers0: dict[str, Tensor],
                batches: Sequence[Any], keep_G: bool) -> TapeResult:
    """Runs the J inner steps (lines 4-7) and keeps every θ'_j, σ_j and buffers_j.

    No autograd graph outlives a step: each G_j is computed with a fresh graph that is freed
    at once. ``keep_G`` keeps G_j too (the forward-over-reverse HVP needs it before it can
    recompute the step); the reverse-over-reverse HVP recomputes it instead.
    """
    entries: list[TapeEntry] = []
    losses: list[Tensor] = []
    theta, state, buffers = theta0, state0, buffers0
    for j, batch in enumerate(batches):
        loss, G, theta_next, state_next, buffers_next, rng = inner_step(problem, theta, state, buffers, batch, j)
        entries.append(TapeEntry(j, theta, state, buffers, batch, rng, G if keep_G else None))
        losses.append(loss)
        theta, state, buffers = theta_next, state_next, buffers_next
    return TapeResult(entries, theta, state, buffers, torch.stack(losses))


__all__ = ["TapeEntry", "TapeResult", "inner_step", "record_tape"]
