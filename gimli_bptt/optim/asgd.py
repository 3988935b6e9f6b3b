# SPDX-License-Identifier: Apache-2.0
"""Differentiable ``torch.optim.ASGD``: the decaying step size ``eta``, the average ``ax``, weight decay, maximize."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

from .._typing import Hyper, State
from ..metaparams.declaration import Hyperparameter
from .adjoints import (add_bar, add_dots, coupled_gradient_jvp, dense_dot, hyper_dot_of, is_active, is_learned, mul_dot,
                       reduce_like, state_dot_of, zero_missing_bars)
from .base import DiffOptimizer
from .declarations import MAXIMIZE, Flag, StateEntry, lr, weight_decay
from .scalars import round_to_torch_scalar, scalar_state_dtype

HYPER = (lr(), Hyperparameter("lambd", doc="decay term"),
         Hyperparameter("alpha", doc="the power of the eta update (an exponent, not a decay in [0, 1])"), weight_decay())
_HYPER_NAMES = tuple(h.name for h in HYPER)


def _eta_used(state: State, hyper: Hyper) -> Any:
    """The step size of this step.

    Note [Lazy first step size]: ``torch.optim`` creates the state at the first step, with
    ``eta = lr`` (ASGD) or ``step_size = lr`` everywhere (Rprop), from the group's learning rate at
    that moment. So at the first step (``state["step"] == 0``) the step size is the hyperparameter
    ``lr`` itself, not the state's copy: the same value, and the learned ``lr`` then gets its
    derivative through the first step (later steps reach it through the state).
    """
    if float(state["step"]) == 0.0:
        return round_to_torch_scalar(hyper["lr"])
    return state["eta"]


def _next_eta(hyper: Hyper, t: float) -> tuple[Any, Any]:
    """``(eta', 1 + lambd lr t)``: the step size torch computes for the next step, and its base."""
    lr, lambd, alpha = hyper["lr"], hyper["lambd"], hyper["alpha"]
    base = 1 + lambd * lr * t
    return lr / (base**alpha), base


def _next_mu(hyper: Hyper, t: float) -> float:
    return round_to_torch_scalar(1 / max(1, t - float(hyper["t0"])))


def asgd_step(theta: Tensor, G: Tensor, state: State, hyper: Hyper) -> tuple[Tensor, State]:
    """One ASGD step on one tensor, out of place, as ``torch.optim.ASGD`` makes it.

    .. math::
        g &= \\pm G + \\lambda_{wd} \\theta \\\\
        \\theta' &= \\theta (1 - \\lambda \\eta) - \\eta g \\\\
        a' &= a + \\mu (\\theta' - a) \\\\
        \\eta' &= \\frac{\\eta_0}{(1 + \\lambda \\eta_0 t)^\\alpha}, \\quad
        \\mu' = \\frac{1}{\\max(1, t - t_0)}

    with :math:`\\eta_0` the ``lr``, :math:`\\eta` and :math:`\\mu` from the state (Note [Lazy
    first step size]) and both rounded as torch keeps them (Note [Scalar state precision]).
    ``eta`` becomes element-shaped when ``lr``, ``lambd`` or ``alpha`` is learned per element.

    Note [ASGD's average]: torch copies :math:`\\theta'` into :math:`a'` where :math:`\\mu = 1`
    (``t <= t0 + 1``) and takes the formula otherwise; the formula at :math:`\\mu = 1` is the same
    value (up to one rounding), so it is used throughout, a smooth function of :math:`\\mu`.
    ``t0`` is a step threshold that only reaches :math:`a'` (which never feeds back into
    :math:`\\theta`): it is a fixed option, not a learnable hyperparameter.
    """
    lambd, wd = hyper["lambd"], hyper["weight_decay"]
    t = float(state["step"]) + 1.0
    g = -G if hyper["maximize"] else G
    if is_active(wd):
        g = g + wd * theta
    eta = _eta_used(state, hyper)
    theta_next = theta * (1 - lambd * eta) - eta * g
    ax = state["ax"]
    ax_next = ax + (theta_next - ax) * state["mu"]
    eta_next, _ = _next_eta(hyper, t)
    eta_next = round_to_torch_scalar(eta_next)
    dtype = state["mu"].dtype
    if not isinstance(eta_next, Tensor):
        eta_next = torch.tensor(eta_next, dtype=dtype, device=theta.device)
    mu_next = torch.tensor(_next_mu(hyper, t), dtype=dtype, device=theta.device)
    return theta_next, {"step": t, "eta": eta_next, "mu": mu_next, "ax": ax_next}


def asgd_step_vjp(
    theta: Tensor,
    G: Tensor,
    state: State,
    hyper: Hyper,
    theta_next_bar: Tensor,
    state_next_bar: State,
) -> tuple[Tensor, Tensor, State, dict[str, Tensor]]:
    """Vector-Jacobian product of :func:`asgd_step`.

    With :math:`B = 1 + \\lambda\\eta_0 t`:

    .. math::
        \\bar\\theta'_{tot} &= \\bar\\theta' + \\mu \\bar a', \\quad \\bar a = (1 - \\mu) \\bar a', \\quad
        \\bar\\mu = \\langle \\theta' - a, \\bar a' \\rangle \\\\
        \\bar\\eta &= -\\langle \\lambda\\theta + g, \\bar\\theta'_{tot} \\rangle, \\quad
        \\bar\\lambda = -\\langle \\eta\\theta, \\bar\\theta'_{tot} \\rangle, \\quad
        \\bar g = -\\eta \\bar\\theta'_{tot}, \\quad
        \\bar\\theta = (1 - \\lambda\\eta) \\bar\\theta'_{tot} + \\lambda_{wd} \\bar g \\\\
        \\bar\\eta_0 &\\mathrel{+}= \\bar\\eta' B^{-\\alpha} (1 - \\alpha \\lambda \\eta_0 t / B), \\quad
        \\bar\\lambda \\mathrel{+}= -\\bar\\eta' \\alpha \\eta_0^2 t B^{-\\alpha - 1}, \\quad
        \\bar\\alpha = -\\bar\\eta' \\eta' \\ln B

    and at the first step :math:`\\bar\\eta` goes to ``lr`` (Note [Lazy first step size]);
    :math:`\\mu'` depends on nothing differentiable.
    """
    lr, lambd, alpha, wd = hyper["lr"], hyper["lambd"], hyper["alpha"], hyper["weight_decay"]
    t = float(state["step"]) + 1.0
    g = -G if hyper["maximize"] else G
    has_wd = is_active(wd)
    if has_wd:
        g = g + wd * theta
    eta = _eta_used(state, hyper)
    mu, ax = state["mu"], state["ax"]
    bars: dict[str, Tensor] = {}
    state_bar: State = {}

    theta_next_bar_tot = theta_next_bar
    ax_next_bar = state_next_bar.get("ax")
    if ax_next_bar is not None:
        theta_next = theta * (1 - lambd * eta) - eta * g
        theta_next_bar_tot = theta_next_bar + mu * ax_next_bar
        state_bar["ax"] = (1 - mu) * ax_next_bar
        state_bar["mu"] = reduce_like((theta_next - ax) * ax_next_bar, mu)
    tb = theta_next_bar_tot
    eta_bar = -(lambd * theta + g) * tb
    add_bar(bars, hyper, "lambd", lambda: -eta * theta * tb)
    g_bar = -eta * tb
    if float(state["step"]) == 0.0:
        add_bar(bars, hyper, "lr", eta_bar)
    else:
        state_bar["eta"] = reduce_like(eta_bar, state["eta"])

    eta_next_bar = state_next_bar.get("eta")
    if eta_next_bar is not None and any(is_learned(hyper[n]) for n in ("lr", "lambd", "alpha")):
        eta_next, base = _next_eta(hyper, t)
        # eta' = lr B^-alpha, B = 1 + lambd lr t
        base_bar = -eta_next_bar * alpha * eta_next / base
        add_bar(bars, hyper, "lr", lambda: eta_next_bar * base ** (-alpha) + base_bar * lambd * t)
        add_bar(bars, hyper, "lambd", lambda: base_bar * lr * t)
        if is_learned(alpha):
            log_base = torch.log(base) if isinstance(base, Tensor) else math.log(base)
            add_bar(bars, hyper, "alpha", -eta_next_bar * eta_next * log_base)

    theta_bar = tb * (1 - lambd * eta)
    if has_wd:
        theta_bar = theta_bar + wd * g_bar
        add_bar(bars, hyper, "weight_decay", lambda: theta * g_bar)
    G_bar = -g_bar if hyper["maximize"] else g_bar
    return theta_bar, G_bar, state_bar, zero_missing_bars(bars, hyper, _HYPER_NAMES)


def asgd_step_jvp(
    theta: Tensor,
    G: Tensor,
    state: State,
    hyper: Hyper,
    theta_dot: Tensor,
    G_dot: Tensor,
    state_dot: State,
    hyper_dot: Mapping[str, Tensor],
) -> tuple[Tensor, State]:
    """Jacobian-vector product of :func:`asgd_step` (Note [Forward-mode derivatives of a step]).

    With :math:`B = 1 + \\lambda\\eta_0 t` and :math:`\\dot\\eta` the tangent of the step size used
    (that of ``lr`` at the first step, Note [Lazy first step size], else the state's):

    .. math::
        \\dot g &= \\pm \\dot G + \\lambda_{wd} \\dot\\theta + \\dot\\lambda_{wd} \\theta, \\quad
        \\dot\\theta' = (1 - \\lambda\\eta) \\dot\\theta - (\\dot\\lambda \\eta + \\lambda \\dot\\eta) \\theta
        - \\dot\\eta g - \\eta \\dot g \\\\
        \\dot a' &= (1 - \\mu) \\dot a + \\mu \\dot\\theta' + \\dot\\mu (\\theta' - a) \\\\
        \\dot\\eta' &= \\dot\\eta_0 B^{-\\alpha} - \\eta' \\alpha \\dot B / B - \\eta' \\ln B \\, \\dot\\alpha,
        \\quad \\dot B = t (\\dot\\lambda \\eta_0 + \\lambda \\dot\\eta_0), \\quad \\dot\\mu' = 0

    The roundings of :math:`\\eta` and :math:`\\eta'` to torch's scalar dtype have derivative 1
    (Note [Scalar state precision]); :math:`\\mu'` depends on nothing differentiable.
    """
    lr, lambd, alpha, wd = hyper["lr"], hyper["lambd"], hyper["alpha"], hyper["weight_decay"]
    t = float(state["step"]) + 1.0
    g = -G if hyper["maximize"] else G
    if is_active(wd):
        g = g + wd * theta
    g_dot = coupled_gradient_jvp(theta, theta_dot, G_dot, hyper, hyper_dot)
    lr_dot, lambd_dot, alpha_dot = (hyper_dot_of(hyper, hyper_dot, n) for n in ("lr", "lambd", "alpha"))
    eta = _eta_used(state, hyper)
    eta_dot = lr_dot if float(state["step"]) == 0.0 else state_dot_of(state, state_dot, "eta")
    theta_next = theta * (1 - lambd * eta) - eta * g
    theta_next_dot = add_dots(theta_dot * (1 - lambd * eta), -eta * g_dot, mul_dot(lambd_dot, lambda: -eta * theta),
                              mul_dot(eta_dot, lambda: -(lambd * theta + g)))
    assert theta_next_dot is not None
    ax, mu = state["ax"], state["mu"]
    ax_next = ax + (theta_next - ax) * mu
    ax_next_dot = add_dots(theta_next_dot * mu, mul_dot(state_dot_of(state, state_dot, "ax"), 1 - mu),
                           mul_dot(state_dot_of(state, state_dot, "mu"), lambda: theta_next - ax))
    eta_next, base = _next_eta(hyper, t)
    base_dot = add_dots(mul_dot(lambd_dot, lr * t), mul_dot(lr_dot, lambd * t))
    eta_next_dot = add_dots(mul_dot(lr_dot, lambda: base ** (-alpha)), mul_dot(base_dot, lambda: -eta_next * alpha / base),
                            mul_dot(alpha_dot, lambda: -eta_next * (torch.log(base) if isinstance(base, Tensor)
                                                                   else math.log(base))))
    mu_dtype = state["mu"].dtype  # the dtype of eta' and mu' where no hyperparameter is a tensor
    eta_like = eta_next if isinstance(eta_next, Tensor) else torch.zeros((), dtype=mu_dtype, device=theta.device)
    return dense_dot(theta_next_dot, theta), {
        "eta": dense_dot(eta_next_dot, eta_like),
        "mu": torch.zeros((), dtype=mu_dtype, device=theta.device),
        "ax": dense_dot(ax_next_dot, ax_next),
    }


def _initial_eta(param: Tensor, hyper: Hyper) -> Tensor:
    return torch.tensor(round_to_torch_scalar(float(hyper["lr"])), dtype=scalar_state_dtype(param), device=param.device)


ASGD = DiffOptimizer(
    name="ASGD",
    torch_cls=torch.optim.ASGD,
    step=asgd_step,
    step_vjp=asgd_step_vjp,
    step_jvp=asgd_step_jvp,
    hyper=HYPER,
    flags=(Flag("t0", kind=float, why="it only reaches the average ax, which never feeds back into θ "
                                     "(Note [ASGD's average])"), MAXIMIZE),
    state=(StateEntry("eta", init=_initial_eta, scalar=True), StateEntry("mu", init=1.0, scalar=True), StateEntry("ax")),
    counts_steps=True,
    notes="t0 is a fixed option (Note [ASGD's average]); eta and mu rounded as torch keeps them; "
          "the first step uses lr itself (Note [Lazy first step size]).",
)

__all__ = ["ASGD", "asgd_step", "asgd_step_jvp", "asgd_step_vjp"]
