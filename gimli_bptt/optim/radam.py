# SPDX-License-Identifier: Apache-2.0
"""Differentiable ``torch.optim.RAdam``: the variance rectification, decoupled weight decay, maximize."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from .adam import _moments_jvp, _prepare, _prepare_jvp, _prepare_vjp, _sqrt, _sqrt_jvp
from .._typing import Hyper, State
from .adjoints import add_bar, add_dots, dense_dot, hyper_dot_of, is_learned, mul_dot, zero_missing_bars
from .base import DiffOptimizer
from .declarations import MAXIMIZE, Flag, StateEntry, betas, eps, lr, weight_decay

HYPER = (lr(), *betas(), eps(), weight_decay())
_HYPER_NAMES = tuple(h.name for h in HYPER)
#: The switch of torch.optim.RAdam: the update is rectified where rho_t > 5.
RHO_SWITCH = 5.0


def _select(on: Any, a: Any, b: Any) -> Any:
    """``a`` where ``on`` else ``b``: a Python branch for a bool, ``torch.where`` for a mask."""
    if isinstance(on, Tensor):
        return torch.where(on, a, b)
    return a if on else b


def _rho(b2: Any, t: float) -> tuple[Any, Any, Any]:
    """``(rho_inf, rho_t, rectified)`` of step t: the SMA lengths and whether rho_t > 5."""
    bc2 = 1 - b2**t
    rho_inf = 2 / (1 - b2) - 1
    rho_t = rho_inf - 2 * t * (b2**t) / bc2
    return rho_inf, rho_t, rho_t > RHO_SWITCH


def _rect(rho_inf: Any, rho_t: Any, on: Any) -> Any:
    """The rectification term; where it is off, it is evaluated at a harmless point (so that no NaN
    of the unused branch reaches a derivative through ``torch.where``)."""
    if isinstance(on, Tensor):
        rho_t = torch.where(on, rho_t, 6.0)
        rho_inf = torch.where(on, rho_inf, 7.0)
    elif not on:
        return 1.0
    return ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5


def radam_step(theta: Tensor, G: Tensor, state: State, hyper: Hyper) -> tuple[Tensor, State]:
    """One RAdam step on one tensor, out of place, as ``torch.optim.RAdam`` makes it.

    .. math::
        m' &= \\beta_1 m + (1 - \\beta_1) g, \\quad v' = \\beta_2 v + (1 - \\beta_2) g^2, \\quad
        c_1 = 1 - \\beta_1^t, \\quad c_2 = 1 - \\beta_2^t \\\\
        \\rho_\\infty &= \\frac{2}{1 - \\beta_2} - 1, \\quad
        \\rho_t = \\rho_\\infty - \\frac{2 t \\beta_2^t}{c_2}, \\quad
        r_t = \\sqrt{\\frac{(\\rho_t - 4)(\\rho_t - 2)\\rho_\\infty}{(\\rho_\\infty - 4)(\\rho_\\infty - 2)\\rho_t}} \\\\
        \\theta' &= \\theta_1 - \\eta \\frac{m'}{c_1} \\cdot
        \\begin{cases} r_t \\sqrt{c_2} / (\\sqrt{v'} + \\epsilon) & \\rho_t > 5 \\\\ 1 & \\text{otherwise} \\end{cases}

    with :math:`g` and :math:`\\theta_1` as for Adam (coupled or decoupled weight decay).
    A ``beta2`` learned per element switches per element.
    """
    b1, b2, lr, eps = hyper["beta1"], hyper["beta2"], hyper["lr"], hyper["eps"]
    g, theta1, t = _prepare(theta, G, state, hyper)
    m_next = torch.lerp(state["exp_avg"], g, 1 - b1)
    v_next = state["exp_avg_sq"] * b2 + (1 - b2) * (g * g)
    bias_correction1 = 1 - b1**t
    bias_correction2 = 1 - b2**t
    bias_corrected = m_next / bias_correction1
    rho_inf, rho_t, on = _rho(b2, t)
    new_state: State = {"step": t, "exp_avg": m_next, "exp_avg_sq": v_next}
    if isinstance(on, Tensor) or on:
        adaptive = bias_correction2**0.5 / (_sqrt(v_next) + eps)
        factor = _select(on, adaptive * _rect(rho_inf, rho_t, on), 1.0)
        return theta1 - bias_corrected * lr * factor, new_state
    return theta1 - bias_corrected * lr, new_state


def radam_step_vjp(
    theta: Tensor,
    G: Tensor,
    state: State,
    hyper: Hyper,
    theta_next_bar: Tensor,
    state_next_bar: State,
) -> tuple[Tensor, Tensor, State, dict[str, Tensor]]:
    """Vector-Jacobian product of :func:`radam_step`.

    With :math:`\\hat m = m'/c_1`, :math:`F = \\eta A r_t` (rectified, :math:`A = \\sqrt{c_2}/(s + \\epsilon)`,
    :math:`s = \\sqrt{v'}`) or :math:`F = \\eta`:

    .. math::
        \\bar{\\hat m} &= -F \\bar\\theta', \\quad \\bar F = -\\hat m \\bar\\theta', \\quad
        \\bar m'_{tot} = \\bar m' + \\bar{\\hat m} / c_1, \\quad
        \\bar c_1 = -\\bar{\\hat m} m' / c_1^2 \\\\
        \\bar A &= \\eta r_t \\bar F, \\quad \\bar\\epsilon = -\\bar A A / (s + \\epsilon), \\quad
        \\bar v'_{tot} = \\bar v' + \\bar\\epsilon / (2 s), \\quad
        \\bar c_2 = \\bar A A / (2 c_2) \\\\
        \\bar r_t &= \\eta A \\bar F, \\quad
        \\bar\\rho_t = \\tfrac12 r_t \\bar r_t \\left(\\frac{1}{\\rho_t - 4} + \\frac{1}{\\rho_t - 2} - \\frac{1}{\\rho_t}\\right), \\quad
        \\bar\\rho_\\infty = \\bar\\rho_t + \\tfrac12 r_t \\bar r_t \\left(\\frac{1}{\\rho_\\infty} - \\frac{1}{\\rho_\\infty - 4} - \\frac{1}{\\rho_\\infty - 2}\\right) \\\\
        \\bar\\beta_2 &\\mathrel{+}= \\bar\\rho_\\infty \\frac{2}{(1 - \\beta_2)^2}
        - \\bar\\rho_t \\frac{2 t^2 \\beta_2^{t-1}}{c_2^2} - \\bar c_2 t \\beta_2^{t-1} + (v - g^2) \\bar v'_{tot}

    Note [RAdam's rectification switch]: the update is piecewise in :math:`\\rho_t`, a function of
    ``beta2`` and the step only (not of the gradients). We differentiate the branch taken: where
    :math:`\\rho_t \\le 5` neither ``eps`` nor the rectification has a path to the output and
    ``beta2`` acts only through :math:`v'`. At :math:`\\rho_t = 5` exactly the update jumps (r_t
    is not 1 there), so no derivative in ``beta2`` exists at the switch itself; like torch
    (a strict test) we take the unrectified branch there. The tests stay away from it.
    """
    b1, b2, lr, eps = hyper["beta1"], hyper["beta2"], hyper["lr"], hyper["eps"]
    g, _, t = _prepare(theta, G, state, hyper)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m_next = torch.lerp(m, g, 1 - b1)
    v_next = v * b2 + (1 - b2) * (g * g)
    bc1 = 1 - b1**t
    bc2 = 1 - b2**t
    hat_m = m_next / bc1
    rho_inf, rho_t, on = _rho(b2, t)
    any_on = isinstance(on, Tensor) or on
    tb = theta_next_bar
    bars: dict[str, Tensor] = {}
    state_bar: State = {}
    v_bar = None

    if any_on:
        s = v_next.sqrt()
        sqrt_bc2 = bc2**0.5
        den = s + eps
        A = sqrt_bc2 / den
        r = _rect(rho_inf, rho_t, on)
        F = _select(on, lr * A * r, lr)
        F_bar = -hat_m * tb
        hat_m_bar = -F * tb
        add_bar(bars, hyper, "lr", lambda: F_bar * _select(on, A * r, 1.0))
        A_bar = _select(on, lr * r * F_bar, 0.0)
        den_bar = -A_bar * A / den
        add_bar(bars, hyper, "eps", den_bar)
        positive = s > 0
        s_safe = torch.where(positive, s, torch.ones_like(s))
        v_bar = torch.where(positive, den_bar / (2 * s_safe), torch.zeros_like(s))
        if is_learned(b2):
            bc2_bar = A_bar * A / (2 * bc2)  # A = bc2^(1/2) / den
            r_bar = _select(on, lr * A * F_bar, 0.0)
            rho_t_s = torch.where(on, rho_t, 6.0) if isinstance(on, Tensor) else rho_t
            rho_inf_s = torch.where(on, rho_inf, 7.0) if isinstance(on, Tensor) else rho_inf
            half = 0.5 * r * r_bar
            rho_t_bar = half * (1 / (rho_t_s - 4) + 1 / (rho_t_s - 2) - 1 / rho_t_s)
            rho_inf_bar = rho_t_bar + half * (1 / rho_inf_s - 1 / (rho_inf_s - 4) - 1 / (rho_inf_s - 2))
            add_bar(bars, hyper, "beta2", lambda: rho_inf_bar * 2 / ((1 - b2) * (1 - b2))
                    - rho_t_bar * 2 * t * t * b2 ** (t - 1) / (bc2 * bc2) - bc2_bar * t * b2 ** (t - 1))
    else:
        hat_m_bar = -lr * tb
        add_bar(bars, hyper, "lr", lambda: -hat_m * tb)

    m_bar = hat_m_bar / bc1
    carried = state_next_bar.get("exp_avg")
    if carried is not None:
        m_bar = m_bar + carried
    carried = state_next_bar.get("exp_avg_sq")
    if carried is not None:
        v_bar = carried if v_bar is None else v_bar + carried
    if is_learned(b1):
        bc1_bar = -hat_m_bar * m_next / (bc1 * bc1)
        add_bar(bars, hyper, "beta1", -bc1_bar * t * b1 ** (t - 1) + (m - g) * m_bar)
    state_bar["exp_avg"] = b1 * m_bar
    g_bar = (1 - b1) * m_bar
    if v_bar is not None:
        add_bar(bars, hyper, "beta2", lambda: (v - g * g) * v_bar)
        state_bar["exp_avg_sq"] = b2 * v_bar
        g_bar = g_bar + 2 * (1 - b2) * g * v_bar

    theta_bar, G_bar = _prepare_vjp(theta, g_bar, tb, hyper, bars)
    return theta_bar, G_bar, state_bar, zero_missing_bars(bars, hyper, _HYPER_NAMES)


def radam_step_jvp(
    theta: Tensor,
    G: Tensor,
    state: State,
    hyper: Hyper,
    theta_dot: Tensor,
    G_dot: Tensor,
    state_dot: State,
    hyper_dot: Mapping[str, Tensor],
) -> tuple[Tensor, State]:
    """Jacobian-vector product of :func:`radam_step` (Note [Forward-mode derivatives of a step]).

    With :math:`\\hat m = m'/c_1`, the rectified factor :math:`f = A r_t`,
    :math:`A = \\sqrt{c_2}/(s + \\epsilon)`, :math:`s = \\sqrt{v'}`, and :math:`\\dot m'`,
    :math:`\\dot v'` as for Adam:

    .. math::
        \\dot{\\hat m} &= \\dot m' / c_1 + \\hat m\\, t \\beta_1^{t-1} \\dot\\beta_1 / c_1, \\quad
        \\dot\\rho_\\infty = \\frac{2 \\dot\\beta_2}{(1 - \\beta_2)^2}, \\quad
        \\dot\\rho_t = \\dot\\rho_\\infty - \\frac{2 t^2 \\beta_2^{t-1}}{c_2^2} \\dot\\beta_2 \\\\
        \\dot r_t &= \\tfrac12 r_t \\left[\\dot\\rho_t \\left(\\frac{1}{\\rho_t - 4} + \\frac{1}{\\rho_t - 2} - \\frac{1}{\\rho_t}\\right)
        + \\dot\\rho_\\infty \\left(\\frac{1}{\\rho_\\infty} - \\frac{1}{\\rho_\\infty - 4} - \\frac{1}{\\rho_\\infty - 2}\\right)\\right] \\\\
        \\dot A &= A \\left(\\frac{\\dot c_2}{2 c_2} - \\frac{\\dot s + \\dot\\epsilon}{s + \\epsilon}\\right), \\quad
        \\dot c_2 = -t \\beta_2^{t-1} \\dot\\beta_2, \\quad \\dot s = \\dot v' / (2 s) \\text{ (0 where } s = 0) \\\\
        \\dot\\theta' &= \\dot\\theta_1 - \\dot{\\hat m}\\, \\eta f - \\hat m (\\dot\\eta f + \\eta (\\dot A r_t + A \\dot r_t))
        \\text{ where } \\rho_t > 5, \\text{ else }
        \\dot\\theta_1 - \\dot{\\hat m}\\, \\eta - \\hat m \\dot\\eta

    The branch taken is differentiated, per element for a ``beta2`` learned per element, and the
    unused branch's terms are formed at the VJP's harmless point (Note [RAdam's rectification
    switch]).
    """
    b1, b2, lr, eps = hyper["beta1"], hyper["beta2"], hyper["lr"], hyper["eps"]
    g, _, t = _prepare(theta, G, state, hyper)
    g_dot, theta1_dot = _prepare_jvp(theta, theta_dot, G_dot, hyper, hyper_dot)
    b1_dot, b2_dot, lr_dot = (hyper_dot_of(hyper, hyper_dot, n) for n in ("beta1", "beta2", "lr"))
    m_next = torch.lerp(state["exp_avg"], g, 1 - b1)
    v_next = state["exp_avg_sq"] * b2 + (1 - b2) * (g * g)
    m_next_dot, v_next_dot = _moments_jvp(g, g_dot, state, state_dot, hyper, hyper_dot)
    bc1 = 1 - b1**t
    bc2 = 1 - b2**t
    hat_m = m_next / bc1
    hat_m_dot = add_dots(m_next_dot / bc1, mul_dot(b1_dot, lambda: hat_m * t * b1 ** (t - 1) / bc1))
    assert hat_m_dot is not None
    rho_inf, rho_t, on = _rho(b2, t)
    state_next_dot: State = {"exp_avg": dense_dot(m_next_dot, m_next), "exp_avg_sq": dense_dot(v_next_dot, v_next)}
    if not (isinstance(on, Tensor) or on):
        theta_next_dot = add_dots(theta1_dot, -lr * hat_m_dot, mul_dot(lr_dot, -hat_m))
        return dense_dot(theta_next_dot, theta), state_next_dot
    s = v_next.sqrt()
    den = s + eps
    A = bc2**0.5 / den
    r = _rect(rho_inf, rho_t, on)
    factor = _select(on, A * r, 1.0)
    den_dot = add_dots(_sqrt_jvp(s, v_next_dot), hyper_dot_of(hyper, hyper_dot, "eps"))
    A_dot = add_dots(-A * den_dot / den, mul_dot(b2_dot, lambda: -A * t * b2 ** (t - 1) / (2 * bc2)))
    assert A_dot is not None
    if b2_dot is not None:
        # rho_t and rho_inf at the VJP's harmless point where the update is not rectified
        rho_t_s = torch.where(on, rho_t, 6.0) if isinstance(on, Tensor) else rho_t
        rho_inf_s = torch.where(on, rho_inf, 7.0) if isinstance(on, Tensor) else rho_inf
        rho_inf_dot = b2_dot * (2 / ((1 - b2) * (1 - b2)))
        rho_t_dot = rho_inf_dot - b2_dot * (2 * t * t * b2 ** (t - 1) / (bc2 * bc2))
        r_dot = 0.5 * r * (rho_t_dot * (1 / (rho_t_s - 4) + 1 / (rho_t_s - 2) - 1 / rho_t_s)
                           + rho_inf_dot * (1 / rho_inf_s - 1 / (rho_inf_s - 4) - 1 / (rho_inf_s - 2)))
        factor_dot = A_dot * r + A * r_dot
    else:
        factor_dot = A_dot * r
    factor_dot = _select(on, factor_dot, 0.0)
    theta_next_dot = add_dots(theta1_dot, -(lr * factor) * hat_m_dot, -lr * hat_m * factor_dot,
                              mul_dot(lr_dot, lambda: -hat_m * factor))
    return dense_dot(theta_next_dot, theta), state_next_dot


RADAM = DiffOptimizer(
    name="RAdam",
    torch_cls=torch.optim.RAdam,
    step=radam_step,
    step_vjp=radam_step_vjp,
    step_jvp=radam_step_jvp,
    hyper=HYPER,
    flags=(MAXIMIZE, Flag("decoupled_weight_decay", why="it switches between two update rules")),
    state=(StateEntry("exp_avg"), StateEntry("exp_avg_sq")),
    counts_steps=True,
    notes="The branch taken at the rectification switch rho_t > 5 is differentiated "
          "(Note [RAdam's rectification switch]); finite derivative at a zero second moment.",
)

__all__ = ["RADAM", "RHO_SWITCH", "radam_step", "radam_step_jvp", "radam_step_vjp"]
