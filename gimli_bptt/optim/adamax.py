# SPDX-License-Identifier: Apache-2.0
"""Differentiable ``torch.optim.Adamax``: weight decay, maximize."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from .._typing import Hyper, State
from .adjoints import (add_bar, add_dots, coupled_gradient, coupled_gradient_jvp, coupled_gradient_vjp, dense_dot,
                        hyper_dot_of, is_learned, mul_dot, next_count, state_dot_of)
from .base import DiffOptimizer
from .declarations import MAXIMIZE, StateEntry, betas, eps, lr, weight_decay


def adamax_step(theta: Tensor, G: Tensor, state: State, hyper: Hyper) -> tuple[Tensor, State]:
    """One Adamax step on one tensor, out of place, as ``torch.optim.Adamax`` makes it.

    .. math::
        g &= \\pm G + \\lambda \\theta \\\\
        m' &= \\beta_1 m + (1 - \\beta_1) g \\\\
        u' &= \\max(\\beta_2 u, |g| + \\epsilon) \\\\
        \\theta' &= \\theta - \\frac{\\eta}{1 - \\beta_1^t} \\, m' / u'
    """
    b1, b2, lr, eps = hyper["beta1"], hyper["beta2"], hyper["lr"], hyper["eps"]
    g = coupled_gradient(theta, G, hyper)
    t = next_count(state)
    m_next = torch.lerp(state["exp_avg"], g, 1 - b1)
    u_next = torch.maximum(state["exp_inf"] * b2, g.abs() + eps)
    clr = lr / (1 - b1**t)
    return theta - clr * (m_next / u_next), {"step": t, "exp_avg": m_next, "exp_inf": u_next}


def adamax_step_vjp(
    theta: Tensor,
    G: Tensor,
    state: State,
    hyper: Hyper,
    theta_next_bar: Tensor,
    state_next_bar: State,
) -> tuple[Tensor, Tensor, State, dict[str, Tensor]]:
    """Vector-Jacobian product of :func:`adamax_step`.

    With :math:`c = 1 - \\beta_1^t`, :math:`\\alpha = \\eta / c`, :math:`N` the elements where
    :math:`|g| + \\epsilon \\ge \\beta_2 u` (the new value wins):

    .. math::
        \\bar\\alpha &= -\\langle m' / u', \\bar\\theta' \\rangle, \\quad \\bar\\eta = \\bar\\alpha / c,
        \\quad \\bar\\beta_1 \\mathrel{+}= \\bar\\alpha \\, \\eta \\, t \\beta_1^{t-1} / c^2 \\\\
        \\bar m'_{tot} &= \\bar m' - \\alpha \\bar\\theta' / u', \\quad
        \\bar u'_{tot} = \\bar u' + \\alpha \\bar\\theta' m' / u'^2 \\\\
        \\bar u &= \\beta_2 \\bar u'_{tot} [\\lnot N], \\quad
        \\bar\\beta_2 = \\langle u, \\bar u'_{tot} [\\lnot N] \\rangle, \\quad
        \\bar\\epsilon = \\langle 1, \\bar u'_{tot} [N] \\rangle \\\\
        \\bar m &= \\beta_1 \\bar m'_{tot}, \\quad \\bar\\beta_1 \\mathrel{+}= \\langle m - g, \\bar m'_{tot} \\rangle, \\quad
        \\bar g = (1 - \\beta_1) \\bar m'_{tot} + \\operatorname{sign}(g) \\, \\bar u'_{tot} [N]

    then weight decay and ``maximize`` as in SGD.

    Note [Adamax maximum]: :math:`u' = \\max(\\beta_2 u, |g| + \\epsilon)` is not
    differentiable where the two are equal. There the cotangent of :math:`u'` goes wholly to
    :math:`|g| + \\epsilon` (a subgradient, as amsgrad's Note [amsgrad] gives it wholly to the
    new value); autograd through ``torch.maximum`` splits it in halves, so the two agree
    only away from ties. Ties are measure-zero for continuous gradients, except at the first
    step from a zero state with ``eps = 0`` and a zero gradient (0 = 0). Note [Adamax
    abs]: :math:`|g|` has derivative :math:`\\operatorname{sign}(g)`, taken as 0 at
    :math:`g = 0` (as autograd's ``abs``).
    """
    b1, b2, lr, eps = hyper["beta1"], hyper["beta2"], hyper["lr"], hyper["eps"]
    g = coupled_gradient(theta, G, hyper)
    t = next_count(state)
    m, u = state["exp_avg"], state["exp_inf"]
    m_next = torch.lerp(m, g, 1 - b1)
    decayed = u * b2
    fresh = g.abs() + eps
    to_new = fresh >= decayed
    u_next = torch.where(to_new, fresh, decayed)
    c = 1 - b1**t
    clr = lr / c
    q = m_next / u_next
    tb = theta_next_bar
    bars: dict[str, Tensor] = {}

    clr_bar = -q * tb
    add_bar(bars, hyper, "lr", lambda: clr_bar / c)
    m_bar = -clr * tb / u_next
    u_next_bar = -m_bar * q
    carried = state_next_bar.get("exp_inf")
    if carried is not None:
        u_next_bar = u_next_bar + carried
    carried = state_next_bar.get("exp_avg")
    if carried is not None:
        m_bar = m_bar + carried
    zero = torch.zeros_like(u_next_bar)
    decayed_bar = torch.where(to_new, zero, u_next_bar)
    fresh_bar = torch.where(to_new, u_next_bar, zero)
    add_bar(bars, hyper, "beta2", lambda: u * decayed_bar)
    add_bar(bars, hyper, "eps", fresh_bar)
    if is_learned(b1):
        c_bar = -clr_bar * lr / (c * c)
        add_bar(bars, hyper, "beta1", -c_bar * t * b1 ** (t - 1) + (m - g) * m_bar)
    state_bar: State = {"exp_avg": b1 * m_bar, "exp_inf": b2 * decayed_bar}
    g_bar = (1 - b1) * m_bar + torch.sign(g) * fresh_bar

    theta_bar, G_bar = coupled_gradient_vjp(theta, g_bar, tb, hyper, bars)
    return theta_bar, G_bar, state_bar, bars


def adamax_step_jvp(
    theta: Tensor,
    G: Tensor,
    state: State,
    hyper: Hyper,
    theta_dot: Tensor,
    G_dot: Tensor,
    state_dot: State,
    hyper_dot: Mapping[str, Tensor],
) -> tuple[Tensor, State]:
    """Jacobian-vector product of :func:`adamax_step` (Note [Forward-mode derivatives of a step]).

    With :math:`c = 1 - \\beta_1^t`, :math:`\\alpha = \\eta / c`, :math:`q = m' / u'`, :math:`N` the
    elements where :math:`|g| + \\epsilon \\ge \\beta_2 u` (the new value wins):

    .. math::
        \\dot g &= \\pm \\dot G + \\lambda \\dot\\theta + \\dot\\lambda \\theta, \\quad
        \\dot m' = \\beta_1 \\dot m + (1 - \\beta_1) \\dot g + \\dot\\beta_1 (m - g) \\\\
        \\dot u' &= \\operatorname{sign}(g) \\dot g + \\dot\\epsilon \\;[N], \\quad
        \\dot\\beta_2 u + \\beta_2 \\dot u \\;[\\lnot N] \\\\
        \\dot\\alpha &= \\dot\\eta / c + \\alpha\\, t \\beta_1^{t-1} \\dot\\beta_1 / c, \\quad
        \\dot q = (\\dot m' - q \\dot u') / u', \\quad
        \\dot\\theta' = \\dot\\theta - \\dot\\alpha q - \\alpha \\dot q

    The maximum passes the tangent of the side the VJP gives its cotangent to, :math:`|g| + \\epsilon`
    at ties (Note [Adamax maximum]); :math:`|g|` has the tangent :math:`\\operatorname{sign}(g) \\dot g`,
    0 at :math:`g = 0` (Note [Adamax abs]).
    """
    b1, b2, lr, eps = hyper["beta1"], hyper["beta2"], hyper["lr"], hyper["eps"]
    g = coupled_gradient(theta, G, hyper)
    g_dot = coupled_gradient_jvp(theta, theta_dot, G_dot, hyper, hyper_dot)
    b1_dot = hyper_dot_of(hyper, hyper_dot, "beta1")
    t = next_count(state)
    m, u = state["exp_avg"], state["exp_inf"]
    m_next = torch.lerp(m, g, 1 - b1)
    m_next_dot = add_dots((1 - b1) * g_dot, mul_dot(state_dot_of(state, state_dot, "exp_avg"), b1),
                          mul_dot(b1_dot, lambda: m - g))
    assert m_next_dot is not None
    decayed = u * b2
    fresh = g.abs() + eps
    to_new = fresh >= decayed
    u_next = torch.where(to_new, fresh, decayed)
    fresh_dot = add_dots(torch.sign(g) * g_dot, hyper_dot_of(hyper, hyper_dot, "eps"))
    decayed_dot = add_dots(mul_dot(state_dot_of(state, state_dot, "exp_inf"), b2),
                           mul_dot(hyper_dot_of(hyper, hyper_dot, "beta2"), u))
    u_next_dot = torch.where(to_new, fresh_dot, 0.0 if decayed_dot is None else decayed_dot)
    c = 1 - b1**t
    clr = lr / c
    q = m_next / u_next
    q_dot = (m_next_dot - q * u_next_dot) / u_next
    clr_dot = add_dots(mul_dot(hyper_dot_of(hyper, hyper_dot, "lr"), 1 / c),
                       mul_dot(b1_dot, lambda: clr * t * b1 ** (t - 1) / c))
    theta_next_dot = add_dots(theta_dot, -clr * q_dot, mul_dot(clr_dot, -q))
    return dense_dot(theta_next_dot, theta), {"exp_avg": dense_dot(m_next_dot, m_next),
                                              "exp_inf": dense_dot(u_next_dot, u_next)}


ADAMAX = DiffOptimizer(
    name="Adamax",
    torch_cls=torch.optim.Adamax,
    step=adamax_step,
    step_vjp=adamax_step_vjp,
    step_jvp=adamax_step_jvp,
    hyper=(lr(), *betas(), eps(), weight_decay()),
    flags=(MAXIMIZE,),
    state=(StateEntry("exp_avg"), StateEntry("exp_inf")),
    counts_steps=True,
    tensor_step_count=True,
    notes="The maximum gives its cotangent to |g| + eps at ties (Note [Adamax maximum]).",
)

__all__ = ["ADAMAX", "adamax_step", "adamax_step_jvp", "adamax_step_vjp"]
