# SPDX-License-Identifier: Apache-2.0
"""The small pieces every hand-written ``step_vjp`` and ``step_jvp`` is built from: cotangents reduced to a
hyperparameter's shape, the coupled weight-decay gradient and its derivatives, and tangent arithmetic where a
tangent known to be zero is None (Note [Forward-mode derivatives of a step] in :mod:`gimli_bptt.optim.base`)."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, overload

import torch
from torch import Tensor

from .._typing import Hyper, HyperValue, State


#: A tangent inside a JVP: a tensor, or None for a tangent that is known to be zero (no term).
Dot = Optional[Tensor]


# ---------------------------------------------------------------------------- helpers for the math
def reduce_like(x: Tensor, like: HyperValue) -> Tensor:
    """Sums an element-wise cotangent ``x`` down to the shape of the hyperparameter ``like``.

    A hyperparameter learned per group or per tensor is a 0-d tensor broadcast over the whole
    parameter, so its cotangent is the sum of the element-wise one; one learned per element
    keeps the element-wise cotangent, summed over any leading dimension it was broadcast over.
    """
    if isinstance(like, Tensor) and like.dim() > 0:
        return x if x.shape == like.shape else x.sum_to_size(like.shape)
    return x.sum()


def next_count(state: State) -> Any:
    """t, the step count of the step being taken: ``state["step"] + 1``, a float as ``torch.optim`` keeps it,
    or a 0-d tensor where the state holds one (compiled meta-steps: Note [Step counts as tensors] in
    :mod:`gimli_bptt.compiled`). The step functions of an optimizer whose declaration sets
    ``tensor_step_count`` compute with t in tensor arithmetic only, so either works."""
    count = state["step"]
    return count + 1.0 if isinstance(count, Tensor) else float(count) + 1.0


def is_learned(value: HyperValue) -> bool:
    """Whether a hyperparameter value is a tensor (and therefore gets a cotangent)."""
    return isinstance(value, Tensor)


def is_active(value: HyperValue) -> bool:
    """Whether a term scaled by this hyperparameter takes part: learned, or a nonzero float."""
    return is_learned(value) or value != 0


def add_bar(bars: dict[str, Tensor], hyper: Hyper, name: str, elementwise: Tensor | Callable[[], Tensor]) -> None:
    """Adds the cotangent of hyperparameter ``name`` to ``bars`` if it is learned.

    ``elementwise`` is the element-wise cotangent, or a thunk producing it so that fixed
    hyperparameters cost nothing.
    """
    value = hyper[name]
    if not is_learned(value):
        return
    x = elementwise() if callable(elementwise) else elementwise
    bar = reduce_like(x, value)
    bars[name] = bars[name] + bar if name in bars else bar


def zero_missing_bars(bars: dict[str, Tensor], hyper: Hyper, names: Sequence[str]) -> dict[str, Tensor]:
    """Zero cotangents for learned hyperparameters that had no path at this step (the contract:
    one entry per tensor hyperparameter)."""
    for name in names:
        if is_learned(hyper[name]) and name not in bars:
            bars[name] = torch.zeros_like(hyper[name])
    return bars


def coupled_gradient(theta: Tensor, G: Tensor, hyper: Hyper) -> Tensor:
    """g = ±G + λθ: the gradient a step uses after ``maximize`` and coupled (L2) weight decay,
    formed as ``torch.optim`` forms it ([Alg.1 L6])."""
    wd = hyper["weight_decay"]
    g = -G if hyper["maximize"] else G
    if is_active(wd):
        g = g + wd * theta
    return g


def coupled_gradient_vjp(theta: Tensor, g_bar: Tensor, theta_bar: Tensor, hyper: Hyper,
                         bars: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The VJP of :func:`coupled_gradient` ([Alg.1 L11]): ``(θ̄ + λ ḡ, ±ḡ)``, with λ's partial
    θ·ḡ added into ``bars``; ``theta_bar`` is θ's cotangent from the rest of the step."""
    wd = hyper["weight_decay"]
    if is_active(wd):
        theta_bar = theta_bar + wd * g_bar
        add_bar(bars, hyper, "weight_decay", lambda: theta * g_bar)
    return theta_bar, (-g_bar if hyper["maximize"] else g_bar)


# ---------------------------------------------------------------------------- helpers for the JVPs
def hyper_dot_of(hyper: Hyper, hyper_dot: Mapping[str, Any], name: str) -> Dot:
    """The tangent of hyperparameter ``name``: None (zero) for a float, or where ``hyper_dot``
    has no entry."""
    if not is_learned(hyper[name]):
        return None
    return hyper_dot.get(name)


def state_dot_of(state: Mapping[str, Any], state_dot: Mapping[str, Any], name: str) -> Dot:
    """The tangent of state entry ``name``: None (zero) where the entry is not a tensor (absent,
    None, the step count) or ``state_dot`` has no entry."""
    if not isinstance(state.get(name), Tensor):
        return None
    return state_dot.get(name)


@overload
def add_dots(first: Tensor, /, *terms: Dot) -> Tensor: ...


@overload
def add_dots(*terms: Dot) -> Dot: ...


def add_dots(*terms: Dot) -> Dot:
    """The sum of the tangents that are present (None where none is)."""
    out: Dot = None
    for term in terms:
        if term is not None:
            out = term if out is None else out + term
    return out


@overload
def mul_dot(x: Tensor, coefficient: Any) -> Tensor: ...


@overload
def mul_dot(x: Dot, coefficient: Any) -> Dot: ...


def mul_dot(x: Dot, coefficient: Any) -> Dot:
    """``coefficient * x``, None where ``x`` is; ``coefficient`` may be a thunk, evaluated only
    when ``x`` is present (as :func:`add_bar` takes its cotangent)."""
    if x is None:
        return None
    return x * (coefficient() if callable(coefficient) else coefficient)


def where_dot(condition: Tensor, x: Dot, y: Dot, like: Tensor) -> Dot:
    """``torch.where(condition, x, y)`` of two tangents, either of which may be None (zero): None
    where both are. A missing one is a 0-d zero of ``like``'s dtype (a ``where`` of two Python
    zeros would make a tensor of the default dtype, which would then win the type promotion)."""
    if x is None and y is None:
        return None
    zero = torch.zeros((), dtype=like.dtype, device=like.device)
    return torch.where(condition, zero if x is None else x, zero if y is None else y)


def dense_dot(x: Dot, like: Tensor) -> Tensor:
    """The tangent ``x`` as a tensor shaped like the primal ``like``: zeros for None, and a
    tangent that depends only on 0-d inputs (a learned lr) broadcast to ``like``'s shape."""
    if x is None:
        return torch.zeros_like(like)
    if x.shape != like.shape:
        return torch.broadcast_to(x, like.shape).clone()
    return x


def carried_dots(state_next_dot: dict[str, Tensor], state: Mapping[str, Any], state_dot: Mapping[str, Any],
                 state_next: Mapping[str, Any]) -> dict[str, Tensor]:
    """Adds to ``state_next_dot`` the tangents of the state entries a step carries unchanged (those
    of ``state_next`` that ``state_next_dot`` lacks: their tangent is their own, zero if missing)."""
    for key, value in state_next.items():
        if key not in state_next_dot and isinstance(value, Tensor) and value.is_floating_point():
            state_next_dot[key] = dense_dot(state_dot_of(state, state_dot, key), value)
    return state_next_dot


def coupled_gradient_jvp(theta: Tensor, theta_dot: Tensor, G_dot: Tensor, hyper: Hyper,
                         hyper_dot: Mapping[str, Any]) -> Tensor:
    """The JVP of :func:`coupled_gradient`: :math:`\\dot g = \\pm \\dot G + \\lambda \\dot\\theta
    + \\dot\\lambda \\theta` (the transpose of :func:`coupled_gradient_vjp`)."""
    wd = hyper["weight_decay"]
    g_dot = -G_dot if hyper["maximize"] else G_dot
    if is_active(wd):
        g_dot = g_dot + wd * theta_dot
        g_dot = add_dots(g_dot, mul_dot(hyper_dot_of(hyper, hyper_dot, "weight_decay"), theta))
    return g_dot



__all__ = ["Dot", "add_bar", "add_dots", "carried_dots", "coupled_gradient", "coupled_gradient_jvp",
           "coupled_gradient_vjp", "dense_dot", "hyper_dot_of", "is_active", "is_learned", "mul_dot", "reduce_like",
           "state_dot_of", "where_dot", "zero_missing_bars"]
