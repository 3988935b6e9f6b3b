# SPDX-License-Identifier: Apache-2.0
"""Differentiable ``torch.optim.NAdam``: momentum decay (``mu_product``), decoupled weight decay, maximize."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

from .adam import _moments_jvp, _prepare, _prepare_jvp, _prepare_vjp, _sqrt, _sqrt_jvp
from .._typing import Hyper, State
from ..metaparams.declaration import Hyperparameter
from .adjoints import (Dot, add_bar, add_dots, dense_dot, hyper_dot_of, is_learned, mul_dot, reduce_like, state_dot_of,
                       zero_missing_bars)
from .base import DiffOptimizer
from .declarations import MAXIMIZE, Flag, StateEntry, betas, eps, lr, weight_decay
from .scalars import round_to_torch_scalar

HYPER = (lr(), *betas(), eps(), weight_decay(), Hyperparameter("momentum_decay", doc="momentum decay"))
_HYPER_NAMES = tuple(h.name for h in HYPER)
_LN_096 = math.log(0.96)


def _momentum(b1: Any, md: Any, t: float) -> tuple[Any, Any]:
    """``mu_t = beta1 (1 - 0.5 * 0.96^(t psi))`` and the power ``0.96^(t psi)``."""
    power = 0.96 ** (t * md)
    return b1 * (1.0 - 0.5 * power), power


def nadam_step(theta: Tensor, G: Tensor, state: State, hyper: Hyper) -> tuple[Tensor, State]:
    """One NAdam step on one tensor, out of place, as ``torch.optim.NAdam`` makes it.

    .. math::
        g &= \\pm G \\;(+\\, \\lambda\\theta), \\quad
        \\theta_1 = \\theta (1 - \\eta\\lambda) \\text{ (decoupled), else } \\theta \\\\
        \\mu_t &= \\beta_1 (1 - \\tfrac12 0.96^{t\\psi}), \\quad
        \\mu_{t+1} = \\beta_1 (1 - \\tfrac12 0.96^{(t+1)\\psi}) \\\\
        P' &= P \\mu_t, \\quad m' = \\beta_1 m + (1 - \\beta_1) g, \\quad
        v' = \\beta_2 v + (1 - \\beta_2) g^2 \\\\
        d &= \\sqrt{v' / (1 - \\beta_2^t)} + \\epsilon \\\\
        \\theta' &= \\theta_1 - \\frac{\\eta (1 - \\mu_t)}{1 - P'} \\frac{g}{d}
        - \\frac{\\eta \\mu_{t+1}}{1 - P' \\mu_{t+1}} \\frac{m'}{d}

    :math:`P` is the state's ``mu_product``, rounded as torch rounds it (Note [Scalar state
    precision]); it becomes element-shaped when ``beta1`` or ``momentum_decay`` is learned per
    element.
    """
    b1, b2, lr, eps, md = hyper["beta1"], hyper["beta2"], hyper["lr"], hyper["eps"], hyper["momentum_decay"]
    g, theta1, t = _prepare(theta, G, state, hyper)
    bias_correction2 = 1 - b2**t
    mu, _ = _momentum(b1, md, t)
    mu_next, _ = _momentum(b1, md, t + 1)
    mu_product = round_to_torch_scalar(state["mu_product"] * round_to_torch_scalar(mu))
    m_next = torch.lerp(state["exp_avg"], g, 1 - b1)
    v_next = state["exp_avg_sq"] * b2 + (1 - b2) * (g * g)
    denom = _sqrt(v_next / bias_correction2) + eps
    mu_product_next = mu_product * mu_next
    coef_g = -lr * (1.0 - mu) / (1.0 - mu_product)
    coef_m = -lr * mu_next / (1.0 - mu_product_next)
    theta_next = theta1 + coef_g * (g / denom) + coef_m * (m_next / denom)
    return theta_next, {"step": t, "mu_product": mu_product, "exp_avg": m_next, "exp_avg_sq": v_next}


def nadam_step_vjp(
    theta: Tensor,
    G: Tensor,
    state: State,
    hyper: Hyper,
    theta_next_bar: Tensor,
    state_next_bar: State,
) -> tuple[Tensor, Tensor, State, dict[str, Tensor]]:
    """Vector-Jacobian product of :func:`nadam_step`.

    With :math:`c_g = -\\eta (1 - \\mu_t)/(1 - P')`, :math:`c_m = -\\eta\\mu_{t+1}/(1 - P'')`,
    :math:`P'' = P'\\mu_{t+1}`, :math:`s = \\sqrt{v'/c_2}`, :math:`c_2 = 1 - \\beta_2^t`:

    .. math::
        \\bar c_g &= \\langle g/d, \\bar\\theta' \\rangle, \\quad
        \\bar c_m = \\langle m'/d, \\bar\\theta' \\rangle, \\quad
        \\bar d = -(c_g g + c_m m') \\bar\\theta' / d^2 \\;(= \\bar\\epsilon) \\\\
        \\bar v'_{tot} &= \\bar v' + \\bar d / (2 s c_2) \\text{ (0 where } s = 0), \\quad
        \\bar m'_{tot} = \\bar m' + c_m \\bar\\theta' / d \\\\
        \\bar P' &= \\bar P'_{carried} + \\bar c_g c_g / (1 - P') + \\bar c_m c_m \\mu_{t+1} / (1 - P'') ,
        \\quad \\bar P = \\mu_t \\bar P' \\\\
        \\bar\\mu_t &= \\bar c_g \\eta / (1 - P') + P \\bar P', \\quad
        \\bar\\mu_{t+1} = \\bar c_m c_m / \\mu_{t+1} + \\bar c_m c_m P' / (1 - P'') \\\\
        \\bar\\beta_1 &\\mathrel{+}= \\bar\\mu \\, \\mu / \\beta_1, \\quad
        \\bar\\psi \\mathrel{+}= -\\tfrac12 \\beta_1 \\bar\\mu \\, 0.96^{t\\psi} \\, t \\ln 0.96
        \\text{ (for each of } \\mu_t, \\mu_{t+1})

    and the moments as for Adam. Scalars (``mu_product``, and the momentum coefficients when the
    hyperparameters are per group or per tensor) get the sum of their element-wise cotangents.
    """
    b1, b2, lr, eps, md = hyper["beta1"], hyper["beta2"], hyper["lr"], hyper["eps"], hyper["momentum_decay"]
    g, _, t = _prepare(theta, G, state, hyper)
    m, v, P = state["exp_avg"], state["exp_avg_sq"], state["mu_product"]
    bc2 = 1 - b2**t
    mu, pow_t = _momentum(b1, md, t)
    mu_n, pow_n = _momentum(b1, md, t + 1)
    mu_r = round_to_torch_scalar(mu)
    P1 = round_to_torch_scalar(P * mu_r)
    m_next = torch.lerp(m, g, 1 - b1)
    v_next = v * b2 + (1 - b2) * (g * g)
    s = v_next / bc2
    s = s.sqrt()
    denom = s + eps
    P2 = P1 * mu_n
    one_m_P1, one_m_P2 = 1.0 - P1, 1.0 - P2
    coef_g = -lr * (1.0 - mu) / one_m_P1
    coef_m = -lr * mu_n / one_m_P2
    tb = theta_next_bar
    bars: dict[str, Tensor] = {}
    state_bar: State = {}

    # theta' = theta1 + c_g g/d + c_m m'/d
    tb_d = tb / denom
    cg_bar = g * tb_d  # element-wise cotangents of the coefficients
    cm_bar = m_next * tb_d
    g_bar = coef_g * tb_d
    m_bar = coef_m * tb_d
    d_bar = -(coef_g * g + coef_m * m_next) * tb_d / denom
    add_bar(bars, hyper, "eps", d_bar)
    positive = s > 0
    s_safe = torch.where(positive, s, torch.ones_like(s))
    w_bar = torch.where(positive, d_bar / (2 * s_safe), torch.zeros_like(s))  # w = v'/c2, s = sqrt(w)
    v_bar = w_bar / bc2
    carried = state_next_bar.get("exp_avg_sq")
    if carried is not None:
        v_bar = v_bar + carried
    carried = state_next_bar.get("exp_avg")
    if carried is not None:
        m_bar = m_bar + carried

    # c_g = -lr (1 - mu) / (1 - P1) ; c_m = -lr mu_n / (1 - P2) ; P2 = P1 mu_n
    add_bar(bars, hyper, "lr", lambda: -(1.0 - mu) / one_m_P1 * cg_bar - mu_n / one_m_P2 * cm_bar)
    P2_bar_e = cm_bar * coef_m / one_m_P2
    P1_bar = reduce_like(cg_bar * coef_g / one_m_P1 + P2_bar_e * mu_n, P1)
    carried = state_next_bar.get("mu_product")
    if carried is not None:
        P1_bar = P1_bar + carried
    # P1 = round(P * round(mu)), the rounding with derivative 1
    state_bar["mu_product"] = reduce_like(P1_bar * mu_r, P)
    learns_momentum = is_learned(b1) or is_learned(md)
    if learns_momentum:
        mu_bar = reduce_like(cg_bar * lr / one_m_P1, mu) + reduce_like(P1_bar * P, mu)
        mu_n_bar = reduce_like(-lr / one_m_P2 * cm_bar + P2_bar_e * P1, mu_n)
        add_bar(bars, hyper, "beta1", lambda: mu_bar * (1.0 - 0.5 * pow_t) + mu_n_bar * (1.0 - 0.5 * pow_n))
        add_bar(bars, hyper, "momentum_decay", lambda: -0.5 * _LN_096 * b1 * (
            mu_bar * pow_t * t + mu_n_bar * pow_n * (t + 1)))

    # c2 = 1 - b2^t ; w = v'/c2
    if is_learned(b2):
        bc2_bar = -w_bar * v_next / (bc2 * bc2)
        add_bar(bars, hyper, "beta2", -bc2_bar * t * b2 ** (t - 1) + (v - g * g) * v_bar)
    if is_learned(b1):
        add_bar(bars, hyper, "beta1", (m - g) * m_bar)

    # m' = b1 m + (1 - b1) g ; v' = b2 v + (1 - b2) g^2
    state_bar["exp_avg"] = b1 * m_bar
    state_bar["exp_avg_sq"] = b2 * v_bar
    g_bar = g_bar + (1 - b1) * m_bar + 2 * (1 - b2) * g * v_bar

    theta_bar, G_bar = _prepare_vjp(theta, g_bar, tb, hyper, bars)
    return theta_bar, G_bar, state_bar, zero_missing_bars(bars, hyper, _HYPER_NAMES)


def nadam_step_jvp(
    theta: Tensor,
    G: Tensor,
    state: State,
    hyper: Hyper,
    theta_dot: Tensor,
    G_dot: Tensor,
    state_dot: State,
    hyper_dot: Mapping[str, Tensor],
) -> tuple[Tensor, State]:
    """Jacobian-vector product of :func:`nadam_step` (Note [Forward-mode derivatives of a step]).

    With :math:`\\pi_t = 0.96^{t\\psi}`, :math:`P'' = P'\\mu_{t+1}`, :math:`c_2 = 1 - \\beta_2^t`,
    :math:`s = \\sqrt{v'/c_2}`, :math:`d = s + \\epsilon`, :math:`c_g = -\\eta (1 - \\mu_t)/(1 - P')`,
    :math:`c_m = -\\eta\\mu_{t+1}/(1 - P'')`, and :math:`\\dot m'`, :math:`\\dot v'` as for Adam:

    .. math::
        \\dot\\mu_t &= \\dot\\beta_1 (1 - \\tfrac12 \\pi_t) - \\tfrac12 \\beta_1 \\pi_t\\, t \\ln 0.96\\, \\dot\\psi
        \\text{ (and } \\dot\\mu_{t+1} \\text{ at } t + 1), \\quad
        \\dot P' = \\dot P \\mu_t + P \\dot\\mu_t, \\quad \\dot P'' = \\dot P' \\mu_{t+1} + P' \\dot\\mu_{t+1} \\\\
        \\dot c_g &= -\\dot\\eta (1 - \\mu_t)/(1 - P') + \\eta \\dot\\mu_t / (1 - P') + c_g \\dot P' / (1 - P') \\\\
        \\dot c_m &= -\\dot\\eta \\mu_{t+1}/(1 - P'') - \\eta \\dot\\mu_{t+1} / (1 - P'') + c_m \\dot P'' / (1 - P'') \\\\
        \\dot s &= (\\dot v' / c_2 + \\beta_2^{t-1} t \\dot\\beta_2\\, v' / c_2^2) / (2 s)
        \\text{ (0 where } s = 0), \\quad \\dot d = \\dot s + \\dot\\epsilon \\\\
        \\dot\\theta' &= \\dot\\theta_1 + (\\dot c_g g + c_g \\dot g + \\dot c_m m' + c_m \\dot m') / d
        - (c_g g + c_m m') \\dot d / d^2

    The roundings of :math:`\\mu_t` and :math:`P'` to torch's scalar dtype have derivative 1
    (Note [Scalar state precision]), and the tangent of ``mu_product`` is shaped like it (element-
    shaped when ``beta1`` or ``momentum_decay`` is learned per element).
    """
    b1, b2, lr, eps, md = hyper["beta1"], hyper["beta2"], hyper["lr"], hyper["eps"], hyper["momentum_decay"]
    g, _, t = _prepare(theta, G, state, hyper)
    g_dot, theta1_dot = _prepare_jvp(theta, theta_dot, G_dot, hyper, hyper_dot)
    b1_dot, b2_dot, lr_dot = (hyper_dot_of(hyper, hyper_dot, n) for n in ("beta1", "beta2", "lr"))
    md_dot = hyper_dot_of(hyper, hyper_dot, "momentum_decay")
    P = state["mu_product"]
    bc2 = 1 - b2**t
    mu, pow_t = _momentum(b1, md, t)
    mu_n, pow_n = _momentum(b1, md, t + 1)

    def momentum_dot(power: Any, k: float) -> Dot:  # mu_k = b1 (1 - 0.5 * 0.96^(k psi))
        return add_dots(mul_dot(b1_dot, lambda: 1.0 - 0.5 * power),
                        mul_dot(md_dot, lambda: -0.5 * _LN_096 * k * b1 * power))

    mu_dot, mu_n_dot = momentum_dot(pow_t, t), momentum_dot(pow_n, t + 1)
    mu_r = round_to_torch_scalar(mu)
    P1 = round_to_torch_scalar(P * mu_r)  # the roundings with derivative 1
    P1_dot = add_dots(mul_dot(state_dot_of(state, state_dot, "mu_product"), mu_r), mul_dot(mu_dot, P))
    m_next = torch.lerp(state["exp_avg"], g, 1 - b1)
    v_next = state["exp_avg_sq"] * b2 + (1 - b2) * (g * g)
    m_next_dot, v_next_dot = _moments_jvp(g, g_dot, state, state_dot, hyper, hyper_dot)
    s = (v_next / bc2).sqrt()
    denom = s + eps
    w_dot = add_dots(v_next_dot / bc2, mul_dot(b2_dot, lambda: t * b2 ** (t - 1) * v_next / (bc2 * bc2)))
    denom_dot = add_dots(_sqrt_jvp(s, w_dot), hyper_dot_of(hyper, hyper_dot, "eps"))
    P2 = P1 * mu_n
    P2_dot = add_dots(mul_dot(P1_dot, mu_n), mul_dot(mu_n_dot, P1))
    one_m_P1, one_m_P2 = 1.0 - P1, 1.0 - P2
    coef_g = -lr * (1.0 - mu) / one_m_P1
    coef_m = -lr * mu_n / one_m_P2
    coef_g_dot = add_dots(mul_dot(lr_dot, lambda: -(1.0 - mu) / one_m_P1), mul_dot(mu_dot, lambda: lr / one_m_P1),
                          mul_dot(P1_dot, lambda: coef_g / one_m_P1))
    coef_m_dot = add_dots(mul_dot(lr_dot, lambda: -mu_n / one_m_P2), mul_dot(mu_n_dot, lambda: -lr / one_m_P2),
                          mul_dot(P2_dot, lambda: coef_m / one_m_P2))
    # theta' = theta1 + (c_g g + c_m m') / d
    num = coef_g * g + coef_m * m_next
    num_dot = add_dots(coef_g * g_dot, coef_m * m_next_dot, mul_dot(coef_g_dot, g), mul_dot(coef_m_dot, m_next))
    assert num_dot is not None
    theta_next_dot = add_dots(theta1_dot, (num_dot - num * denom_dot / denom) / denom)
    return dense_dot(theta_next_dot, theta), {"mu_product": dense_dot(P1_dot, P1),
                                              "exp_avg": dense_dot(m_next_dot, m_next),
                                              "exp_avg_sq": dense_dot(v_next_dot, v_next)}


NADAM = DiffOptimizer(
    name="NAdam",
    torch_cls=torch.optim.NAdam,
    step=nadam_step,
    step_vjp=nadam_step_vjp,
    step_jvp=nadam_step_jvp,
    hyper=HYPER,
    flags=(MAXIMIZE, Flag("decoupled_weight_decay", why="it switches between two update rules")),
    state=(StateEntry("mu_product", init=1.0, scalar=True), StateEntry("exp_avg"), StateEntry("exp_avg_sq")),
    counts_steps=True,
    tensor_step_count=True,
    notes="mu_product rounded as torch keeps it (Note [Scalar state precision]); finite derivative at a "
          "zero second moment (Note [Adam at a zero second moment]).",
)

__all__ = ["NADAM", "nadam_step", "nadam_step_jvp", "nadam_step_vjp"]
