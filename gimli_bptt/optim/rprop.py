# SPDX-License-Identifier: Apache-2.0
"""Differentiable ``torch.optim.Rprop``: sign-based steps with adaptive, clamped step sizes; maximize."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from .._typing import Hyper, State
from ..metaparams.declaration import Hyperparameter
from .adjoints import add_bar, add_dots, dense_dot, hyper_dot_of, mul_dot, state_dot_of, where_dot, zero_missing_bars
from .base import DiffOptimizer
from .declarations import MAXIMIZE, StateEntry, lr

HYPER = (lr(),
         Hyperparameter("etaminus", option="etas", index=0, high=1.0, doc="step-size factor after a sign change"),
         Hyperparameter("etaplus", option="etas", index=1, low=1.0, doc="step-size factor without a sign change"),
         Hyperparameter("step_size_min", option="step_sizes", index=0, doc="smallest step size"),
         Hyperparameter("step_size_max", option="step_sizes", index=1, doc="largest step size"))
_HYPER_NAMES = tuple(h.name for h in HYPER)


def _step_size_used(theta: Tensor, state: State, hyper: Hyper) -> Tensor:
    """The step sizes before this step's update: ``lr`` everywhere at the first step (Note [Lazy
    first step size] in :mod:`gimli_bptt.optim.asgd`), the state's afterwards."""
    if float(state["step"]) == 0.0:
        return torch.zeros_like(theta) + hyper["lr"]
    return state["step_size"]


def _clamp(x: Tensor, lo: Any, hi: Any) -> Tensor:
    """``torch.clamp(x, lo, hi)``'s values (``min(max(x, lo), hi)``), whose derivative gives a tie at a
    bound to ``x`` (inside) on every torch.

    Rprop's step sizes settle exactly on a bound and meet it again, so ties are common. torch 2.13
    differentiates ``clamp`` so; torch 2.14 splits a tie with a tensor bound in halves and gives one
    with a number bound to the bound. Selecting with ``where`` keeps the convention of
    :func:`rprop_step_vjp` and :func:`rprop_step_jvp` for autograd through :func:`rprop_step` too.
    """
    lo = torch.as_tensor(lo, dtype=x.dtype, device=x.device)
    hi = torch.as_tensor(hi, dtype=x.dtype, device=x.device)
    above = torch.where(x < lo, lo, x)
    return torch.where(above > hi, hi, above)


def _signs(G: Tensor, state: State, hyper: Hyper) -> tuple[Tensor, Tensor, Tensor]:
    """``(g, sign of g * prev, the factor etaplus / etaminus / 1)``."""
    g = -G if hyper["maximize"] else G
    sign = (g * state["prev"]).sign()
    # A tensor operand first, so that float etas keep their float64 value (where of two Python
    # scalars would give the default dtype).
    factor = torch.where(sign > 0, hyper["etaplus"], torch.where(sign < 0, hyper["etaminus"], torch.ones_like(g)))
    return g, sign, factor


def rprop_step(theta: Tensor, G: Tensor, state: State, hyper: Hyper) -> tuple[Tensor, State]:
    """One Rprop step on one tensor, out of place, as ``torch.optim.Rprop`` makes it.

    .. math::
        g &= \\pm G, \\quad s = \\operatorname{sign}(g \\cdot g_{prev}), \\quad
        f = \\eta_+ \\,(s > 0),\\; \\eta_- \\,(s < 0),\\; 1 \\,(s = 0) \\\\
        \\delta' &= \\operatorname{clamp}(\\delta f, \\delta_{min}, \\delta_{max}), \\quad
        \\tilde g = 0 \\text{ where } s < 0 \\text{, else } g \\\\
        \\theta' &= \\theta - \\operatorname{sign}(\\tilde g) \\, \\delta', \\quad g_{prev}' = \\tilde g
    """
    g, sign, factor = _signs(G, state, hyper)
    step_size = _clamp(_step_size_used(theta, state, hyper) * factor, hyper["step_size_min"], hyper["step_size_max"])
    g_masked = torch.where(sign < 0, torch.zeros_like(g), g)
    theta_next = theta - g_masked.sign() * step_size
    return theta_next, {"step": float(state["step"]) + 1.0, "prev": g_masked, "step_size": step_size}


def rprop_step_vjp(
    theta: Tensor,
    G: Tensor,
    state: State,
    hyper: Hyper,
    theta_next_bar: Tensor,
    state_next_bar: State,
) -> tuple[Tensor, Tensor, State, dict[str, Tensor]]:
    """Vector-Jacobian product of :func:`rprop_step`.

    .. math::
        \\bar\\delta'_{tot} &= \\bar\\delta' - \\operatorname{sign}(\\tilde g) \\bar\\theta', \\quad
        \\bar x = \\bar\\delta'_{tot} [\\delta_{min} \\le \\delta f \\le \\delta_{max}], \\quad
        \\bar\\delta_{min} = \\bar\\delta'_{tot} [\\delta f < \\delta_{min}], \\quad
        \\bar\\delta_{max} = \\bar\\delta'_{tot} [\\delta f > \\delta_{max}] \\\\
        \\bar\\delta &= f \\bar x, \\quad \\bar\\eta_\\pm = \\delta \\bar x [s \\gtrless 0], \\quad
        \\bar g = \\bar g'_{prev} [s \\ge 0], \\quad \\bar\\theta = \\bar\\theta'

    Note [Rprop's derivatives]: the update is piecewise constant in the gradient and the
    previous gradient (signs): :math:`\\theta'` and :math:`\\delta'` have zero derivative in
    them, so :math:`\\bar G` is only the pass-through into :math:`g_{prev}'`, and the previous
    gradient gets no cotangent. The learning rate (through the first step size, Note [Lazy first
    step size]), ``etaplus`` and ``etaminus`` reach the output through the step sizes: every one is
    a product of them, clamped. The clamp (:func:`_clamp`) counts a tie at a bound as inside (the
    cotangent goes to the step size, not the bound; torch 2.13's ``clamp`` does so), so ``step_size_min`` and
    ``step_size_max`` are learnable too: they get the cotangent where they clamp. All these
    derivatives are exact away from sign changes and clamp ties.
    """
    g, sign, factor = _signs(G, state, hyper)
    step_size = _step_size_used(theta, state, hyper)
    lo, hi = hyper["step_size_min"], hyper["step_size_max"]
    pre = step_size * factor
    g_masked = torch.where(sign < 0, torch.zeros_like(g), g)
    ss_bar = -g_masked.sign() * theta_next_bar
    carried = state_next_bar.get("step_size")
    if carried is not None:
        ss_bar = ss_bar + carried
    zero = torch.zeros_like(ss_bar)
    bars: dict[str, Tensor] = {}
    add_bar(bars, hyper, "step_size_min", lambda: torch.where(pre < lo, ss_bar, zero))
    add_bar(bars, hyper, "step_size_max", lambda: torch.where(pre > hi, ss_bar, zero))
    pre_bar = torch.where((pre >= lo) & (pre <= hi), ss_bar, zero)
    add_bar(bars, hyper, "etaplus", lambda: torch.where(sign > 0, step_size * pre_bar, zero))
    add_bar(bars, hyper, "etaminus", lambda: torch.where(sign < 0, step_size * pre_bar, zero))
    state_bar: State = {}
    if float(state["step"]) == 0.0:
        add_bar(bars, hyper, "lr", lambda: factor * pre_bar)
    else:
        state_bar["step_size"] = factor * pre_bar
    carried = state_next_bar.get("prev")
    g_bar = zero if carried is None else torch.where(sign < 0, zero, carried)
    G_bar = -g_bar if hyper["maximize"] else g_bar
    return theta_next_bar, G_bar, state_bar, zero_missing_bars(bars, hyper, _HYPER_NAMES)


def rprop_step_jvp(
    theta: Tensor,
    G: Tensor,
    state: State,
    hyper: Hyper,
    theta_dot: Tensor,
    G_dot: Tensor,
    state_dot: State,
    hyper_dot: Mapping[str, Tensor],
) -> tuple[Tensor, State]:
    """Jacobian-vector product of :func:`rprop_step` (Note [Forward-mode derivatives of a step]).

    With :math:`x = \\delta f` the step size before the clamp and :math:`\\dot\\delta` the tangent of
    the step sizes used (``lr``'s everywhere at the first step, Note [Lazy first step size], else
    the state's):

    .. math::
        \\dot f &= \\dot\\eta_+ \\,(s > 0),\\; \\dot\\eta_- \\,(s < 0),\\; 0 \\,(s = 0), \\quad
        \\dot x = \\dot\\delta f + \\delta \\dot f \\\\
        \\dot\\delta' &= \\dot\\delta_{min} [x < \\delta_{min}], \\;
        \\dot\\delta_{max} [x > \\delta_{max}], \\; \\dot x \\text{ otherwise} \\\\
        \\dot\\theta' &= \\dot\\theta - \\operatorname{sign}(\\tilde g) \\dot\\delta', \\quad
        \\dot g'_{prev} = \\pm \\dot G \\,[s \\ge 0] \\;(0 \\text{ where } s < 0)

    The signs are piecewise constant, so neither G nor the previous gradient reaches θ' or the
    step sizes (Note [Rprop's derivatives]); the clamp passes the tangent of the side the VJP gives
    its cotangent to (a tie at a bound counts as inside).
    """
    g, sign, factor = _signs(G, state, hyper)
    step_size = _step_size_used(theta, state, hyper)
    lo, hi = hyper["step_size_min"], hyper["step_size_max"]
    pre = step_size * factor
    if float(state["step"]) == 0.0:
        step_size_dot = hyper_dot_of(hyper, hyper_dot, "lr")
    else:
        step_size_dot = state_dot_of(state, state_dot, "step_size")
    plus_dot, minus_dot = hyper_dot_of(hyper, hyper_dot, "etaplus"), hyper_dot_of(hyper, hyper_dot, "etaminus")
    factor_dot = where_dot(sign > 0, plus_dot, where_dot(sign < 0, minus_dot, None, g), g)
    pre_dot = add_dots(mul_dot(step_size_dot, factor), mul_dot(factor_dot, step_size))
    lo_dot, hi_dot = hyper_dot_of(hyper, hyper_dot, "step_size_min"), hyper_dot_of(hyper, hyper_dot, "step_size_max")
    step_size_next_dot = where_dot(pre < lo, lo_dot, where_dot(pre > hi, hi_dot, pre_dot, g), g)
    step_size_next = _clamp(pre, lo, hi)
    g_masked = torch.where(sign < 0, torch.zeros_like(g), g)
    theta_next_dot = add_dots(theta_dot, mul_dot(step_size_next_dot, lambda: -g_masked.sign()))
    g_dot = -G_dot if hyper["maximize"] else G_dot
    return dense_dot(theta_next_dot, theta), {"prev": dense_dot(where_dot(sign < 0, None, g_dot, g), g_masked),
                                              "step_size": dense_dot(step_size_next_dot, step_size_next)}


def _initial_step_size(param: Tensor, hyper: Hyper) -> Tensor:
    return torch.full_like(param, float(hyper["lr"]))


RPROP = DiffOptimizer(
    name="Rprop",
    torch_cls=torch.optim.Rprop,
    step=rprop_step,
    step_vjp=rprop_step_vjp,
    step_jvp=rprop_step_jvp,
    hyper=HYPER,
    flags=(MAXIMIZE,),
    state=(StateEntry("prev"), StateEntry("step_size", init=_initial_step_size)),
    counts_steps=True,
    notes="Piecewise constant in the gradients; lr, etas and the step-size bounds are differentiated "
          "through the step sizes (Note [Rprop's derivatives]).",
)

__all__ = ["RPROP", "rprop_step", "rprop_step_jvp", "rprop_step_vjp"]
