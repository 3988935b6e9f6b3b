# SPDX-License-Identifier: Apache-2.0
"""A ``step_vjp`` derived from a pure ``step`` with ``torch.func.vjp`` (exact, slower than by hand)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Hyper, State, StepFn, StepVjpFn


def derive_step_vjp(step: StepFn) -> StepVjpFn:
    """The vector-Jacobian product of ``step`` by reverse-mode AD of one step.

    Differentiates with respect to θ, G, every tensor entry of the state and every tensor-valued
    hyperparameter (the learned ones); floats and flags stay constants. ``step`` must be written
    with differentiable, out-of-place torch operations (as any function ``torch.func`` accepts).
    """

    def step_vjp(theta: Tensor, G: Tensor, state: State, hyper: Hyper, theta_next_bar: Tensor,
                 state_next_bar: State) -> tuple[Tensor, Tensor, State, dict[str, Tensor]]:
        state_keys = [k for k, v in state.items() if isinstance(v, Tensor) and v.is_floating_point()]
        hyper_keys = [k for k, v in hyper.items() if isinstance(v, Tensor)]

        def f(theta: Tensor, G: Tensor, state_values: list[Tensor], hyper_values: list[Tensor]) -> Any:
            st = dict(state)
            st.update(zip(state_keys, state_values))
            hy = dict(hyper)
            hy.update(zip(hyper_keys, hyper_values))
            theta_next, state_next = step(theta, G, st, hy)
            return theta_next, {k: v for k, v in state_next.items() if isinstance(v, Tensor) and v.is_floating_point()}

        (theta_next, state_next), pullback = torch.func.vjp(
            f, theta, G, [state[k] for k in state_keys], [hyper[k] for k in hyper_keys]
        )
        bar = {k: state_next_bar[k] if state_next_bar.get(k) is not None else torch.zeros_like(v)
               for k, v in state_next.items()}
        theta_bar, G_bar, state_bar, hyper_bar = pullback((theta_next_bar, bar))
        return theta_bar, G_bar, dict(zip(state_keys, state_bar)), dict(zip(hyper_keys, hyper_bar))

    return step_vjp


__all__ = ["derive_step_vjp"]
