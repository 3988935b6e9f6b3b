# SPDX-License-Identifier: Apache-2.0
"""Differentiable ``torch.optim.Adagrad``: learning-rate decay, weight decay, maximize."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from .adam import _sqrt, _sqrt_jvp
from .._typing import Hyper, State
from ..metaparams.declaration import Hyperparameter
from .adjoints import (add_bar, add_dots, coupled_gradient, coupled_gradient_jvp, coupled_gradient_vjp, dense_dot,
                        hyper_dot_of, mul_dot, next_count, state_dot_of)
from .base import DiffOptimizer
from .declarations import MAXIMIZE, Flag, StateEntry, eps, lr, weight_decay


def adagrad_step(theta: Tensor, G: Tensor, state: State, hyper: Hyper) -> tuple[Tensor, State]:
    """One Adagrad step on one tensor, out of place, as ``torch.optim.Adagrad`` makes it.

    .. math::
        g &= \\pm G + \\lambda \\theta \\\\
        \\tilde\\eta &= \\eta / (1 + (t - 1) \\kappa) \\\\
        s' &= s + g^2 \\\\
        \\theta' &= \\theta - \\tilde\\eta \\, g / (\\sqrt{s'} + \\epsilon)

    with :math:`\\kappa` the ``lr_decay``. ``initial_accumulator_value`` is not a
    hyperparameter of the step: it only fills the state :math:`s_0` (Note [Adagrad's initial
    accumulator]).
    """
    lr, lr_decay, eps = hyper["lr"], hyper["lr_decay"], hyper["eps"]
    g = coupled_gradient(theta, G, hyper)
    t = next_count(state)
    clr = lr / (1 + (t - 1) * lr_decay)
    sum_next = state["sum"] + g * g
    std = _sqrt(sum_next) + eps
    return theta - clr * (g / std), {"step": t, "sum": sum_next}


def adagrad_step_vjp(
    theta: Tensor,
    G: Tensor,
    state: State,
    hyper: Hyper,
    theta_next_bar: Tensor,
    state_next_bar: State,
) -> tuple[Tensor, Tensor, State, dict[str, Tensor]]:
    """Vector-Jacobian product of :func:`adagrad_step`.

    With :math:`c = 1 + (t - 1)\\kappa`, :math:`\\tilde\\eta = \\eta / c`, :math:`r = \\sqrt{s'}`,
    :math:`d = r + \\epsilon`:

    .. math::
        \\bar{\\tilde\\eta} &= -\\langle g / d, \\bar\\theta' \\rangle, \\quad
        \\bar\\eta = \\bar{\\tilde\\eta} / c, \\quad
        \\bar\\kappa = -\\bar{\\tilde\\eta} \\, \\eta (t - 1) / c^2 \\\\
        \\bar d &= \\tilde\\eta \\bar\\theta' g / d^2 \\;(= \\bar\\epsilon), \\quad
        \\bar s'_{tot} = \\bar s' + \\bar d / (2 r) \\text{ (0 where } r = 0) \\\\
        \\bar s &= \\bar s'_{tot}, \\quad
        \\bar g = -\\tilde\\eta \\bar\\theta' / d + 2 g \\bar s'_{tot} \\\\
        \\bar\\theta &= \\bar\\theta' + \\lambda \\bar g, \\quad \\bar\\lambda = \\langle\\theta, \\bar g\\rangle,
        \\quad \\bar G = \\pm \\bar g

    Note [Adagrad at a zero accumulator]: with ``initial_accumulator_value = 0`` the
    accumulator :math:`s'` is 0 where every gradient so far is 0; then :math:`g = 0` and
    :math:`\\bar d = 0`, and the path through :math:`\\sqrt{s'}` is :math:`0 \\cdot \\infty`
    in plain autograd. Its limit is 0 (as in Note [Adam at a zero second moment]), which is
    what we use, and what :func:`adagrad_step` gives autograd through ``_sqrt``.

    Note [Adagrad's initial accumulator]: ``initial_accumulator_value`` only sets
    :math:`s_0` (torch fills ``state["sum"]`` with it when the optimizer is built, from the
    constructor's value: a value given in a param group is ignored by torch). It is read from
    the param group for a parameter that has no state yet and is not learnable; its
    derivative, were it wanted, is the sum of the elements of the cotangent of :math:`s_0`.
    """
    lr, lr_decay, eps = hyper["lr"], hyper["lr_decay"], hyper["eps"]
    g = coupled_gradient(theta, G, hyper)
    t = next_count(state)
    c = 1 + (t - 1) * lr_decay
    clr = lr / c
    sum_next = state["sum"] + g * g
    r = sum_next.sqrt()
    std = r + eps
    q = g / std
    tb = theta_next_bar
    bars: dict[str, Tensor] = {}

    clr_bar = -q * tb
    add_bar(bars, hyper, "lr", lambda: clr_bar / c)
    add_bar(bars, hyper, "lr_decay", lambda: -clr_bar * lr * (t - 1) / (c * c))
    q_bar = -clr * tb
    std_bar = -q_bar * q / std
    add_bar(bars, hyper, "eps", std_bar)
    positive = r > 0
    r_safe = torch.where(positive, r, torch.ones_like(r))
    sum_bar = torch.where(positive, std_bar / (2 * r_safe), torch.zeros_like(r))
    carried = state_next_bar.get("sum")
    if carried is not None:
        sum_bar = sum_bar + carried
    g_bar = q_bar / std + 2 * g * sum_bar

    theta_bar, G_bar = coupled_gradient_vjp(theta, g_bar, tb, hyper, bars)
    return theta_bar, G_bar, {"sum": sum_bar}, bars


def adagrad_step_jvp(
    theta: Tensor,
    G: Tensor,
    state: State,
    hyper: Hyper,
    theta_dot: Tensor,
    G_dot: Tensor,
    state_dot: State,
    hyper_dot: Mapping[str, Tensor],
) -> tuple[Tensor, State]:
    """Jacobian-vector product of :func:`adagrad_step` (Note [Forward-mode derivatives of a step]).

    With :math:`c = 1 + (t - 1)\\kappa`, :math:`\\tilde\\eta = \\eta / c`, :math:`r = \\sqrt{s'}`,
    :math:`d = r + \\epsilon`, :math:`q = g / d`:

    .. math::
        \\dot g &= \\pm \\dot G + \\lambda \\dot\\theta + \\dot\\lambda \\theta, \\quad
        \\dot s' = \\dot s + 2 g \\dot g, \\quad
        \\dot r = \\dot s' / (2 r) \\text{ (0 where } r = 0) \\\\
        \\dot{\\tilde\\eta} &= \\dot\\eta / c - \\eta (t - 1) \\dot\\kappa / c^2, \\quad
        \\dot q = (\\dot g - q (\\dot r + \\dot\\epsilon)) / d \\\\
        \\dot\\theta' &= \\dot\\theta - \\dot{\\tilde\\eta}\\, q - \\tilde\\eta \\dot q

    The path through :math:`\\sqrt{s'}` is 0 at a zero accumulator, as in the VJP (Note [Adagrad
    at a zero accumulator]).
    """
    lr, lr_decay, eps = hyper["lr"], hyper["lr_decay"], hyper["eps"]
    g = coupled_gradient(theta, G, hyper)
    g_dot = coupled_gradient_jvp(theta, theta_dot, G_dot, hyper, hyper_dot)
    t = next_count(state)
    c = 1 + (t - 1) * lr_decay
    clr = lr / c
    sum_next = state["sum"] + g * g
    sum_next_dot = add_dots(2 * g * g_dot, state_dot_of(state, state_dot, "sum"))
    assert sum_next_dot is not None
    r = sum_next.sqrt()
    std = r + eps
    q = g / std
    std_dot = add_dots(_sqrt_jvp(r, sum_next_dot), hyper_dot_of(hyper, hyper_dot, "eps"))
    q_dot = (g_dot - q * std_dot) / std
    clr_dot = add_dots(mul_dot(hyper_dot_of(hyper, hyper_dot, "lr"), 1 / c),
                       mul_dot(hyper_dot_of(hyper, hyper_dot, "lr_decay"), lambda: -lr * (t - 1) / (c * c)))
    theta_next_dot = add_dots(theta_dot, -clr * q_dot, mul_dot(clr_dot, -q))
    return dense_dot(theta_next_dot, theta), {"sum": dense_dot(sum_next_dot, sum_next)}


def _initial_sum(param: Tensor, hyper: Hyper) -> Tensor:
    # Note [Adagrad's initial accumulator]
    return torch.full_like(param, float(hyper["initial_accumulator_value"]), memory_format=torch.preserve_format)


ADAGRAD = DiffOptimizer(
    name="Adagrad",
    torch_cls=torch.optim.Adagrad,
    step=adagrad_step,
    step_vjp=adagrad_step_vjp,
    step_jvp=adagrad_step_jvp,
    hyper=(lr(), Hyperparameter("lr_decay", doc="learning-rate decay"), weight_decay(), eps()),
    flags=(MAXIMIZE, Flag("initial_accumulator_value", default=0.0, kind=float,
                          why="it only fills the initial state (Note [Adagrad's initial accumulator])")),
    state=(StateEntry("sum", init=_initial_sum),),
    counts_steps=True,
    tensor_step_count=True,
    notes="Finite derivative at a zero accumulator; initial_accumulator_value is state initialisation only.",
)

__all__ = ["ADAGRAD", "adagrad_step", "adagrad_step_jvp", "adagrad_step_vjp"]
