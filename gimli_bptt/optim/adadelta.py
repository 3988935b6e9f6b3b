# SPDX-License-Identifier: Apache-2.0
"""Differentiable ``torch.optim.Adadelta``: weight decay, maximize."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from .adam import _sqrt, _sqrt_jvp
from .._typing import Hyper, State
from .adjoints import (add_bar, add_dots, coupled_gradient, coupled_gradient_jvp, coupled_gradient_vjp, dense_dot,
                        hyper_dot_of, mul_dot, next_count, state_dot_of)
from .base import DiffOptimizer
from .declarations import MAXIMIZE, StateEntry, eps, lr, unit_interval, weight_decay


def adadelta_step(theta: Tensor, G: Tensor, state: State, hyper: Hyper) -> tuple[Tensor, State]:
    """One Adadelta step on one tensor, out of place, as ``torch.optim.Adadelta`` makes it.

    .. math::
        g &= \\pm G + \\lambda \\theta \\\\
        v' &= \\rho v + (1 - \\rho) g^2 \\\\
        \\delta &= \\frac{\\sqrt{u + \\epsilon}}{\\sqrt{v' + \\epsilon}} \\, g \\\\
        u' &= \\rho u + (1 - \\rho) \\delta^2 \\\\
        \\theta' &= \\theta - \\eta \\delta
    """
    lr, rho, eps = hyper["lr"], hyper["rho"], hyper["eps"]
    g = coupled_gradient(theta, G, hyper)
    t = next_count(state)
    square_avg = state["square_avg"] * rho + (1 - rho) * (g * g)
    std = _sqrt(square_avg + eps)
    delta = (_sqrt(state["acc_delta"] + eps) / std) * g
    acc_delta = state["acc_delta"] * rho + (1 - rho) * (delta * delta)
    return theta - lr * delta, {"step": t, "square_avg": square_avg, "acc_delta": acc_delta}


def adadelta_step_vjp(
    theta: Tensor,
    G: Tensor,
    state: State,
    hyper: Hyper,
    theta_next_bar: Tensor,
    state_next_bar: State,
) -> tuple[Tensor, Tensor, State, dict[str, Tensor]]:
    """Vector-Jacobian product of :func:`adadelta_step`.

    With :math:`n = \\sqrt{u + \\epsilon}`, :math:`s = \\sqrt{v' + \\epsilon}`, :math:`k = n / s`,
    :math:`\\delta = k g`:

    .. math::
        \\bar\\delta &= -\\eta \\bar\\theta' + 2 (1 - \\rho) \\delta \\bar u', \\quad
        \\bar\\eta = -\\langle \\delta, \\bar\\theta' \\rangle \\\\
        \\bar k &= g \\bar\\delta, \\quad \\bar n = \\bar k / s, \\quad \\bar s = -\\bar k k / s \\\\
        \\bar u &= \\rho \\bar u' + \\bar n / (2 n), \\quad
        \\bar v'_{tot} = \\bar v' + \\bar s / (2 s), \\quad
        \\bar\\epsilon = \\langle 1, \\bar n / (2 n) + \\bar s / (2 s) \\rangle \\\\
        \\bar v &= \\rho \\bar v'_{tot}, \\quad
        \\bar\\rho = \\langle v - g^2, \\bar v'_{tot} \\rangle + \\langle u - \\delta^2, \\bar u' \\rangle \\\\
        \\bar g &= k \\bar\\delta + 2 (1 - \\rho) g \\bar v'_{tot}

    then weight decay and ``maximize`` as in SGD.

    Note [Adadelta at eps = 0]: both roots are of a sum with :math:`\\epsilon`, so they are
    positive and differentiable for :math:`\\epsilon > 0` (torch's default is 1e-6). At
    :math:`\\epsilon = 0` torch's own step divides 0 by 0 where every gradient so far is 0,
    and the accumulator :math:`u` stays exactly 0 for ever (:math:`\\delta = 0` at the first
    step); we then take the derivative of :math:`\\sqrt{\\cdot}` at 0 as 0 (``_sqrt``, as in
    Note [Adam at a zero second moment]), which is exact for every input through which
    :math:`u` does not move, but not for ``eps`` itself (:math:`\\sqrt\\epsilon` has an
    infinite slope there). A learned ``eps`` is kept positive by
    ``OptimizerHyperparameters.project``.
    """
    lr, rho, eps = hyper["lr"], hyper["rho"], hyper["eps"]
    g = coupled_gradient(theta, G, hyper)
    v, u = state["square_avg"], state["acc_delta"]
    v_next = v * rho + (1 - rho) * (g * g)
    s = (v_next + eps).sqrt()
    n = (u + eps).sqrt()
    k = n / s
    delta = k * g
    tb = theta_next_bar
    bars: dict[str, Tensor] = {}
    state_bar: State = {}

    add_bar(bars, hyper, "lr", lambda: -delta * tb)
    delta_bar = -lr * tb
    u_next_bar = state_next_bar.get("acc_delta")
    if u_next_bar is not None:
        delta_bar = delta_bar + 2 * (1 - rho) * delta * u_next_bar
    k_bar = g * delta_bar

    def half_over(bar: Tensor, root: Tensor) -> Tensor:  # bar / (2 root), 0 where root == 0
        positive = root > 0
        safe = torch.where(positive, root, torch.ones_like(root))
        return torch.where(positive, bar / (2 * safe), torch.zeros_like(root))

    n_in_bar = half_over(k_bar / s, n)  # cotangent of u + eps
    s_in_bar = half_over(-k_bar * k / s, s)  # cotangent of v' + eps
    add_bar(bars, hyper, "eps", lambda: n_in_bar + s_in_bar)
    u_bar = n_in_bar
    if u_next_bar is not None:
        u_bar = u_bar + rho * u_next_bar
    v_bar = s_in_bar
    carried = state_next_bar.get("square_avg")
    if carried is not None:
        v_bar = v_bar + carried
    state_bar["acc_delta"] = u_bar
    state_bar["square_avg"] = rho * v_bar

    def rho_bar() -> Tensor:
        out = (v - g * g) * v_bar
        if u_next_bar is not None:
            out = out + (u - delta * delta) * u_next_bar
        return out

    add_bar(bars, hyper, "rho", rho_bar)
    g_bar = k * delta_bar + 2 * (1 - rho) * g * v_bar

    theta_bar, G_bar = coupled_gradient_vjp(theta, g_bar, tb, hyper, bars)
    return theta_bar, G_bar, state_bar, bars


def adadelta_step_jvp(
    theta: Tensor,
    G: Tensor,
    state: State,
    hyper: Hyper,
    theta_dot: Tensor,
    G_dot: Tensor,
    state_dot: State,
    hyper_dot: Mapping[str, Tensor],
) -> tuple[Tensor, State]:
    """Jacobian-vector product of :func:`adadelta_step` (Note [Forward-mode derivatives of a step]).

    With :math:`n = \\sqrt{u + \\epsilon}`, :math:`s = \\sqrt{v' + \\epsilon}`, :math:`k = n / s`,
    :math:`\\delta = k g`:

    .. math::
        \\dot g &= \\pm \\dot G + \\lambda \\dot\\theta + \\dot\\lambda \\theta, \\quad
        \\dot v' = \\rho \\dot v + \\dot\\rho (v - g^2) + 2 (1 - \\rho) g \\dot g \\\\
        \\dot n &= (\\dot u + \\dot\\epsilon) / (2 n), \\quad
        \\dot s = (\\dot v' + \\dot\\epsilon) / (2 s) \\text{ (each 0 where its root is 0)}, \\quad
        \\dot k = (\\dot n - k \\dot s) / s \\\\
        \\dot\\delta &= \\dot k g + k \\dot g, \\quad
        \\dot u' = \\rho \\dot u + \\dot\\rho (u - \\delta^2) + 2 (1 - \\rho) \\delta \\dot\\delta, \\quad
        \\dot\\theta' = \\dot\\theta - \\dot\\eta \\delta - \\eta \\dot\\delta

    The roots' tangents are 0 where they are 0 (only at ``eps = 0``: Note [Adadelta at eps = 0]).
    """
    lr, rho, eps = hyper["lr"], hyper["rho"], hyper["eps"]
    g = coupled_gradient(theta, G, hyper)
    g_dot = coupled_gradient_jvp(theta, theta_dot, G_dot, hyper, hyper_dot)
    rho_dot, eps_dot = hyper_dot_of(hyper, hyper_dot, "rho"), hyper_dot_of(hyper, hyper_dot, "eps")
    v, u = state["square_avg"], state["acc_delta"]
    u_dot = state_dot_of(state, state_dot, "acc_delta")
    v_next = v * rho + (1 - rho) * (g * g)
    v_next_dot = add_dots(2 * (1 - rho) * g * g_dot, mul_dot(state_dot_of(state, state_dot, "square_avg"), rho),
                          mul_dot(rho_dot, lambda: v - g * g))
    assert v_next_dot is not None
    s = (v_next + eps).sqrt()
    n = (u + eps).sqrt()
    k = n / s
    delta = k * g
    s_dot = _sqrt_jvp(s, add_dots(v_next_dot, eps_dot))
    n_in_dot = add_dots(u_dot, eps_dot)
    k_dot = -k * s_dot / s if n_in_dot is None else (_sqrt_jvp(n, n_in_dot) - k * s_dot) / s
    delta_dot = k_dot * g + k * g_dot
    u_next = u * rho + (1 - rho) * (delta * delta)
    u_next_dot = add_dots(2 * (1 - rho) * delta * delta_dot, mul_dot(u_dot, rho), mul_dot(rho_dot, lambda: u - delta * delta))
    theta_next_dot = add_dots(theta_dot, -lr * delta_dot, mul_dot(hyper_dot_of(hyper, hyper_dot, "lr"), -delta))
    return dense_dot(theta_next_dot, theta), {"square_avg": dense_dot(v_next_dot, v_next),
                                              "acc_delta": dense_dot(u_next_dot, u_next)}


ADADELTA = DiffOptimizer(
    name="Adadelta",
    torch_cls=torch.optim.Adadelta,
    step=adadelta_step,
    step_vjp=adadelta_step_vjp,
    step_jvp=adadelta_step_jvp,
    hyper=(lr(), unit_interval("rho", doc="decay of the running averages"), eps(), weight_decay()),
    flags=(MAXIMIZE,),
    state=(StateEntry("square_avg"), StateEntry("acc_delta")),
    counts_steps=True,
    tensor_step_count=True,
    notes="Needs eps > 0 for a finite derivative (Note [Adadelta at eps = 0]).",
)

__all__ = ["ADADELTA", "adadelta_step", "adadelta_step_jvp", "adadelta_step_vjp"]
