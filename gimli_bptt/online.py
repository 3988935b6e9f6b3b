# SPDX-License-Identifier: Apache-2.0
"""Forward and online mode of :class:`~gimli_bptt.updater.GimliUpdater` (``mode="forward"``).

The math (directions, tangents, the forward unroll) is :mod:`gimli_bptt.forward`; this module is what
the updater does with it, readable apart from reverse mode:

- a meta step in forward mode (:meth:`OnlineMode._compute_forward`): the tangents dθ_j/dφ and
  dσ_j/dφ ride along the J inner steps, no tape, and line 9's B_J is dotted with dθ_J/dφ
  ([Alg.1 L4]-[Alg.1 L9] without [Alg.1 L10]-[Alg.1 L15]);
- online hypergradients (Franceschi et al., 2017): ``train_step`` carries the same tangents
  through real training (:meth:`OnlineMode._carry_tangents`), :meth:`OnlineMode.online_hypergradient`
  gives dL_val/dφ for the trajectory since :meth:`OnlineMode.reset_tangents`, and
  :meth:`OnlineMode.online_step` applies it ([Alg.1 L16]) and forgets the trajectory, at once or
  gradually.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ._typing import State
from .errors import NonFiniteError
from .forward import Directions, Tangents, as_hypergrads, directional_hypergradients, directions, forward_unroll
from .reverse.meter import TapeStats
from .metaparams import Hypergrad, MetaParameters, OptimizerHyperparameters
from .options import Options
from .problem import InnerProblem, LossFn
from .progress import Progress
from .result import MetaStepResult
from .reverse.sweep import validation_gradient
from .reverse.tape import TapeResult


class OnlineMode:
    """The forward/online half of :class:`~gimli_bptt.updater.GimliUpdater`: its public methods
    :meth:`reset_tangents`, :meth:`online_hypergradient` and :meth:`online_step`, the forward-mode
    meta step and the tangents ``train_step`` carries. A mixin: the updater holds the state below."""

    # What the updater holds and this half reads: options, φ_opt, the validation loss, counters,
    # a reference parameter (device and dtype), the carried tangents and losses since the reset.
    options: Options
    hyper: OptimizerHyperparameters
    val_loss: LossFn
    meta_steps: int
    last_tape_stats: Optional[TapeStats]
    _ref: Tensor
    _online: Optional[Tangents]
    _online_losses: list[Tensor]
    # [Alg.1 L2], [Alg.1 L3] and [Alg.1 L16], which both modes share (the updater's methods)
    _problem: Callable[..., InnerProblem]
    _initial_state: Callable[..., tuple[list[Tensor], list[State], dict[str, Tensor]]]
    _apply: Callable[[MetaStepResult, Optional[TapeResult]], None]

    def _forward_result(self, problem: InnerProblem, end: TapeResult, tangents: Tangents, dirs: Directions,
                        val_batch: Any) -> MetaStepResult:
        """L_val(θ_J) and B_J ([Alg.1 L9]) dotted with the tangents dθ_J/dφ: the hypergradients by name."""
        L, _, B, _ = validation_gradient(problem, end, self.val_loss, val_batch, len(end.losses))  # [Alg.1 L9]
        hypergrads: dict[str, Hypergrad] = dict(as_hypergrads(directional_hypergradients(B, tangents), dirs, self.hyper))
        nonfinite = MetaParameters.nonfinite(hypergrads) if self.options.check_finite else []
        return MetaStepResult(L, hypergrads, end.losses, nonfinite=nonfinite)

    def _compute_forward(self, batches: list[Any], val_batch: Any) -> tuple[MetaStepResult, TapeResult]:
        """One meta step's hypergradient in forward mode ([Alg.1 L2]-[Alg.1 L9]; Note [Forward-mode hypergradients])."""
        unroll = self.options.unroll
        problem = self._problem()  # [Alg.1 L2]
        theta, state, buffers = self._initial_state()  # [Alg.1 L3]
        dirs = directions(self.hyper, self._ref)
        show = self.options.progress if self.options.progress is not None else (None if unroll >= 100 else False)
        with Progress(unroll, "forward mode", enabled=show) as bar:
            theta, state, buffers, tangents, losses = forward_unroll(  # [Alg.1 L4]-[Alg.1 L7] with tangents
                problem, theta, state, buffers, batches, dirs, not self.options.first_order, tick=bar.update)
        end = TapeResult(theta, state, buffers, losses)
        self.last_tape_stats = TapeStats(schedule="forward", forward_steps=unroll, max_slots_used=1,
                                         graphs_kept=0, graph_bytes=None, state_bytes=None, budget=None)
        return self._forward_result(problem, end, tangents, dirs, val_batch), end

    def _carry_tangents(self, problem: InnerProblem, theta: list[Tensor], state: list[State],
                        buffers: dict[str, Tensor], batch: Any
                        ) -> tuple[list[Tensor], list[State], Tensor, list[Optional[Tensor]]]:
        """``train_step`` in forward mode: one real training step that carries the tangents along.

        Updates the buffers in place (the running statistics move as in training) and returns
        θ', σ', the loss and, per parameter, None where the step left it untouched (not in the loss).
        """
        dirs = directions(self.hyper, self._ref)
        theta_next, state_next, stepped, self._online, losses = forward_unroll(
            problem, theta, state, buffers, [batch], dirs, not self.options.first_order, self._online)
        with torch.no_grad():
            for name, b in stepped.items():
                buffers[name].copy_(b)
        self._online_losses.append(losses[0])
        touched: list[Optional[Tensor]] = [None if tn is t else tn for tn, t in zip(theta_next, theta)]
        return theta_next, state_next, losses[0], touched

    def reset_tangents(self) -> None:
        """Forgets the trajectory that :meth:`online_hypergradient` differentiates (mode="forward")."""
        self._online = None
        self._online_losses = []

    def online_hypergradient(self, val_batch: Any) -> MetaStepResult:
        """dL_val/dφ at the model's current parameters, through every ``train_step`` since the
        last :meth:`reset_tangents` (mode="forward"; Note [Forward-mode hypergradients]).

        Equals reverse mode over the same trajectory: ``hypergradient(batches, val_batch)`` from
        the model and optimizer state of the reset, with the batches ``train_step`` took.
        Changes nothing.
        """
        if self.options.mode != "forward":
            raise RuntimeError("online_hypergradient needs GimliUpdater(..., mode='forward')")
        problem = self._problem()
        theta, state, buffers = self._initial_state()
        dirs = directions(self.hyper, self._ref)
        tangents = self._online if self._online is not None else Tangents.zeros(theta, state, dirs.m)
        losses = torch.stack(self._online_losses) if self._online_losses else torch.zeros(0, dtype=self._ref.dtype)
        return self._forward_result(problem, TapeResult(theta, state, buffers, losses), tangents, dirs, val_batch)

    def online_step(self, val_batch: Any, decay: float = 0.0) -> MetaStepResult:
        """One meta update from :meth:`online_hypergradient` ([Alg.1 L16], a transaction), then the
        tangents are multiplied by ``decay`` (0: reset, the default; between 0 and 1: Franceschi
        et al.'s real-time hyperparameter optimisation, which forgets the trajectory gradually)."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        result = self.online_hypergradient(val_batch)
        if result.nonfinite:
            raise NonFiniteError(f"non-finite online hypergradient for {', '.join(result.nonfinite)}; nothing was updated")
        self._apply(result, None)
        self.meta_steps += 1
        if decay == 0.0 or self._online is None:
            self.reset_tangents()
        else:
            self._online = self._online.scaled(decay)
        return result


__all__ = ["OnlineMode"]
