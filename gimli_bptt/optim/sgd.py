# SPDX-License-Identifier: Apache-2.0
"""Differentiable ``torch.optim.SGD``: momentum, dampening, Nesterov, weight decay, maximize."""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import Tensor

from .._typing import Hyper, State
from .adjoints import (add_bar, add_dots, carried_dots, coupled_gradient_jvp, dense_dot, hyper_dot_of, is_active,
                       is_learned, mul_dot, state_dot_of)
from .base import DiffOptimizer
from .declarations import MAXIMIZE, Flag, FlatLayout, StateEntry, lr, unit_interval, weight_decay


def _uses_momentum(hyper: Hyper) -> bool:
    # Note [Learned momentum]: torch.optim.SGD skips the momentum buffer when
    # ``momentum == 0``. A learned momentum always takes the buffer path, so that its
    # derivative exists; at momentum 0 with dampening 0 both paths give the same update.
    momentum = hyper["momentum"]
    return is_learned(momentum) or momentum != 0


def sgd_step(theta: Tensor, G: Tensor, state: State, hyper: Hyper) -> tuple[Tensor, State]:
    """One SGD step on one tensor, out of place, as ``torch.optim.SGD`` makes it.

    .. math::
        g &= \\pm G + \\lambda \\theta \\\\
        b' &= g \\text{ (first step) or } \\mu b + (1 - \\tau) g \\\\
        u &= g + \\mu b' \\text{ (Nesterov) or } b' \\\\
        \\theta' &= \\theta - \\eta u
    """
    lr, wd, mom, damp = hyper["lr"], hyper["weight_decay"], hyper["momentum"], hyper["dampening"]
    g = -G if hyper["maximize"] else G
    if is_active(wd):
        g = g + wd * theta
    new_state: State = dict(state)
    if _uses_momentum(hyper):
        buf = state.get("momentum_buffer")
        buf_next = g.clone() if buf is None else mom * buf + (1 - damp) * g
        new_state["momentum_buffer"] = buf_next
        update = g + mom * buf_next if hyper["nesterov"] else buf_next
    else:
        update = g
    return theta - lr * update, new_state


def sgd_step_vjp(
    theta: Tensor,
    G: Tensor,
    state: State,
    hyper: Hyper,
    theta_next_bar: Tensor,
    state_next_bar: State,
) -> tuple[Tensor, Tensor, State, dict[str, Tensor]]:
    """Vector-Jacobian product of :func:`sgd_step`.

    .. math::
        \\bar u &= -\\eta \\bar\\theta', \\quad \\bar\\eta = -\\langle u, \\bar\\theta' \\rangle \\\\
        \\bar b'_{tot} &= \\bar b' + \\mu \\bar u \\text{ (Nesterov) or } \\bar b' + \\bar u \\\\
        \\bar b &= \\mu \\bar b'_{tot}, \\quad \\bar\\mu = \\langle b, \\bar b'_{tot} \\rangle,
        \\quad \\bar\\tau = -\\langle g, \\bar b'_{tot} \\rangle \\\\
        \\bar g &= (1 - \\tau) \\bar b'_{tot} \\;(+\\, \\bar u \\text{ Nesterov}) \\\\
        \\bar\\theta &= \\bar\\theta' + \\lambda \\bar g, \\quad \\bar\\lambda = \\langle \\theta, \\bar g \\rangle,
        \\quad \\bar G = \\pm \\bar g
    """
    lr, wd, mom, damp = hyper["lr"], hyper["weight_decay"], hyper["momentum"], hyper["dampening"]
    g = -G if hyper["maximize"] else G
    has_wd = is_active(wd)
    if has_wd:
        g = g + wd * theta
    bars: dict[str, Tensor] = {}
    state_bar: State = {}
    u_bar = -lr * theta_next_bar
    if _uses_momentum(hyper):
        buf = state.get("momentum_buffer")
        buf_next = g if buf is None else mom * buf + (1 - damp) * g
        if hyper["nesterov"]:
            update = g + mom * buf_next
            add_bar(bars, hyper, "lr", lambda: -update * theta_next_bar)
            add_bar(bars, hyper, "momentum", lambda: buf_next * u_bar)
            buf_bar = mom * u_bar
            g_bar = u_bar
        else:
            add_bar(bars, hyper, "lr", lambda: -buf_next * theta_next_bar)
            buf_bar = u_bar
            g_bar = None
        carried = state_next_bar.get("momentum_buffer")
        if carried is not None:
            buf_bar = buf_bar + carried
        if buf is None:
            g_from_buf = buf_bar
        else:
            add_bar(bars, hyper, "momentum", lambda: buf * buf_bar)
            add_bar(bars, hyper, "dampening", lambda: -g * buf_bar)
            state_bar["momentum_buffer"] = mom * buf_bar
            g_from_buf = (1 - damp) * buf_bar
        g_bar = g_from_buf if g_bar is None else g_bar + g_from_buf
    else:
        add_bar(bars, hyper, "lr", lambda: -g * theta_next_bar)
        g_bar = u_bar
    theta_bar = theta_next_bar
    if has_wd:
        theta_bar = theta_bar + wd * g_bar
        add_bar(bars, hyper, "weight_decay", lambda: theta * g_bar)
    G_bar = -g_bar if hyper["maximize"] else g_bar
    for name in ("momentum", "dampening"):
        # No path at this step (the first buffer is g itself; no buffer at momentum 0): a zero
        # cotangent, so that every learned hyperparameter has its entry (the contract).
        if is_learned(hyper[name]) and name not in bars:
            bars[name] = torch.zeros_like(hyper[name])
    return theta_bar, G_bar, state_bar, bars


def sgd_step_jvp(
    theta: Tensor,
    G: Tensor,
    state: State,
    hyper: Hyper,
    theta_dot: Tensor,
    G_dot: Tensor,
    state_dot: State,
    hyper_dot: Mapping[str, Tensor],
) -> tuple[Tensor, State]:
    """Jacobian-vector product of :func:`sgd_step` (Note [Forward-mode derivatives of a step]).

    .. math::
        \\dot g &= \\pm \\dot G + \\lambda \\dot\\theta + \\dot\\lambda \\theta \\\\
        \\dot b' &= \\dot g \\text{ (first step) or }
        \\dot\\mu b + \\mu \\dot b + (1 - \\tau) \\dot g - \\dot\\tau g \\\\
        \\dot u &= \\dot g + \\dot\\mu b' + \\mu \\dot b' \\text{ (Nesterov) or } \\dot b' \\\\
        \\dot\\theta' &= \\dot\\theta - \\dot\\eta u - \\eta \\dot u

    Without the momentum buffer (momentum 0, not learned) :math:`u = g`, and a buffer the state
    holds is carried with its tangent. As in the VJP, a learned momentum always takes the buffer
    path (Note [Learned momentum]).
    """
    lr, wd, mom, damp = hyper["lr"], hyper["weight_decay"], hyper["momentum"], hyper["dampening"]
    g = -G if hyper["maximize"] else G
    if is_active(wd):
        g = g + wd * theta
    g_dot = coupled_gradient_jvp(theta, theta_dot, G_dot, hyper, hyper_dot)
    mom_dot = hyper_dot_of(hyper, hyper_dot, "momentum")
    state_next_dot: State = {}
    if _uses_momentum(hyper):
        buf = state.get("momentum_buffer")
        if buf is None:
            buf_next, buf_next_dot = g, g_dot
        else:
            buf_next = mom * buf + (1 - damp) * g
            buf_next_dot = add_dots((1 - damp) * g_dot, mul_dot(state_dot_of(state, state_dot, "momentum_buffer"), mom),
                                    mul_dot(mom_dot, buf), mul_dot(hyper_dot_of(hyper, hyper_dot, "dampening"), -g))
        state_next_dot["momentum_buffer"] = dense_dot(buf_next_dot, buf_next)
        if hyper["nesterov"]:
            update = g + mom * buf_next
            update_dot = add_dots(g_dot, mom * buf_next_dot, mul_dot(mom_dot, buf_next))
        else:
            update, update_dot = buf_next, buf_next_dot
    else:
        update, update_dot = g, g_dot
        carried_dots(state_next_dot, state, state_dot, state)
    theta_next_dot = add_dots(theta_dot, -lr * update_dot, mul_dot(hyper_dot_of(hyper, hyper_dot, "lr"), -update))
    return dense_dot(theta_next_dot, theta), state_next_dot


def _sgd_options(hyper: Hyper, state: State) -> tuple:
    """The flat ops' static options: (nesterov, maximize, momentum buffer in use, weight decay, buffer exists)."""
    use_momentum = _uses_momentum(hyper)
    return (bool(hyper["nesterov"]), bool(hyper["maximize"]), use_momentum, is_active(hyper["weight_decay"]),
            use_momentum and state.get("momentum_buffer") is not None)


def _buffer_if(flag: int) -> Callable[[tuple], tuple[Optional[str], ...]]:
    return lambda options: ("momentum_buffer" if options[flag] else None,)


#: ``sgd_step(θ, G, buf, offsets, hyper, elementwise, nesterov, maximize, use_momentum, has_wd)``
#: and its VJP (csrc/include/gimli/optim_math.h).
SGD_FLAT = FlatLayout(
    op="sgd",
    hyper=("lr", "momentum", "dampening", "weight_decay"),
    options=_sgd_options,
    state_in=_buffer_if(4),
    state_out=_buffer_if(2),
    bar_in=_buffer_if(2),
    bar_out=_buffer_if(4),
    args=lambda options, t: options[:4],
    cpu_loop_below=1 << 19,  # Note [Small steps run per tensor] in gimli_bptt/stepping.py
    cpu_loop_if=lambda hyper: not _uses_momentum(hyper),
)

SGD = DiffOptimizer(
    name="SGD",
    torch_cls=torch.optim.SGD,
    step=sgd_step,
    step_vjp=sgd_step_vjp,
    step_jvp=sgd_step_jvp,
    hyper=(lr(), unit_interval("momentum"), unit_interval("dampening"), weight_decay()),
    flags=(Flag("nesterov", why="it switches between two update rules"), MAXIMIZE),
    state=(StateEntry("momentum_buffer", lazy=True),),
    flat=SGD_FLAT,
    notes="A learned momentum always uses the momentum buffer (see Note [Learned momentum]).",
)

__all__ = ["SGD", "SGD_FLAT", "sgd_step", "sgd_step_jvp", "sgd_step_vjp"]
