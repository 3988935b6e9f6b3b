# SPDX-License-Identifier: Apache-2.0
"""A ``step_vjp`` or ``step_jvp`` derived from a pure ``step`` with ``torch.func`` (exact, slower than by hand)."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from .._typing import Hyper, State

StepFn = Callable[[Tensor, Tensor, State, Hyper], "tuple[Tensor, State]"]
StepVjpFn = Callable[[Tensor, Tensor, State, Hyper, Tensor, State], "tuple[Tensor, Tensor, State, dict[str, Tensor]]"]
StepJvpFn = Callable[[Tensor, Tensor, State, Hyper, Tensor, Tensor, State, Mapping[str, Tensor]], "tuple[Tensor, State]"]


def _differentiable(value: Any) -> bool:
    """A state entry that gets a derivative: a floating-point tensor (not the step count, a
    Python float, nor an entry that is None)."""
    return isinstance(value, Tensor) and value.is_floating_point()


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

        out = torch.func.vjp(f, theta, G, [state[k] for k in state_keys], [hyper[k] for k in hyper_keys])
        (theta_next, state_next), pullback = out[0], out[1]  # (no has_aux: no third item)
        bar = {k: state_next_bar[k] if state_next_bar.get(k) is not None else torch.zeros_like(v)
               for k, v in state_next.items()}
        theta_bar, G_bar, state_bar, hyper_bar = pullback((theta_next_bar, bar))
        return theta_bar, G_bar, dict(zip(state_keys, state_bar)), dict(zip(hyper_keys, hyper_bar))

    return step_vjp


def derive_step_jvp(step: StepFn) -> StepJvpFn:
    """The Jacobian-vector product of ``step`` by forward-mode AD of one step (``torch.func.jvp``),
    the forward twin of :func:`derive_step_vjp`.

    The primals are θ, G, every floating-point tensor entry of the state (not the step count, a
    Python float, nor an entry that is None, such as SGD's momentum buffer before the first step)
    and every tensor-valued hyperparameter; a tangent missing from ``state_dot`` or ``hyper_dot``
    is zero, and floats and flags stay constants. ``state_next_dot`` holds the tangent of every
    floating-point tensor entry of the next state (zero for one that depends on no primal, such
    as ASGD's ``mu``). It runs under ``torch.func.vmap`` over a leading dimension of the
    tangents, as the hand-written JVPs do (Note [Forward-mode derivatives of a step]).

    Note [Derived JVPs under no_grad]: a step may choose its derivative conventions by the grad
    mode (Adam's ``_sqrt`` takes the derivative of :math:`\\sqrt v` at :math:`v = 0` as 0 only
    when grad mode is on, Note [Adam at a zero second moment]), and forward-mode AD runs under
    ``torch.no_grad()`` as well, where the engine calls it. The step is therefore differentiated
    with grad mode on, so that the derived JVP has the same conventions as the derived VJP.
    """

    def step_jvp(theta: Tensor, G: Tensor, state: State, hyper: Hyper, theta_dot: Tensor, G_dot: Tensor,
                 state_dot: State, hyper_dot: Mapping[str, Tensor]) -> tuple[Tensor, State]:
        state_keys = [k for k, v in state.items() if _differentiable(v)]
        hyper_keys = [k for k, v in hyper.items() if isinstance(v, Tensor)]

        def f(theta: Tensor, G: Tensor, state_values: list[Tensor], hyper_values: list[Tensor]) -> Any:
            st = dict(state)
            st.update(zip(state_keys, state_values))
            hy = dict(hyper)
            hy.update(zip(hyper_keys, hyper_values))
            theta_next, state_next = step(theta, G, st, hy)
            return theta_next, {k: v for k, v in state_next.items() if _differentiable(v)}

        def tangent(dots: Mapping[str, Any], key: str, like: Tensor) -> Tensor:
            value = dots.get(key)
            return torch.zeros_like(like) if value is None else value

        with torch.enable_grad():  # Note [Derived JVPs under no_grad]
            theta_next_dot, state_next_dot = torch.func.jvp(
                f,
                (theta, G, [state[k] for k in state_keys], [hyper[k] for k in hyper_keys]),
                (theta_dot, G_dot, [tangent(state_dot, k, state[k]) for k in state_keys],
                 [tangent(hyper_dot, k, hyper[k]) for k in hyper_keys]),
            )[1]  # (primals, tangents): the tangents
        return theta_next_dot, dict(state_next_dot)

    return step_jvp


__all__ = ["derive_step_jvp", "derive_step_vjp"]
