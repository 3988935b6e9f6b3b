# SPDX-License-Identifier: Apache-2.0
"""Differentiable ``torch.optim.Adam`` and ``torch.optim.AdamW`` (amsgrad, maximize)."""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import Tensor

from .._typing import Hyper, State
from .adjoints import (add_bar, add_dots, coupled_gradient, coupled_gradient_jvp, coupled_gradient_vjp, dense_dot,
                        hyper_dot_of, is_active, is_learned, mul_dot, next_count, state_dot_of)
from .base import DiffOptimizer
from .declarations import MAXIMIZE, Flag, FlatLayout, StateEntry, betas, eps, lr, weight_decay


def _sqrt(v: Tensor) -> Tensor:
    """``v.sqrt()``, whose derivative is taken as 0 (not ∞) where ``v == 0``.

    Note [Adam at a zero second moment] explains why 0 is the right value. Under no_grad (the
    tape) this is a plain ``sqrt``; under autograd or forward-mode AD (the reference unroll,
    the VJP tests) the double ``where`` keeps every derivative finite with the same values.
    """
    if not torch.is_grad_enabled():
        return v.sqrt()
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


def _sqrt_jvp(root: Tensor, dot: Tensor) -> Tensor:
    """The tangent of ``root = sqrt(x)`` from that of ``x``: ``dot / (2 root)``, and 0 where
    ``root == 0`` (the VJP's convention, Note [Adam at a zero second moment])."""
    positive = root > 0
    safe = torch.where(positive, root, torch.ones_like(root))
    return torch.where(positive, dot / (2 * safe), 0.0)


def _prepare(theta: Tensor, G: Tensor, state: State, hyper: Hyper) -> tuple[Tensor, Tensor, float]:
    """The gradient after ``maximize`` and coupled weight decay, the decayed parameter, and t."""
    wd = hyper["weight_decay"]
    t = next_count(state)
    if hyper["decoupled_weight_decay"] and is_active(wd):
        return (-G if hyper["maximize"] else G), theta * (1 - hyper["lr"] * wd), t
    return coupled_gradient(theta, G, hyper), theta, t


def _prepare_vjp(theta: Tensor, g_bar: Tensor, tb: Tensor, hyper: Hyper,
                 bars: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The VJP of :func:`_prepare`'s weight decay and ``maximize``: ``(θ̄, Ḡ)`` from the gradient's
    cotangent ``g_bar`` and the decayed parameter's ``tb``, with the partials of lr and the
    weight decay added into ``bars``."""
    lr, wd = hyper["lr"], hyper["weight_decay"]
    if hyper["decoupled_weight_decay"] and is_active(wd):
        add_bar(bars, hyper, "lr", lambda: -wd * theta * tb)
        add_bar(bars, hyper, "weight_decay", lambda: -lr * theta * tb)
        return tb * (1 - lr * wd), (-g_bar if hyper["maximize"] else g_bar)
    return coupled_gradient_vjp(theta, g_bar, tb, hyper, bars)


def _prepare_jvp(theta: Tensor, theta_dot: Tensor, G_dot: Tensor, hyper: Hyper,
                 hyper_dot: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The JVP of :func:`_prepare`: the tangents ``(ġ, θ̇₁)`` of the gradient and of the decayed
    parameter, :math:`\\dot\\theta_1 = (1 - \\eta\\lambda)\\dot\\theta - (\\dot\\eta\\lambda + \\eta\\dot\\lambda)\\theta`
    (decoupled), else :math:`\\dot\\theta_1 = \\dot\\theta` and ``ġ`` of the coupled gradient."""
    lr, wd = hyper["lr"], hyper["weight_decay"]
    if hyper["decoupled_weight_decay"] and is_active(wd):
        theta1_dot = add_dots(theta_dot * (1 - lr * wd), mul_dot(hyper_dot_of(hyper, hyper_dot, "lr"), lambda: -wd * theta),
                              mul_dot(hyper_dot_of(hyper, hyper_dot, "weight_decay"), lambda: -lr * theta))
        return (-G_dot if hyper["maximize"] else G_dot), theta1_dot
    return coupled_gradient_jvp(theta, theta_dot, G_dot, hyper, hyper_dot), theta_dot


def _moments_jvp(g: Tensor, g_dot: Tensor, state: State, state_dot: State, hyper: Hyper,
                 hyper_dot: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The tangents of :math:`m' = \\beta_1 m + (1 - \\beta_1) g` and
    :math:`v' = \\beta_2 v + (1 - \\beta_2) g^2` (Adam, NAdam, RAdam):
    :math:`\\dot m' = \\beta_1 \\dot m + (1 - \\beta_1)\\dot g + \\dot\\beta_1 (m - g)`,
    :math:`\\dot v' = \\beta_2 \\dot v + 2 (1 - \\beta_2) g \\dot g + \\dot\\beta_2 (v - g^2)`."""
    b1, b2 = hyper["beta1"], hyper["beta2"]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m_next_dot = add_dots((1 - b1) * g_dot, mul_dot(state_dot_of(state, state_dot, "exp_avg"), b1),
                          mul_dot(hyper_dot_of(hyper, hyper_dot, "beta1"), lambda: m - g))
    v_next_dot = add_dots(2 * (1 - b2) * g * g_dot, mul_dot(state_dot_of(state, state_dot, "exp_avg_sq"), b2),
                          mul_dot(hyper_dot_of(hyper, hyper_dot, "beta2"), lambda: v - g * g))
    assert m_next_dot is not None and v_next_dot is not None
    return m_next_dot, v_next_dot


def adam_step(theta: Tensor, G: Tensor, state: State, hyper: Hyper) -> tuple[Tensor, State]:
    """One Adam (or AdamW) step on one tensor, out of place, as ``torch.optim.Adam`` makes it.

    .. math::
        g &= \\pm G \\;(+\\, \\lambda\\theta \\text{ for Adam}), \\quad
        \\theta_1 = \\theta (1 - \\eta\\lambda) \\text{ for AdamW, else } \\theta \\\\
        m' &= \\beta_1 m + (1 - \\beta_1) g, \\quad v' = \\beta_2 v + (1 - \\beta_2) g^2 \\\\
        \\hat v &= \\max(v_{max}, v') \\text{ (amsgrad) or } v' \\\\
        d &= \\sqrt{\\hat v} / \\sqrt{1 - \\beta_2^t} + \\epsilon \\\\
        \\theta' &= \\theta_1 - \\frac{\\eta}{1 - \\beta_1^t} \\, m' / d
    """
    b1, b2, lr, eps = hyper["beta1"], hyper["beta2"], hyper["lr"], hyper["eps"]
    g, theta1, t = _prepare(theta, G, state, hyper)
    m_next = torch.lerp(state["exp_avg"], g, 1 - b1)
    v_next = state["exp_avg_sq"] * b2 + (1 - b2) * (g * g)
    bias_correction1 = 1 - b1**t
    bias_correction2_sqrt = (1 - b2**t) ** 0.5
    step_size = lr / bias_correction1
    new_state: State = {"step": t, "exp_avg": m_next, "exp_avg_sq": v_next}
    if hyper["amsgrad"]:
        v_hat = torch.maximum(state["max_exp_avg_sq"], v_next)
        new_state["max_exp_avg_sq"] = v_hat
    else:
        v_hat = v_next
    denom = _sqrt(v_hat) / bias_correction2_sqrt + eps
    return theta1 - step_size * (m_next / denom), new_state


def adam_step_vjp(
    theta: Tensor,
    G: Tensor,
    state: State,
    hyper: Hyper,
    theta_next_bar: Tensor,
    state_next_bar: State,
) -> tuple[Tensor, Tensor, State, dict[str, Tensor]]:
    """Vector-Jacobian product of :func:`adam_step`.

    With :math:`s = \\sqrt{\\hat v}`, :math:`c_1 = 1 - \\beta_1^t`, :math:`c_2 = \\sqrt{1 - \\beta_2^t}`,
    :math:`\\alpha = \\eta / c_1`:

    .. math::
        \\bar m'_{tot} &= \\bar m' - \\alpha \\bar\\theta' / d, \\quad
        \\bar d = \\alpha \\bar\\theta' m' / d^2 \\;(= \\bar\\epsilon) \\\\
        \\bar{\\hat v} &= \\bar d / (2 s c_2) \\text{, and 0 where } s = 0 \\\\
        \\bar m &= \\beta_1 \\bar m'_{tot}, \\quad \\bar v = \\beta_2 \\bar v'_{tot}, \\quad
        \\bar g = (1 - \\beta_1) \\bar m'_{tot} + 2 (1 - \\beta_2) g \\bar v'_{tot}

    Note [Adam at a zero second moment]: where :math:`\\hat v = 0` every gradient seen so far
    is zero, so :math:`m' = 0` and :math:`\\bar d = 0`; the path through :math:`\\sqrt{\\hat v}`
    contributes :math:`0 \\cdot \\infty` in plain autograd (NaN, as with
    ``torch.optim.Adam(differentiable=True)``). Its limit is 0, the true derivative, which is
    what we use (and what :func:`adam_step` gives autograd, through ``_sqrt``). Note [amsgrad]: the maximum routes its cotangent to :math:`v'` where
    :math:`v' \\ge v_{max}` and to :math:`v_{max}` elsewhere (a subgradient at ties).
    """
    b1, b2, lr, eps = hyper["beta1"], hyper["beta2"], hyper["lr"], hyper["eps"]
    g, _, t = _prepare(theta, G, state, hyper)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m_next = torch.lerp(m, g, 1 - b1)
    v_next = v * b2 + (1 - b2) * (g * g)
    bias_correction1 = 1 - b1**t
    bias_correction2_sqrt = (1 - b2**t) ** 0.5
    step_size = lr / bias_correction1
    amsgrad = hyper["amsgrad"]
    if amsgrad:
        v_max = state["max_exp_avg_sq"]
        to_new = v_next >= v_max
        v_hat = torch.where(to_new, v_next, v_max)
    else:
        v_hat = v_next
    s = v_hat.sqrt()
    denom = s / bias_correction2_sqrt + eps
    bars: dict[str, Tensor] = {}
    tb = theta_next_bar

    # theta' = theta1 - step_size * m'/d
    step_size_bar = -(m_next / denom) * tb
    m_bar = -step_size * tb / denom
    d_bar = step_size * tb * m_next / (denom * denom)
    add_bar(bars, hyper, "eps", d_bar)
    # d = s / c2 + eps
    positive = s > 0
    s_safe = torch.where(positive, s, torch.ones_like(s))
    v_hat_bar = torch.where(positive, d_bar / (2 * s_safe * bias_correction2_sqrt), torch.zeros_like(s))
    state_bar: State = {}
    carried_v = state_next_bar.get("exp_avg_sq")
    if amsgrad:
        max_bar = v_hat_bar
        carried_max = state_next_bar.get("max_exp_avg_sq")
        if carried_max is not None:
            max_bar = max_bar + carried_max
        zero = torch.zeros_like(max_bar)
        v_bar = torch.where(to_new, max_bar, zero)
        state_bar["max_exp_avg_sq"] = torch.where(to_new, zero, max_bar)
    else:
        v_bar = v_hat_bar
    if carried_v is not None:
        v_bar = v_bar + carried_v
    carried_m = state_next_bar.get("exp_avg")
    if carried_m is not None:
        m_bar = m_bar + carried_m

    # bias corrections: c2 = (1 - b2^t)^(1/2), step_size = lr / c1, c1 = 1 - b1^t
    if is_learned(b2):
        c2_bar = -d_bar * s / (bias_correction2_sqrt * bias_correction2_sqrt)
        bc2_bar = c2_bar * 0.5 / bias_correction2_sqrt
        add_bar(bars, hyper, "beta2", -bc2_bar * t * b2 ** (t - 1) + (v - g * g) * v_bar)
    add_bar(bars, hyper, "lr", lambda: step_size_bar / bias_correction1)
    if is_learned(b1):
        bc1_bar = -step_size_bar * lr / (bias_correction1 * bias_correction1)
        add_bar(bars, hyper, "beta1", -bc1_bar * t * b1 ** (t - 1) + (m - g) * m_bar)

    # m' = b1 m + (1 - b1) g ; v' = b2 v + (1 - b2) g^2
    state_bar["exp_avg"] = b1 * m_bar
    state_bar["exp_avg_sq"] = b2 * v_bar
    g_bar = (1 - b1) * m_bar + 2 * (1 - b2) * g * v_bar

    theta_bar, G_bar = _prepare_vjp(theta, g_bar, tb, hyper, bars)
    return theta_bar, G_bar, state_bar, bars


def adam_step_jvp(
    theta: Tensor,
    G: Tensor,
    state: State,
    hyper: Hyper,
    theta_dot: Tensor,
    G_dot: Tensor,
    state_dot: State,
    hyper_dot: Mapping[str, Tensor],
) -> tuple[Tensor, State]:
    """Jacobian-vector product of :func:`adam_step` (Note [Forward-mode derivatives of a step]).

    With :math:`s = \\sqrt{\\hat v}`, :math:`c_1 = 1 - \\beta_1^t`, :math:`c_2 = \\sqrt{1 - \\beta_2^t}`,
    :math:`\\alpha = \\eta / c_1`, :math:`d = s / c_2 + \\epsilon`, :math:`\\dot m'` and
    :math:`\\dot v'` as in :func:`_moments_jvp`:

    .. math::
        \\dot{\\hat v} &= \\dot v' \\text{ where } v' \\ge v_{max} \\text{, else } \\dot v_{max}
        \\text{ (amsgrad), or } \\dot v' \\\\
        \\dot s &= \\dot{\\hat v} / (2 s) \\text{, and 0 where } s = 0, \\quad
        \\dot c_2 = -t \\beta_2^{t-1} \\dot\\beta_2 / (2 c_2), \\quad
        \\dot\\alpha = \\dot\\eta / c_1 + \\alpha\\, t \\beta_1^{t-1} \\dot\\beta_1 / c_1 \\\\
        \\dot d &= \\dot s / c_2 - s \\dot c_2 / c_2^2 + \\dot\\epsilon, \\quad
        \\dot\\theta' = \\dot\\theta_1 - \\dot\\alpha\\, m'/d - \\alpha (\\dot m' / d - m' \\dot d / d^2)

    with :math:`\\dot\\theta_1` from :func:`_prepare_jvp`. It is finite where :math:`\\hat v = 0`
    (the limit of Note [Adam at a zero second moment]), and amsgrad's maximum passes the
    tangent of the side the VJP gives its cotangent to (Note [amsgrad]).
    """
    b1, b2, lr, eps = hyper["beta1"], hyper["beta2"], hyper["lr"], hyper["eps"]
    g, _, t = _prepare(theta, G, state, hyper)
    g_dot, theta1_dot = _prepare_jvp(theta, theta_dot, G_dot, hyper, hyper_dot)
    b1_dot, b2_dot = hyper_dot_of(hyper, hyper_dot, "beta1"), hyper_dot_of(hyper, hyper_dot, "beta2")
    m_next = torch.lerp(state["exp_avg"], g, 1 - b1)
    v_next = state["exp_avg_sq"] * b2 + (1 - b2) * (g * g)
    m_next_dot, v_next_dot = _moments_jvp(g, g_dot, state, state_dot, hyper, hyper_dot)
    bias_correction1 = 1 - b1**t
    bias_correction2_sqrt = (1 - b2**t) ** 0.5
    step_size = lr / bias_correction1
    state_next_dot: State = {"exp_avg": dense_dot(m_next_dot, m_next), "exp_avg_sq": dense_dot(v_next_dot, v_next)}
    if hyper["amsgrad"]:
        v_max = state["max_exp_avg_sq"]
        to_new = v_next >= v_max
        v_hat = torch.where(to_new, v_next, v_max)
        v_max_dot = state_dot_of(state, state_dot, "max_exp_avg_sq")
        v_hat_dot = torch.where(to_new, v_next_dot, 0.0 if v_max_dot is None else v_max_dot)
        state_next_dot["max_exp_avg_sq"] = dense_dot(v_hat_dot, v_hat)
    else:
        v_hat, v_hat_dot = v_next, v_next_dot
    s = v_hat.sqrt()
    denom = s / bias_correction2_sqrt + eps
    c2_dot = mul_dot(b2_dot, lambda: -t * b2 ** (t - 1) / (2 * bias_correction2_sqrt))
    denom_dot = add_dots(_sqrt_jvp(s, v_hat_dot) / bias_correction2_sqrt,
                         mul_dot(c2_dot, lambda: -s / (bias_correction2_sqrt * bias_correction2_sqrt)),
                         hyper_dot_of(hyper, hyper_dot, "eps"))
    step_size_dot = add_dots(mul_dot(hyper_dot_of(hyper, hyper_dot, "lr"), 1 / bias_correction1),
                             mul_dot(b1_dot, lambda: step_size * t * b1 ** (t - 1) / bias_correction1))
    q = m_next / denom
    q_dot = (m_next_dot - q * denom_dot) / denom
    theta_next_dot = add_dots(theta1_dot, -step_size * q_dot, mul_dot(step_size_dot, -q))
    return dense_dot(theta_next_dot, theta), state_next_dot


def _adam_options(hyper: Hyper, state: State) -> tuple:
    """The flat ops' static options: (amsgrad, maximize, decoupled weight decay, weight decay)."""
    return (bool(hyper["amsgrad"]), bool(hyper["maximize"]), bool(hyper["decoupled_weight_decay"]),
            is_active(hyper["weight_decay"]))


def _moments(options: tuple) -> tuple[Optional[str], ...]:
    return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq" if options[0] else None)


#: ``adam_step(θ, G, m, v, vmax, offsets, hyper, elementwise, t, amsgrad, maximize, decoupled, has_wd)``
#: and its VJP (csrc/include/gimli/optim_math.h).
ADAM_FLAT = FlatLayout(
    op="adam",
    hyper=("lr", "beta1", "beta2", "eps", "weight_decay"),
    options=_adam_options,
    state_in=_moments,
    state_out=_moments,
    bar_in=_moments,
    bar_out=_moments,
    args=lambda options, t: (t, *options),
    counter="step",
)


def _declare(name: str, cls: type, decoupled: bool) -> DiffOptimizer:
    return DiffOptimizer(
        name=name,
        torch_cls=cls,
        step=adam_step,
        step_vjp=adam_step_vjp,
        step_jvp=adam_step_jvp,
        hyper=(lr(), *betas(), eps(), weight_decay()),
        flags=(Flag("amsgrad", why="it switches the second moment to its running maximum"), MAXIMIZE,
               Flag("decoupled_weight_decay", default=decoupled, why="it switches between AdamW and Adam")),
        state=(StateEntry("exp_avg"), StateEntry("exp_avg_sq"),
               StateEntry("max_exp_avg_sq", when=lambda hyper: bool(hyper["amsgrad"]))),
        counts_steps=True,
        tensor_step_count=True,
        flat=ADAM_FLAT,
        notes="Finite derivative at a zero second moment; amsgrad's max takes a subgradient at ties.",
    )


ADAM = _declare("Adam", torch.optim.Adam, decoupled=False)
ADAMW = _declare("AdamW", torch.optim.AdamW, decoupled=True)

__all__ = ["ADAM", "ADAMW", "ADAM_FLAT", "adam_step", "adam_step_jvp", "adam_step_vjp"]
