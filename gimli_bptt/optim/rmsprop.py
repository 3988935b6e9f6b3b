# SPDX-License-Identifier: Apache-2.0
"""Differentiable ``torch.optim.RMSprop``: centered, momentum, weight decay, maximize."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from .adam import _sqrt, _sqrt_jvp
from .._typing import Hyper, State
from .adjoints import (add_bar, add_dots, coupled_gradient, coupled_gradient_jvp, coupled_gradient_vjp, dense_dot,
                        hyper_dot_of, is_learned, mul_dot, next_count, state_dot_of)
from .base import DiffOptimizer
from .declarations import MAXIMIZE, Flag, StateEntry, eps, lr, unit_interval, weight_decay


def _uses_momentum(hyper: Hyper) -> bool:
    # Note [RMSprop learned momentum]: torch.optim.RMSprop keeps no momentum buffer when
    # ``momentum == 0`` (it tests ``momentum > 0``). A learned momentum always takes the
    # buffer path, so that its derivative exists; at momentum 0 both paths give the same
    # update (the buffer is then g / avg). As in Note [Learned momentum] (SGD).
    momentum = hyper["momentum"]
    return is_learned(momentum) or momentum > 0


def rmsprop_step(theta: Tensor, G: Tensor, state: State, hyper: Hyper) -> tuple[Tensor, State]:
    """One RMSprop step on one tensor, out of place, as ``torch.optim.RMSprop`` makes it.

    .. math::
        g &= \\pm G + \\lambda \\theta \\\\
        v' &= \\alpha v + (1 - \\alpha) g^2, \\quad
        \\bar g' = \\alpha \\bar g + (1 - \\alpha) g \\text{ (centered)} \\\\
        a &= \\sqrt{v' - \\bar g'^2} + \\epsilon \\text{ (centered) or } \\sqrt{v'} + \\epsilon \\\\
        b' &= \\mu b + g / a \\text{ (momentum)}, \\quad
        \\theta' = \\theta - \\eta b' \\text{, or } \\theta - \\eta \\, g / a \\text{ without momentum}
    """
    lr, alpha, eps, mom = hyper["lr"], hyper["alpha"], hyper["eps"], hyper["momentum"]
    g = coupled_gradient(theta, G, hyper)
    t = next_count(state)
    square_avg = state["square_avg"] * alpha + (1 - alpha) * (g * g)
    new_state: State = {"step": t, "square_avg": square_avg}
    if hyper["centered"]:
        grad_avg = torch.lerp(state["grad_avg"], g, 1 - alpha)
        new_state["grad_avg"] = grad_avg
        avg = _sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        avg = _sqrt(square_avg) + eps
    if _uses_momentum(hyper):
        buf = state.get("momentum_buffer")
        buf_next = g / avg if buf is None else buf * mom + g / avg
        new_state["momentum_buffer"] = buf_next
        return theta - lr * buf_next, new_state
    for key in ("momentum_buffer",):  # carried unchanged when not in use (torch keeps it too)
        if state.get(key) is not None:
            new_state[key] = state[key]
    return theta - lr * (g / avg), new_state


def rmsprop_step_vjp(
    theta: Tensor,
    G: Tensor,
    state: State,
    hyper: Hyper,
    theta_next_bar: Tensor,
    state_next_bar: State,
) -> tuple[Tensor, Tensor, State, dict[str, Tensor]]:
    """Vector-Jacobian product of :func:`rmsprop_step`.

    With :math:`w = v' - \\bar g'^2` (centered) or :math:`v'`, :math:`r = \\sqrt w`,
    :math:`a = r + \\epsilon`, :math:`q = g / a`:

    .. math::
        \\bar q &= \\bar b'_{tot} = \\bar b' - \\eta \\bar\\theta', \\quad \\bar\\eta = -\\langle b', \\bar\\theta'\\rangle,
        \\quad \\bar b = \\mu \\bar b'_{tot}, \\quad \\bar\\mu = \\langle b, \\bar b'_{tot}\\rangle
        \\text{ (momentum; else } \\bar q = -\\eta\\bar\\theta') \\\\
        \\bar a &= -\\bar q \\, g / a^2 \\;(= \\bar\\epsilon), \\quad
        \\bar w = \\bar a / (2 r) \\text{ (0 where } r = 0) \\\\
        \\bar v'_{tot} &= \\bar v' + \\bar w, \\quad
        \\bar{\\bar g}'_{tot} = \\bar{\\bar g}' - 2 \\bar g' \\bar w \\text{ (centered)} \\\\
        \\bar v &= \\alpha \\bar v'_{tot}, \\quad \\bar{\\bar g} = \\alpha \\bar{\\bar g}'_{tot}, \\quad
        \\bar\\alpha = \\langle v - g^2, \\bar v'_{tot}\\rangle + \\langle \\bar g - g, \\bar{\\bar g}'_{tot}\\rangle \\\\
        \\bar g &= \\bar q / a + 2 (1 - \\alpha) g \\bar v'_{tot} + (1 - \\alpha) \\bar{\\bar g}'_{tot}

    then weight decay and ``maximize`` as in SGD.

    Note [RMSprop at a zero second moment]: :math:`w = 0` where every gradient so far is 0
    (then :math:`g = 0`, so :math:`\\bar a = 0`), or, centered, where the gradients seen so far
    have no spread (e.g. ``alpha = 0``, or all equal since a zero state). The path through
    :math:`\\sqrt w` is then :math:`\\bar a \\cdot \\infty`; we take it as 0, the limit where
    :math:`\\bar a = 0` (as in Note [Adam at a zero second moment]), and :func:`rmsprop_step`
    gives autograd the same through ``_sqrt``. Where :math:`\\bar a \\neq 0` at
    :math:`w = 0` (centered, zero spread, nonzero gradient) the true derivative is infinite
    and 0 is only a convention: keep ``eps`` and ``alpha`` away from such points.
    """
    lr, alpha, eps, mom = hyper["lr"], hyper["alpha"], hyper["eps"], hyper["momentum"]
    g = coupled_gradient(theta, G, hyper)
    centered = hyper["centered"]
    sq = state["square_avg"]
    sq_next = sq * alpha + (1 - alpha) * (g * g)
    if centered:
        ga = state["grad_avg"]
        ga_next = torch.lerp(ga, g, 1 - alpha)
        w = sq_next - ga_next * ga_next
    else:
        w = sq_next
    r = w.sqrt()
    avg = r + eps
    q = g / avg
    tb = theta_next_bar
    bars: dict[str, Tensor] = {}
    state_bar: State = {}

    if _uses_momentum(hyper):
        buf = state.get("momentum_buffer")
        buf_next = q if buf is None else buf * mom + q
        add_bar(bars, hyper, "lr", lambda: -buf_next * tb)
        buf_bar = -lr * tb
        carried = state_next_bar.get("momentum_buffer")
        if carried is not None:
            buf_bar = buf_bar + carried
        if buf is None:
            if is_learned(mom):  # no path at this step: a zero cotangent (the contract)
                bars["momentum"] = torch.zeros_like(mom)
        else:
            add_bar(bars, hyper, "momentum", lambda: buf * buf_bar)
            state_bar["momentum_buffer"] = mom * buf_bar
        q_bar = buf_bar
    else:
        add_bar(bars, hyper, "lr", lambda: -q * tb)
        q_bar = -lr * tb
        carried = state_next_bar.get("momentum_buffer")
        if carried is not None and state.get("momentum_buffer") is not None:
            state_bar["momentum_buffer"] = carried
    avg_bar = -q_bar * q / avg
    add_bar(bars, hyper, "eps", avg_bar)
    positive = r > 0
    r_safe = torch.where(positive, r, torch.ones_like(r))
    w_bar = torch.where(positive, avg_bar / (2 * r_safe), torch.zeros_like(r))

    sq_bar = w_bar
    carried = state_next_bar.get("square_avg")
    if carried is not None:
        sq_bar = sq_bar + carried
    g_bar = q_bar / avg + 2 * (1 - alpha) * g * sq_bar
    state_bar["square_avg"] = alpha * sq_bar
    alpha_terms = [lambda: (sq - g * g) * sq_bar]
    if centered:
        ga_bar = -2 * ga_next * w_bar
        carried = state_next_bar.get("grad_avg")
        if carried is not None:
            ga_bar = ga_bar + carried
        g_bar = g_bar + (1 - alpha) * ga_bar
        state_bar["grad_avg"] = alpha * ga_bar
        alpha_terms.append(lambda: (ga - g) * ga_bar)
    add_bar(bars, hyper, "alpha", lambda: sum(f() for f in alpha_terms))

    if is_learned(mom) and "momentum" not in bars:
        bars["momentum"] = torch.zeros_like(mom)
    theta_bar, G_bar = coupled_gradient_vjp(theta, g_bar, tb, hyper, bars)
    return theta_bar, G_bar, state_bar, bars


def rmsprop_step_jvp(
    theta: Tensor,
    G: Tensor,
    state: State,
    hyper: Hyper,
    theta_dot: Tensor,
    G_dot: Tensor,
    state_dot: State,
    hyper_dot: Mapping[str, Tensor],
) -> tuple[Tensor, State]:
    """Jacobian-vector product of :func:`rmsprop_step` (Note [Forward-mode derivatives of a step]).

    With :math:`w = v' - \\bar g'^2` (centered) or :math:`v'`, :math:`r = \\sqrt w`,
    :math:`a = r + \\epsilon`, :math:`q = g / a`:

    .. math::
        \\dot g &= \\pm \\dot G + \\lambda \\dot\\theta + \\dot\\lambda \\theta, \\quad
        \\dot v' = \\alpha \\dot v + \\dot\\alpha (v - g^2) + 2 (1 - \\alpha) g \\dot g \\\\
        \\dot{\\bar g}' &= \\alpha \\dot{\\bar g} + \\dot\\alpha (\\bar g - g) + (1 - \\alpha) \\dot g, \\quad
        \\dot w = \\dot v' - 2 \\bar g' \\dot{\\bar g}' \\text{ (centered)} \\\\
        \\dot r &= \\dot w / (2 r) \\text{ (0 where } r = 0), \\quad
        \\dot q = (\\dot g - q (\\dot r + \\dot\\epsilon)) / a \\\\
        \\dot b' &= \\dot\\mu b + \\mu \\dot b + \\dot q \\text{ (momentum; } \\dot q
        \\text{ at the first)}, \\quad \\dot\\theta' = \\dot\\theta - \\dot\\eta b' - \\eta \\dot b'

    and without momentum :math:`\\dot\\theta' = \\dot\\theta - \\dot\\eta q - \\eta \\dot q` (a buffer the
    state holds is carried with its tangent). The path through :math:`\\sqrt w` is 0 where
    :math:`w = 0`, as in the VJP (Note [RMSprop at a zero second moment]).
    """
    lr, alpha, eps, mom = hyper["lr"], hyper["alpha"], hyper["eps"], hyper["momentum"]
    g = coupled_gradient(theta, G, hyper)
    g_dot = coupled_gradient_jvp(theta, theta_dot, G_dot, hyper, hyper_dot)
    alpha_dot = hyper_dot_of(hyper, hyper_dot, "alpha")
    sq = state["square_avg"]
    sq_next = sq * alpha + (1 - alpha) * (g * g)
    sq_next_dot = add_dots(2 * (1 - alpha) * g * g_dot, mul_dot(state_dot_of(state, state_dot, "square_avg"), alpha),
                           mul_dot(alpha_dot, lambda: sq - g * g))
    assert sq_next_dot is not None
    state_next_dot: State = {"square_avg": dense_dot(sq_next_dot, sq_next)}
    if hyper["centered"]:
        ga = state["grad_avg"]
        ga_next = torch.lerp(ga, g, 1 - alpha)
        ga_next_dot = add_dots((1 - alpha) * g_dot, mul_dot(state_dot_of(state, state_dot, "grad_avg"), alpha),
                               mul_dot(alpha_dot, lambda: ga - g))
        assert ga_next_dot is not None
        state_next_dot["grad_avg"] = dense_dot(ga_next_dot, ga_next)
        w = sq_next - ga_next * ga_next
        w_dot = sq_next_dot - 2 * ga_next * ga_next_dot
    else:
        w, w_dot = sq_next, sq_next_dot
    r = w.sqrt()
    avg = r + eps
    q = g / avg
    avg_dot = add_dots(_sqrt_jvp(r, w_dot), hyper_dot_of(hyper, hyper_dot, "eps"))
    q_dot = (g_dot - q * avg_dot) / avg
    if _uses_momentum(hyper):
        buf = state.get("momentum_buffer")
        if buf is None:
            buf_next, buf_next_dot = q, q_dot
        else:
            buf_next = buf * mom + q
            buf_next_dot = add_dots(q_dot, mul_dot(state_dot_of(state, state_dot, "momentum_buffer"), mom),
                                    mul_dot(hyper_dot_of(hyper, hyper_dot, "momentum"), buf))
        state_next_dot["momentum_buffer"] = dense_dot(buf_next_dot, buf_next)
        update, update_dot = buf_next, buf_next_dot
    else:
        if state.get("momentum_buffer") is not None:  # carried unchanged, as the step carries it
            state_next_dot["momentum_buffer"] = dense_dot(state_dot_of(state, state_dot, "momentum_buffer"),
                                                          state["momentum_buffer"])
        update, update_dot = q, q_dot
    theta_next_dot = add_dots(theta_dot, -lr * update_dot, mul_dot(hyper_dot_of(hyper, hyper_dot, "lr"), -update))
    return dense_dot(theta_next_dot, theta), state_next_dot


RMSPROP = DiffOptimizer(
    name="RMSprop",
    torch_cls=torch.optim.RMSprop,
    step=rmsprop_step,
    step_vjp=rmsprop_step_vjp,
    step_jvp=rmsprop_step_jvp,
    hyper=(lr(), unit_interval("alpha", doc="decay of the squared-gradient average"), eps(), weight_decay(),
           unit_interval("momentum", default=0.0)),
    flags=(Flag("centered", why="it switches between two update rules"), MAXIMIZE),
    state=(StateEntry("square_avg"), StateEntry("momentum_buffer", when=_uses_momentum),
           StateEntry("grad_avg", when=lambda hyper: bool(hyper["centered"]))),
    counts_steps=True,
    tensor_step_count=True,
    notes="A learned momentum always uses the momentum buffer; finite derivative at a zero second moment.",
)

__all__ = ["RMSPROP", "rmsprop_step", "rmsprop_step_jvp", "rmsprop_step_vjp"]
