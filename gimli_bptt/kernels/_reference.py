# SPDX-License-Identifier: Apache-2.0
"""The pure-PyTorch twin of every compiled ``torch.ops.gimli`` op, same signature: the spec and the fallback.

Every op works on flat buffers: ``theta``, ``G`` and the optimizer state of many parameter
tensors laid end to end, 1-D, contiguous, one dtype and device. ``offsets`` (int64, length
``nseg + 1``, ``offsets[0] = 0``) marks where each tensor's segment starts and ends. ``hyper``
lists one float64 tensor per hyperparameter slot (SGD: lr, momentum, dampening, weight_decay;
Adam: lr, beta1, beta2, eps, weight_decay): shape ``(nseg,)`` (one value per segment: a fixed
value, or one learned per group or per tensor) or, when bit ``h`` of ``elementwise`` is set,
shape ``(N,)`` (learned per element).

The VJPs return one hyperparameter cotangent per slot: for a slot whose bit is set in
``learned``, the element-wise partial summed over each segment (``(nseg,)``, float64) or, for an
element-wise slot, the element-wise partial (``(N,)``, the element dtype); an empty tensor for
the other slots. State cotangents that do not exist (no momentum buffer, no amsgrad maximum)
are empty tensors, as are missing outputs.

Note [One source of truth] in ``csrc/include/gimli/optim_math.h`` explains why the operations
below are written as they are: scalar coefficients in double then rounded, plain element
operations (no ``torch.lerp``/``addcmul``, whose vectorised CPU loops fuse a multiply-add), and
bias-correction powers from the C library's ``pow`` (``math.pow``), as the kernels compute them.

Note [Correctly rounded sqrt]: torch's vectorised CPU ``sqrt`` is not correctly rounded (torch
2.13 on AVX2, measured: 1.4% of random float64 and 20% of float32 inputs come out 1 ulp away
from the IEEE result), so on the CPU the twin takes NumPy's ``sqrt``, which is, as C++'s
``std::sqrt`` and CUDA's default ``sqrt`` are.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

SGD_HYPER = ("lr", "momentum", "dampening", "weight_decay")
ADAM_HYPER = ("lr", "beta1", "beta2", "eps", "weight_decay")


def _empty(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return torch.empty(0, dtype=like.dtype if dtype is None else dtype, device=like.device)


def _counts(offsets: Tensor) -> Tensor:
    return offsets[1:] - offsets[:-1]


def _hyper_doubles(hyper: Sequence[Tensor], elementwise: int, offsets: Tensor, n: int) -> list[Tensor]:
    """The float64 hyperparameter values at the resolution the coefficients are computed at:
    per segment when nothing is element-wise (the kernels' fast path), else per element."""
    if elementwise == 0:
        return [h.to(torch.float64) for h in hyper]
    counts = _counts(offsets)
    return [h.to(torch.float64) if elementwise >> k & 1 else torch.repeat_interleave(h.to(torch.float64), counts, output_size=n)
            for k, h in enumerate(hyper)]


def _expand(c: Tensor, dtype: torch.dtype, elementwise: int, offsets: Tensor, n: int) -> Tensor:
    """A coefficient computed in double, rounded to the element dtype and expanded to ``(N,)``."""
    c = c.to(dtype)
    if elementwise != 0:
        return c
    return torch.repeat_interleave(c, _counts(offsets), output_size=n)


def _pow(x: Tensor, t: float) -> Tensor:
    """``x ** t`` element by element with the C library's ``pow``, as the kernels compute it
    (``torch.pow`` on float64 vectors may differ in the last bit)."""
    return torch.tensor([math.pow(v, t) for v in x.tolist()], dtype=torch.float64, device=x.device)


def _sqrt(x: Tensor) -> Tensor:
    """Correctly rounded square root (Note [Correctly rounded sqrt])."""
    if x.device.type == "cpu" and not x.requires_grad:
        return torch.from_numpy(np.sqrt(x.contiguous().numpy()))
    return x.sqrt()


def _segment_sum(x: Tensor, offsets: Tensor) -> Tensor:
    """Sums each segment of ``x`` in float64 (a hyperparameter learned per group or tensor)."""
    nseg = offsets.numel() - 1
    ids = torch.repeat_interleave(torch.arange(nseg, device=x.device), _counts(offsets), output_size=x.numel())
    return torch.zeros(nseg, dtype=torch.float64, device=x.device).index_add_(0, ids, x.to(torch.float64))


def _hyper_bar(parts: Sequence[Optional[Tensor]], learned: int, elementwise: int, offsets: Tensor,
               like: Tensor) -> list[Tensor]:
    out = []
    for k, x in enumerate(parts):
        if not learned >> k & 1:
            out.append(_empty(like, torch.float64))
        elif x is None:
            out.append(torch.zeros_like(like) if elementwise >> k & 1 else
                       torch.zeros(offsets.numel() - 1, dtype=torch.float64, device=like.device))
        elif elementwise >> k & 1:
            out.append(x)
        else:
            out.append(_segment_sum(x, offsets))
    return out


# ------------------------------------------------------------------------------------- SGD
def _sgd_coef(hyper: Sequence[Tensor], theta: Tensor, offsets: Tensor, elementwise: int) -> dict[str, Tensor]:
    n = theta.numel()
    lr, mom, damp, wd = _hyper_doubles(hyper, elementwise, offsets, n)
    raw = {"lr": lr, "neg_lr": -lr, "wd": wd, "mom": mom, "omd": 1.0 - damp}
    return {k: _expand(v, theta.dtype, elementwise, offsets, n) for k, v in raw.items()}


def _sgd_grad(c: dict[str, Tensor], theta: Tensor, G: Tensor, maximize: bool, has_wd: bool) -> Tensor:
    g = -G if maximize else G
    if has_wd:
        g = g + c["wd"] * theta
    return g


def sgd_step(theta: Tensor, G: Tensor, buf: Optional[Tensor], offsets: Tensor, hyper: Sequence[Tensor],
             elementwise: int, nesterov: bool, maximize: bool, use_momentum: bool,
             has_wd: bool) -> tuple[Tensor, Tensor]:
    """Flat SGD step (Algorithm 1, line 6): ``(theta_next, buf_next)``; ``buf_next`` is empty
    without momentum. ``buf=None`` is the first step (the buffer starts as g)."""
    c = _sgd_coef(hyper, theta, offsets, elementwise)
    g = _sgd_grad(c, theta, G, maximize, has_wd)
    update = g
    buf_next = _empty(theta)
    if use_momentum:
        buf_next = g.clone() if buf is None else c["mom"] * buf + c["omd"] * g
        update = g + c["mom"] * buf_next if nesterov else buf_next
    return theta - c["lr"] * update, buf_next


def sgd_step_vjp(theta: Tensor, G: Tensor, buf: Optional[Tensor], theta_next_bar: Tensor,
                 buf_next_bar: Optional[Tensor], offsets: Tensor, hyper: Sequence[Tensor], elementwise: int,
                 learned: int, nesterov: bool, maximize: bool, use_momentum: bool,
                 has_wd: bool) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """VJP of :func:`sgd_step` (Algorithm 1, lines 11-12): ``(theta_bar, G_bar, buf_bar, hyper_bar)``."""
    c = _sgd_coef(hyper, theta, offsets, elementwise)
    tb = theta_next_bar
    g = _sgd_grad(c, theta, G, maximize, has_wd)
    parts: list[Optional[Tensor]] = [None] * 4
    u_bar = c["neg_lr"] * tb
    buf_bar_out = _empty(theta)
    if use_momentum:
        buf_next = g if buf is None else c["mom"] * buf + c["omd"] * g
        if nesterov:
            update = g + c["mom"] * buf_next
            parts[0] = (-update) * tb
            parts[1] = buf_next * u_bar
            buf_bar = c["mom"] * u_bar
        else:
            parts[0] = (-buf_next) * tb
            buf_bar = u_bar
        if buf_next_bar is not None:
            buf_bar = buf_bar + buf_next_bar
        if buf is None:
            g_from_buf = buf_bar
        else:
            if nesterov:
                assert parts[1] is not None  # the update's buf_next term, set above
                parts[1] = parts[1] + buf * buf_bar
            else:
                parts[1] = buf * buf_bar
            parts[2] = (-g) * buf_bar
            buf_bar_out = c["mom"] * buf_bar
            g_from_buf = c["omd"] * buf_bar
        g_bar = u_bar + g_from_buf if nesterov else g_from_buf
    else:
        parts[0] = (-g) * tb
        g_bar = u_bar
    theta_bar = tb
    if has_wd:
        theta_bar = tb + c["wd"] * g_bar
        parts[3] = theta * g_bar
    G_bar = -g_bar if maximize else g_bar
    return theta_bar, G_bar, buf_bar_out, _hyper_bar(parts, learned, elementwise, offsets, theta)


# ------------------------------------------------------------------------------------ Adam
def _adam_coef(hyper: Sequence[Tensor], theta: Tensor, offsets: Tensor, elementwise: int,
               t: float) -> dict[str, Tensor]:
    n = theta.numel()
    lr, b1, b2, eps, wd = _hyper_doubles(hyper, elementwise, offsets, n)
    bc1 = 1.0 - _pow(b1, t)
    bc2s = _sqrt(1.0 - _pow(b2, t))
    ss = lr / bc1
    raw = {
        "w": 1.0 - b1, "b1": b1, "b2": b2, "omb2": 1.0 - b2, "two_omb2": 2.0 * (1.0 - b2),
        "eps": eps, "wd": wd, "neg_wd": -wd, "lr": lr, "neg_lr": -lr, "dec": 1.0 - lr * wd,
        "ss": ss, "neg_ss": -ss, "bc1": bc1, "bc1_sq": bc1 * bc1, "bc2s": bc2s, "bc2s_sq": bc2s * bc2s,
        "t": torch.full_like(lr, t), "b1pow": _pow(b1, t - 1.0), "b2pow": _pow(b2, t - 1.0),
    }
    c = {k: _expand(v, theta.dtype, elementwise, offsets, n) for k, v in raw.items()}
    c["omw"] = 1 - c["w"]
    return c


def _adam_grad(c: dict[str, Tensor], theta: Tensor, G: Tensor, maximize: bool, decoupled: bool,
               has_wd: bool) -> Tensor:
    g = -G if maximize else G
    if has_wd and not decoupled:
        g = g + c["wd"] * theta
    return g


def _lerp(c: dict[str, Tensor], m: Tensor, g: Tensor) -> Tensor:
    """ATen's scalar ``lerp(m, g, w)``, element by element."""
    w = c["w"]
    return torch.where(w.abs() < 0.5, m + w * (g - m), g - (g - m) * c["omw"])


def adam_step(theta: Tensor, G: Tensor, m: Tensor, v: Tensor, vmax: Optional[Tensor], offsets: Tensor,
              hyper: Sequence[Tensor], elementwise: int, step: float, amsgrad: bool, maximize: bool,
              decoupled: bool, has_wd: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Flat Adam/AdamW step (Algorithm 1, line 6) at step count ``step`` (t after the step):
    ``(theta_next, m_next, v_next, vmax_next)``; ``vmax_next`` is empty without amsgrad."""
    c = _adam_coef(hyper, theta, offsets, elementwise, step)
    g = _adam_grad(c, theta, G, maximize, decoupled, has_wd)
    theta1 = theta * c["dec"] if has_wd and decoupled else theta
    m_next = _lerp(c, m, g)
    v_next = v * c["b2"] + c["omb2"] * (g * g)
    vmax_next = _empty(theta)
    v_hat = v_next
    if amsgrad:
        assert vmax is not None, "amsgrad needs max_exp_avg_sq"
        v_hat = vmax_next = torch.maximum(vmax, v_next)
    denom = _sqrt(v_hat) / c["bc2s"] + c["eps"]
    return theta1 - c["ss"] * (m_next / denom), m_next, v_next, vmax_next


def adam_step_vjp(theta: Tensor, G: Tensor, m: Tensor, v: Tensor, vmax: Optional[Tensor], theta_next_bar: Tensor,
                  m_next_bar: Optional[Tensor], v_next_bar: Optional[Tensor], vmax_next_bar: Optional[Tensor],
                  offsets: Tensor, hyper: Sequence[Tensor], elementwise: int, learned: int, step: float,
                  amsgrad: bool, maximize: bool, decoupled: bool,
                  has_wd: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    """VJP of :func:`adam_step` (Algorithm 1, lines 11-12):
    ``(theta_bar, G_bar, m_bar, v_bar, vmax_bar, hyper_bar)``."""
    c = _adam_coef(hyper, theta, offsets, elementwise, step)
    tb = theta_next_bar
    g = _adam_grad(c, theta, G, maximize, decoupled, has_wd)
    m_next = _lerp(c, m, g)
    v_next = v * c["b2"] + c["omb2"] * (g * g)
    if amsgrad:
        assert vmax is not None, "amsgrad needs max_exp_avg_sq"
        to_new = v_next >= vmax
        v_hat = torch.where(to_new, v_next, vmax)
    else:
        v_hat = v_next
    s = _sqrt(v_hat)
    denom = s / c["bc2s"] + c["eps"]
    step_size_bar = (-(m_next / denom)) * tb
    m_bar = c["neg_ss"] * tb / denom
    d_bar = c["ss"] * tb * m_next / (denom * denom)
    positive = s > 0
    s_safe = torch.where(positive, s, torch.ones_like(s))
    zero = torch.zeros_like(s)
    v_hat_bar = torch.where(positive, d_bar / (2 * s_safe * c["bc2s"]), zero)
    vmax_bar = _empty(theta)
    if amsgrad:
        max_bar = v_hat_bar if vmax_next_bar is None else v_hat_bar + vmax_next_bar
        v_bar = torch.where(to_new, max_bar, zero)
        vmax_bar = torch.where(to_new, zero, max_bar)
    else:
        v_bar = v_hat_bar
    if v_next_bar is not None:
        v_bar = v_bar + v_next_bar
    if m_next_bar is not None:
        m_bar = m_bar + m_next_bar
    parts: list[Optional[Tensor]] = [None] * 5
    c2_bar = (-d_bar) * s / c["bc2s_sq"]
    bc2_bar = c2_bar * 0.5 / c["bc2s"]
    parts[2] = (-bc2_bar) * c["t"] * c["b2pow"] + (v - g * g) * v_bar
    parts[0] = step_size_bar / c["bc1"]
    bc1_bar = (-step_size_bar) * c["lr"] / c["bc1_sq"]
    parts[1] = (-bc1_bar) * c["t"] * c["b1pow"] + (m - g) * m_bar
    parts[3] = d_bar
    g_bar = c["w"] * m_bar + c["two_omb2"] * g * v_bar
    theta_bar = tb
    if has_wd:
        if decoupled:
            theta_bar = tb * c["dec"]
            assert parts[0] is not None  # the step size's term, set above
            parts[0] = parts[0] + c["neg_wd"] * theta * tb
            parts[4] = c["neg_lr"] * theta * tb
        else:
            theta_bar = tb + c["wd"] * g_bar
            parts[4] = theta * g_bar
    G_bar = -g_bar if maximize else g_bar
    return (theta_bar, G_bar, c["b1"] * m_bar, c["b2"] * v_bar, vmax_bar,
            _hyper_bar(parts, learned, elementwise, offsets, theta))


__all__ = ["ADAM_HYPER", "SGD_HYPER", "adam_step", "adam_step_vjp", "sgd_step", "sgd_step_vjp"]
