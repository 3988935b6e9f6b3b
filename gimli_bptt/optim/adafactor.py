# SPDX-License-Identifier: Apache-2.0
"""Differentiable ``torch.optim.Adafactor``: factored second moments, relative step size, update clipping, maximize.

Note [Adafactor's eps1 when None]: ``torch.optim.Adafactor`` takes ``eps=(eps1, eps2)`` with
``eps1=None`` by default, which its step replaces by ``torch.finfo(param.dtype).eps`` (for the
first parameter of the group that has a gradient, and keeps that value for the rest of the
group). Here ``eps1`` is a float hyperparameter like the others: a group whose ``eps[0]`` is
None reads as the machine epsilon of the dtype of the group's first parameter (the default
dtype for a group without parameters), which is the value torch uses whenever a group's
parameters share one dtype. A learned ``eps1`` written back into the group replaces the None
with that float, which torch then uses as it is.

Note [Adafactor's kinks]: the step has five non-differentiable points, each a comparison of
two floats; the derivative there is that of the branch whose value torch takes, so it is a
one-sided derivative:

- :math:`\\rho = \\min(\\eta, t^{-1/2})`: the path goes to :math:`\\eta` when
  :math:`\\eta \\le t^{-1/2}` (Python's ``min`` returns its first argument at a tie);
- :math:`\\max(\\epsilon_2, \\mathrm{RMS}(\\theta))`: to :math:`\\epsilon_2` unless
  :math:`\\mathrm{RMS}(\\theta) > \\epsilon_2` (Python's ``max`` likewise). The RMS, a norm, is
  not differentiable at :math:`\\theta = 0`, but it is then never the branch taken while
  :math:`\\epsilon_2 \\ge 0`;
- :math:`\\max(\\bar R', \\epsilon_1)` and :math:`\\max(\\hat V, \\epsilon_1^2)` (torch's
  ``clamp_(min=...)``): to the clamped statistic when it is :math:`\\ge` the bound (as
  autograd differentiates ``clamp``), else to :math:`\\epsilon_1`;
- :math:`D = \\max(1, \\mathrm{RMS}(U)/d)`: to 1 unless :math:`\\mathrm{RMS}(U)/d > 1`.

Note [Adafactor's step size depends on θ]: ``torch.optim`` forms :math:`\\alpha` from
``param.norm(2).item()``, a Python number, but that number is a function of θ (before the weight
decay of the same step). The derivative here is that of the update map, so θ̄ has the term
:math:`\\bar r \\, \\theta / (n\\, \\mathrm{RMS}(\\theta))`; the same holds for :math:`D`'s
dependence on :math:`U`.

Note [Per-element beta2_decay on factored moments]: a matrix keeps one row and one column
statistic, not one per element, so a ``beta2_decay`` learned per element cannot be one decay
per statistic. The factored update is written as the mean of per-element running averages,
:math:`R'_i = \\frac1n \\sum_j \\big(R_i + w_{ij} (g_{ij}^2 - R_i)\\big)` (and :math:`C'_j` the
mean over :math:`i`), with :math:`w_{ij} = t^{\\tau_{ij}}`: each squared gradient enters its row
and column statistic with its own decay. For a decay shared by the tensor it is torch's
:math:`R' = R + w\\,(\\overline{g^2}_{row} - R)` exactly (up to rounding).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from .._typing import Hyper, State
from ..metaparams.declaration import Hyperparameter
from .adjoints import (add_bar, add_dots, dense_dot, hyper_dot_of, is_active, is_learned, mul_dot, state_dot_of,
                       zero_missing_bars)
from .base import DiffOptimizer
from .declarations import MAXIMIZE, StateEntry, lr, weight_decay

_HYPER = ("lr", "beta2_decay", "eps1", "eps2", "d", "weight_decay")


class Eps1(Hyperparameter):
    """Adafactor's ``eps[0]``, read as the dtype's machine epsilon where the group holds None
    (Note [Adafactor's eps1 when None])."""

    def read(self, group: Mapping[str, Any]) -> float:
        value = group.get(self.key, (None,))[0]
        if value is not None:
            return float(value)
        params: Sequence[Any] = group.get("params") or ()
        dtype = params[0].dtype if len(params) and isinstance(params[0], Tensor) else torch.get_default_dtype()
        return float(torch.finfo(dtype).eps)


def _first(x: Any, y: Any, take_x: Any) -> Any:
    """``x`` where ``take_x`` else ``y``, for floats or tensors (the value of a min or max whose
    derivative follows the branch taken, Note [Adafactor's kinks])."""
    if isinstance(take_x, Tensor):
        return torch.where(take_x, x, y)
    return x if take_x else y


def _forward(theta: Tensor, G: Tensor, state: State, hyper: Hyper) -> dict[str, Any]:
    """Every intermediate of one step (shared by :func:`adafactor_step` and its VJP)."""
    lr_, tau, e1, e2, d, wd = (hyper[n] for n in _HYPER)
    t = float(state["step"]) + 1.0
    g = -G if hyper["maximize"] else G
    n = theta.numel()
    w = t**tau  # one minus beta2_t: a float, or a tensor when beta2_decay is learned
    bound = 1 / (t**0.5)
    lr_wins = lr_ <= bound
    rho = _first(lr_, bound, lr_wins)
    r = torch.linalg.vector_norm(theta) / (n**0.5)
    r_wins = r > e2
    mx = torch.where(r_wins, r, e2)
    alpha = mx * rho
    decayed = is_active(wd)
    theta1 = theta * (1 - lr_ * wd) if decayed else theta
    g2 = g * g
    f: dict[str, Any] = dict(t=t, g=g, n=n, w=w, lr_wins=lr_wins, rho=rho, r=r, r_wins=r_wins, mx=mx, alpha=alpha,
                             decayed=decayed, g2=g2, factored=g.dim() > 1)
    if f["factored"]:
        R, C = state.get("row_var"), state.get("col_var")
        if R is None or C is None:
            R = g.new_zeros(g.shape[:-1] + (1,))
            C = g.new_zeros(g.shape[:-2] + (1, g.shape[-1]))
        R_next = R + (w * (g2 - R)).mean(dim=-1, keepdim=True)
        C_next = C + (w * (g2 - C)).mean(dim=-2, keepdim=True)
        mu = R_next.mean(dim=-2, keepdim=True)
        mu_wins = mu >= e1
        M = torch.where(mu_wins, mu, e1)
        V_hat = R_next * C_next / M
        f.update(R=R, C=C, R_next=R_next, C_next=C_next, mu=mu, mu_wins=mu_wins, M=M)
    else:
        V = state.get("variance")
        if V is None:
            V = torch.zeros_like(g)
        V_hat = torch.lerp(V, g2, w)
        f.update(V=V, V_next=V_hat)
    v_wins = V_hat >= e1 * e1
    Q = torch.where(v_wins, V_hat, e1 * e1)
    rsqrt_Q = Q.rsqrt()
    U = rsqrt_Q * g
    U_norm = torch.linalg.vector_norm(U)
    ratio = U_norm / ((n**0.5) * d)
    clipped = ratio > 1.0
    D = torch.where(clipped, ratio, 1.0)
    step_size = alpha / D
    f.update(V_hat=V_hat, v_wins=v_wins, Q=Q, rsqrt_Q=rsqrt_Q, U=U, U_norm=U_norm, ratio=ratio, clipped=clipped, D=D,
             step_size=step_size, theta_next=theta1 - step_size * U)
    return f


def adafactor_step(theta: Tensor, G: Tensor, state: State, hyper: Hyper) -> tuple[Tensor, State]:
    """One Adafactor step on one tensor, out of place, as ``torch.optim.Adafactor`` makes it.

    With :math:`t` the step count after this step, :math:`\\tau` = ``beta2_decay``, :math:`n`
    the number of elements and :math:`\\mathrm{RMS}(x) = \\lVert x \\rVert_2 / \\sqrt n`:

    .. math::
        g &= \\pm G, \\quad w = t^{\\tau}, \\quad \\rho = \\min(\\eta, 1/\\sqrt t), \\quad
        \\alpha = \\max(\\epsilon_2, \\mathrm{RMS}(\\theta))\\, \\rho \\\\
        \\theta_1 &= \\theta (1 - \\eta\\lambda) \\\\
        R' &= R + \\mathrm{mean}_{j}\\, w (g^2 - R), \\quad
        C' = C + \\mathrm{mean}_{i}\\, w (g^2 - C) \\quad
        \\text{(factored: } \\dim \\ge 2 \\text{, over the last two dims)} \\\\
        \\hat V &= R' C' / \\max(\\mathrm{mean}_i R', \\epsilon_1) \\text{ (factored), or }
        \\hat V = V' = V + w (g^2 - V) \\\\
        U &= g / \\sqrt{\\max(\\hat V, \\epsilon_1^2)}, \\quad
        D = \\max(1, \\mathrm{RMS}(U) / d) \\\\
        \\theta' &= \\theta_1 - (\\alpha / D)\\, U

    A fresh state holds no moments (torch creates them at the first step); the first step
    creates the row and column statistics of a tensor with two or more dimensions, the full
    second moment ``variance`` of a vector or a scalar. Learned values may be 0-d or shaped
    like the parameter (Note [Per-element beta2_decay on factored moments]).
    """
    f = _forward(theta, G, state, hyper)
    new_state: State = dict(state)
    new_state["step"] = f["t"]
    if f["factored"]:
        new_state["row_var"], new_state["col_var"] = f["R_next"], f["C_next"]
    else:
        new_state["variance"] = f["V_next"]
    return f["theta_next"], new_state


def adafactor_step_vjp(
    theta: Tensor,
    G: Tensor,
    state: State,
    hyper: Hyper,
    theta_next_bar: Tensor,
    state_next_bar: State,
) -> tuple[Tensor, Tensor, State, dict[str, Tensor]]:
    """Vector-Jacobian product of :func:`adafactor_step`.

    With :math:`s = \\alpha / D`, the branch masks of Note [Adafactor's kinks] and
    :math:`\\bar\\theta'` the incoming cotangent (sums over elements are implied wherever a
    scalar receives an element-wise cotangent):

    .. math::
        \\bar U &= -s \\bar\\theta' + \\bar\\nu\\, U / \\lVert U \\rVert, \\quad
        \\bar s = -U \\bar\\theta', \\quad \\bar\\alpha = \\bar s / D, \\quad
        \\bar D = -\\bar s \\alpha / D^2 \\\\
        \\bar\\nu &= [\\mathrm{RMS}(U) > d]\\, \\bar D / (\\sqrt n\\, d), \\quad
        \\bar d = -[\\mathrm{RMS}(U) > d]\\, \\bar D\\, \\mathrm{RMS}(U) / d^2 \\\\
        \\bar g &\\mathrel{+}= \\bar U / \\sqrt Q, \\quad \\bar Q = -\\tfrac12 \\bar U U / Q, \\quad
        \\bar{\\hat V} = [\\hat V \\ge \\epsilon_1^2] \\bar Q, \\quad
        \\bar\\epsilon_1 \\mathrel{+}= [\\hat V < \\epsilon_1^2]\\, 2 \\epsilon_1 \\bar Q \\\\
        \\bar R' &\\mathrel{+}= \\textstyle\\sum_j \\bar{\\hat V} C' / M
        + \\frac1m [\\mu \\ge \\epsilon_1] \\bar M, \\quad
        \\bar C' \\mathrel{+}= \\textstyle\\sum_i \\bar{\\hat V} R' / M, \\quad
        \\bar M = -\\textstyle\\sum \\bar{\\hat V} \\hat V / M \\\\
        \\bar R &= \\bar R' (1 - \\mathrm{mean}_j w), \\quad
        \\bar{g^2} = w (\\bar R' / n_{cols} + \\bar C' / n_{rows}), \\quad
        \\bar w = (g^2 - R) \\bar R' / n_{cols} + (g^2 - C) \\bar C' / n_{rows} \\\\
        \\bar\\tau &= \\bar w\\, w \\ln t, \\quad \\bar g \\mathrel{+}= 2 g\\, \\bar{g^2}, \\quad
        \\bar G = \\pm \\bar g \\\\
        \\bar\\rho &= \\bar\\alpha \\max(\\epsilon_2, r), \\quad
        \\bar\\eta = [\\eta \\le t^{-1/2}] \\bar\\rho - \\lambda \\theta \\bar\\theta', \\quad
        \\bar\\lambda = -\\eta\\theta\\bar\\theta' \\\\
        \\bar\\theta &= (1 - \\eta\\lambda) \\bar\\theta'
        + [r > \\epsilon_2]\\, \\textstyle\\sum(\\bar\\alpha \\rho)\\, \\theta / (n r), \\quad
        \\bar\\epsilon_2 = [r \\le \\epsilon_2]\\, \\bar\\alpha \\rho

    (the unfactored second moment: :math:`\\bar V = (1 - w) \\bar V'`,
    :math:`\\bar{g^2} = w \\bar V'`, :math:`\\bar w = (g^2 - V) \\bar V'`).
    """
    lr_, tau, e1, e2, d, wd = (hyper[n] for n in _HYPER)
    f = _forward(theta, G, state, hyper)
    t, g, n, w, U, D = f["t"], f["g"], f["n"], f["w"], f["U"], f["D"]
    tb = theta_next_bar
    bars: dict[str, Tensor] = {}
    state_bar: State = {}

    # theta' = theta1 - s U, s = alpha / D
    s_bar = -U * tb
    U_bar = -f["step_size"] * tb
    alpha_bar = s_bar / D
    D_bar = -s_bar * f["alpha"] / (D * D)
    # D = max(1, |U| / (sqrt(n) d))
    clipped = f["clipped"]
    ratio_bar = torch.where(clipped, D_bar, torch.zeros_like(D_bar))
    # (no branch on the values, so that the VJP runs under torch.func.vmap: where nothing is
    # clipped, ratio_bar is 0 and so is this term; the norm is replaced by 1 only where it is 0)
    norm_bar = (ratio_bar / ((n**0.5) * d)).sum()
    U_norm = f["U_norm"]
    U_bar = U_bar + norm_bar * U / torch.where(U_norm > 0, U_norm, torch.ones_like(U_norm))
    add_bar(bars, hyper, "d", lambda: -ratio_bar * f["ratio"] / d)
    # U = g / sqrt(Q), Q = max(V_hat, eps1^2)
    g_bar = U_bar * f["rsqrt_Q"]
    Q_bar = -0.5 * U_bar * U / f["Q"]
    zero = torch.zeros_like(Q_bar)
    V_hat_bar = torch.where(f["v_wins"], Q_bar, zero)
    add_bar(bars, hyper, "eps1", lambda: torch.where(f["v_wins"], zero, Q_bar) * (2 * e1))

    if f["factored"]:
        R, C, R_next, C_next, M = f["R"], f["C"], f["R_next"], f["C_next"], f["M"]
        rows, cols = g.shape[-2], g.shape[-1]
        # V_hat = R' C' / M, M = max(mean_i R', eps1)
        R_next_bar = (V_hat_bar * C_next / M).sum(dim=-1, keepdim=True)
        C_next_bar = (V_hat_bar * R_next / M).sum(dim=-2, keepdim=True)
        M_bar = (-V_hat_bar * f["V_hat"] / M).sum_to_size(M.shape)
        mu_bar = torch.where(f["mu_wins"], M_bar, torch.zeros_like(M_bar)).sum_to_size(f["mu"].shape)
        add_bar(bars, hyper, "eps1", lambda: torch.where(f["mu_wins"], torch.zeros_like(M_bar), M_bar))
        R_next_bar = R_next_bar + mu_bar / rows
        if state_next_bar.get("row_var") is not None:
            R_next_bar = R_next_bar + state_next_bar["row_var"]
        if state_next_bar.get("col_var") is not None:
            C_next_bar = C_next_bar + state_next_bar["col_var"]
        # R' = R + mean_j w (g^2 - R), C' = C + mean_i w (g^2 - C)
        W = torch.broadcast_to(torch.as_tensor(w, dtype=g.dtype, device=g.device), g.shape)
        Rb, Cb = R_next_bar / cols, C_next_bar / rows
        g2_bar = W * (Rb + Cb)
        if state.get("row_var") is not None:  # absent before the first step: no cotangent
            state_bar["row_var"] = R_next_bar - (W * Rb).sum(dim=-1, keepdim=True)
            state_bar["col_var"] = C_next_bar - (W * Cb).sum(dim=-2, keepdim=True)
        if is_learned(tau):
            w_bar = (f["g2"] - R) * Rb + (f["g2"] - C) * Cb
            add_bar(bars, hyper, "beta2_decay", w_bar * w * math.log(t))
    else:
        V = f["V"]
        V_next_bar = V_hat_bar
        carried = state_next_bar.get("variance")
        if carried is not None:
            V_next_bar = V_next_bar + carried
        # V' = V + w (g^2 - V)
        if state.get("variance") is not None:
            state_bar["variance"] = (1 - w) * V_next_bar
        g2_bar = w * V_next_bar
        if is_learned(tau):
            add_bar(bars, hyper, "beta2_decay", (f["g2"] - V) * V_next_bar * w * math.log(t))
    g_bar = g_bar + 2 * g * g2_bar

    # alpha = max(eps2, r) rho, rho = min(lr, 1/sqrt(t)), r = |theta| / sqrt(n)
    rho_bar = alpha_bar * f["mx"]
    mx_bar = alpha_bar * f["rho"]
    r_wins = f["r_wins"]
    add_bar(bars, hyper, "eps2", lambda: torch.where(r_wins, torch.zeros_like(mx_bar), mx_bar))
    add_bar(bars, hyper, "lr", lambda: torch.where(torch.as_tensor(f["lr_wins"]), rho_bar, torch.zeros_like(rho_bar)))
    theta_bar = tb
    if f["decayed"]:
        theta_bar = tb * (1 - lr_ * wd)
        add_bar(bars, hyper, "lr", lambda: -wd * theta * tb)
        add_bar(bars, hyper, "weight_decay", lambda: -lr_ * theta * tb)
    r_bar = torch.where(r_wins, mx_bar, torch.zeros_like(mx_bar)).sum()  # 0 where eps2 wins (no branch: vmap)
    r = torch.as_tensor(f["r"])
    theta_bar = theta_bar + (r_bar / (n * torch.where(r > 0, r, torch.ones_like(r)))) * theta
    G_bar = -g_bar if hyper["maximize"] else g_bar
    return theta_bar, G_bar, state_bar, zero_missing_bars(bars, hyper, _HYPER)


def adafactor_step_jvp(
    theta: Tensor,
    G: Tensor,
    state: State,
    hyper: Hyper,
    theta_dot: Tensor,
    G_dot: Tensor,
    state_dot: State,
    hyper_dot: Mapping[str, Tensor],
) -> tuple[Tensor, State]:
    """Jacobian-vector product of :func:`adafactor_step` (Note [Forward-mode derivatives of a step]).

    With :math:`r = \\mathrm{RMS}(\\theta)`, :math:`s = \\alpha / D` and the branch masks of Note
    [Adafactor's kinks] (each tangent follows the branch whose value torch takes, as the VJP's
    cotangent does):

    .. math::
        \\dot w &= w \\ln t\\, \\dot\\tau, \\quad
        \\dot\\rho = [\\eta \\le t^{-1/2}]\\, \\dot\\eta, \\quad
        \\dot r = \\langle \\theta, \\dot\\theta \\rangle / (n r), \\quad
        \\dot\\alpha = \\rho\\, ([r > \\epsilon_2] \\dot r + [r \\le \\epsilon_2] \\dot\\epsilon_2)
        + \\max(\\epsilon_2, r)\\, \\dot\\rho \\\\
        \\dot R' &= \\dot R + \\mathrm{mean}_j\\big(\\dot w (g^2 - R) + w (2 g \\dot g - \\dot R)\\big), \\quad
        \\dot C' = \\dot C + \\mathrm{mean}_i\\big(\\dot w (g^2 - C) + w (2 g \\dot g - \\dot C)\\big) \\\\
        \\dot M &= [\\mu \\ge \\epsilon_1]\\, \\mathrm{mean}_i \\dot R' + [\\mu < \\epsilon_1]\\, \\dot\\epsilon_1, \\quad
        \\dot{\\hat V} = (\\dot R' C' + R' \\dot C' - \\hat V \\dot M) / M \\text{ (factored), or }
        \\dot V' = \\dot V + \\dot w (g^2 - V) + w (2 g \\dot g - \\dot V) \\\\
        \\dot Q &= [\\hat V \\ge \\epsilon_1^2]\\, \\dot{\\hat V} + [\\hat V < \\epsilon_1^2]\\, 2 \\epsilon_1 \\dot\\epsilon_1, \\quad
        \\dot U = \\dot g / \\sqrt Q - \\tfrac12 U \\dot Q / Q \\\\
        \\dot D &= [\\mathrm{RMS}(U) > d] \\left(\\frac{\\langle U, \\dot U \\rangle}{\\lVert U \\rVert \\sqrt n\\, d}
        - \\frac{\\mathrm{RMS}(U)}{d^2} \\dot d\\right), \\quad
        \\dot s = \\dot\\alpha / D - s \\dot D / D \\\\
        \\dot\\theta' &= (1 - \\eta\\lambda) \\dot\\theta - (\\dot\\eta\\lambda + \\eta\\dot\\lambda) \\theta
        - \\dot s U - s \\dot U

    with :math:`\\dot g = \\pm \\dot G`. θ reaches the step size through :math:`r` (Note
    [Adafactor's step size depends on θ]); no branch depends on the values (the sums over
    elements are reductions), so it runs under ``torch.func.vmap`` over tangent directions and
    over tasks alike.
    """
    lr_, tau, e1, e2, d, wd = (hyper[n] for n in _HYPER)
    lr_dot, tau_dot, e1_dot, e2_dot, d_dot, wd_dot = (hyper_dot_of(hyper, hyper_dot, n) for n in _HYPER)
    f = _forward(theta, G, state, hyper)
    t, g, n, w, U, D = f["t"], f["g"], f["n"], f["w"], f["U"], f["D"]
    g_dot = -G_dot if hyper["maximize"] else G_dot
    g2_dot = 2 * g * g_dot
    w_dot = mul_dot(tau_dot, lambda: w * math.log(t))
    state_next_dot: State = {}

    # alpha = max(eps2, r) rho, rho = min(lr, 1/sqrt(t)), r = |theta| / sqrt(n)
    rho_dot = None if lr_dot is None else torch.where(torch.as_tensor(f["lr_wins"]), lr_dot, 0.0)
    r = torch.as_tensor(f["r"])
    r_dot = (theta * theta_dot).sum() / (n * torch.where(r > 0, r, torch.ones_like(r)))
    r_wins = f["r_wins"]
    mx_dot = torch.where(r_wins, r_dot, 0.0 if e2_dot is None else e2_dot)
    alpha_dot = add_dots(mx_dot * f["rho"], mul_dot(rho_dot, f["mx"]))
    assert alpha_dot is not None
    theta1_dot = theta_dot
    if f["decayed"]:
        theta1_dot = add_dots(theta_dot * (1 - lr_ * wd), mul_dot(lr_dot, lambda: -wd * theta),
                              mul_dot(wd_dot, lambda: -lr_ * theta))

    # the second-moment estimate V_hat
    if f["factored"]:
        R, C, R_next, C_next, M = f["R"], f["C"], f["R_next"], f["C_next"], f["M"]
        fresh = state.get("row_var") is None or state.get("col_var") is None
        R_dot = None if fresh else state_dot_of(state, state_dot, "row_var")
        C_dot = None if fresh else state_dot_of(state, state_dot, "col_var")
        # R' = R + mean_j w (g^2 - R), C' = C + mean_i w (g^2 - C)
        R_in_dot = add_dots(w * (g2_dot if R_dot is None else g2_dot - R_dot), mul_dot(w_dot, lambda: f["g2"] - R))
        C_in_dot = add_dots(w * (g2_dot if C_dot is None else g2_dot - C_dot), mul_dot(w_dot, lambda: f["g2"] - C))
        assert R_in_dot is not None and C_in_dot is not None
        R_next_dot = add_dots(R_dot, R_in_dot.mean(dim=-1, keepdim=True))
        C_next_dot = add_dots(C_dot, C_in_dot.mean(dim=-2, keepdim=True))
        assert R_next_dot is not None and C_next_dot is not None
        state_next_dot["row_var"] = dense_dot(R_next_dot, R_next)
        state_next_dot["col_var"] = dense_dot(C_next_dot, C_next)
        mu_dot = R_next_dot.mean(dim=-2, keepdim=True)
        M_dot = torch.where(f["mu_wins"], mu_dot, 0.0 if e1_dot is None else e1_dot)
        V_hat_dot = (R_next_dot * C_next + R_next * C_next_dot - f["V_hat"] * M_dot) / M
    else:
        V = f["V"]
        V_dot = state_dot_of(state, state_dot, "variance")
        # V' = V + w (g^2 - V)
        V_next_dot = add_dots(V_dot, w * (g2_dot if V_dot is None else g2_dot - V_dot), mul_dot(w_dot, lambda: f["g2"] - V))
        assert V_next_dot is not None
        state_next_dot["variance"] = dense_dot(V_next_dot, f["V_next"])
        V_hat_dot = V_next_dot

    # U = g / sqrt(Q), Q = max(V_hat, eps1^2)
    Q_dot = torch.where(f["v_wins"], V_hat_dot, 0.0 if e1_dot is None else 2 * e1 * e1_dot)
    U_dot = f["rsqrt_Q"] * g_dot - 0.5 * U * Q_dot / f["Q"]
    # D = max(1, |U| / (sqrt(n) d)), s = alpha / D
    U_norm = f["U_norm"]
    U_norm_dot = (U * U_dot).sum() / torch.where(U_norm > 0, U_norm, torch.ones_like(U_norm))
    ratio_dot = add_dots(U_norm_dot / ((n**0.5) * d), mul_dot(d_dot, lambda: -f["ratio"] / d))
    D_dot = torch.where(f["clipped"], ratio_dot, 0.0)
    step_size = f["step_size"]
    step_size_dot = (alpha_dot - step_size * D_dot) / D
    theta_next_dot = add_dots(theta1_dot, -step_size_dot * U, -step_size * U_dot)
    # the entries the step carries unchanged (none is a tensor but the moments it wrote)
    for key, value in state.items():
        if key not in state_next_dot and isinstance(value, Tensor) and value.is_floating_point():
            state_next_dot[key] = dense_dot(state_dot_of(state, state_dot, key), value)
    return dense_dot(theta_next_dot, theta), state_next_dot


def _no_state(name: str) -> StateEntry:
    return StateEntry(name, lazy=True)


ADAFACTOR = DiffOptimizer(
    name="Adafactor",
    torch_cls=torch.optim.Adafactor,
    step=adafactor_step,
    step_vjp=adafactor_step_vjp,
    step_jvp=adafactor_step_jvp,
    hyper=(
        lr(),
        Hyperparameter("beta2_decay", low=None, high=0.0,
                       doc="the exponent of the second-moment decay: 1 - beta2_t = t ** beta2_decay"),
        Eps1("eps1", option="eps", index=0, doc="the floor of the second-moment estimate (None: the dtype's eps)"),
        Hyperparameter("eps2", option="eps", index=1, doc="the floor of the parameter scale in the step size"),
        Hyperparameter("d", low=1.0, doc="the update clipping threshold"),
        weight_decay(),
    ),
    flags=(MAXIMIZE,),
    state=(_no_state("row_var"), _no_state("col_var"), _no_state("variance")),
    counts_steps=True,
    elementwise=False,
    notes="Factored moments (row and column statistics of matrices); min, max and clamps take the branch torch's "
          "value takes (Note [Adafactor's kinks]); eps1=None reads as the dtype's eps.",
)

__all__ = ["ADAFACTOR", "Eps1", "adafactor_step", "adafactor_step_jvp", "adafactor_step_vjp"]
