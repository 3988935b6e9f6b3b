# SPDX-License-Identifier: Apache-2.0
"""Forward-mode hypergradients (``mode="forward"``): the tangents dθ_j/dφ carried along the inner loop.

Note [Forward-mode hypergradients]: Franceschi et al. (ICML 2017) differentiate the inner loop
forwards instead of backwards. For each of the m learned scalar hyperparameters φ_i, the
tangents Z_j = dθ_j/dφ_i and S_j = dσ_j/dφ_i (σ the optimizer state) obey, with
F(θ, σ, G; φ) the optimizer's step and G_j = ∇ℓ_j(θ_j)::

    Z_0 = 0, S_0 = 0
    Ġ_j = H_j Z_j                                       (one Hessian-vector product per direction)
    (Z_{j+1}, S_{j+1}) = JVP of F at (θ_j, σ_j, G_j; φ) in the direction (Z_j, Ġ_j, S_j, e_i)
    dL_val/dφ_i = ⟨∇_θ L_val(θ_J), Z_J⟩

No tape: the memory is one inner state, the m tangents and one step's graph, whatever J is,
and the hypergradient is known after every inner step, so hyperparameters can be adapted
online during one real training run (``train_step`` carries the tangents, then
``online_hypergradient`` / ``online_step``). The m directions are batched: H_j Z_j for all of
them is one backward pass with batched cotangents, and the optimizer's JVP runs under
``torch.func.vmap`` over them. It equals reverse mode (Algorithm 1) to round-off. It covers the
optimizer's scalar hyperparameters at group or tensor granularity (m ≤ ``MAX_DIRECTIONS``); the
cost grows with m, so element granularity, loss parameters and θ_0 stay with reverse mode.
With ``first_order=True`` Ġ_j is taken as zero (G_j a constant of θ_j), as in reverse mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from . import engine
from .metaparams import OptimizerHyperparameters
from .optim.adjoints import dense_dot
from ._typing import Hyper, State
from .problem import InnerProblem, StepGradient

#: The most learned scalars forward mode carries tangents for (its cost grows with their number).
MAX_DIRECTIONS = 64


@dataclass
class Directions:
    """The m learned scalars φ_i as tangent directions.

    Attributes:
        names: ``(hyperparameter name, index)`` per direction: the group (granularity ``"group"``)
            or the parameter (``"tensor"``) the scalar belongs to.
        hyper_dot: Per inner parameter, ``{name: (m,) tensor}``: 1 for the directions whose scalar
            is this parameter's ``name``, 0 elsewhere (d hyper_k / d φ_i).
    """

    names: list[tuple[str, int]]
    hyper_dot: list[dict[str, Tensor]]

    @property
    def m(self) -> int:
        return len(self.names)


def check_learnable(phi_opt: OptimizerHyperparameters, loss_params: dict[str, Tensor]) -> None:
    """What forward mode carries tangents for: the scalars of φ_opt (Note [Forward-mode hypergradients]).

    Raises:
        ValueError: element granularity, loss parameters, nothing learned, or more than
            :data:`MAX_DIRECTIONS` scalars; each message says to use reverse mode.
    """
    element = [n for n, g in phi_opt.learn.items() if g == "element"]
    if element:
        raise ValueError(f"mode='forward' carries one tangent per learned scalar; {', '.join(element)} is learned per "
                         "element (as many scalars as weights): use granularity 'group' or 'tensor', or mode='reverse'")
    if loss_params:
        raise ValueError("mode='forward' learns the optimizer's hyperparameters only; learn loss_params with "
                         "mode='reverse'")
    if not phi_opt.learn:
        raise ValueError("mode='forward' needs learned hyperparameters: give learn={...}")
    m = sum(phi_opt.num_groups if g == "group" else len(phi_opt.group_of) for g in phi_opt.learn.values())
    if m > MAX_DIRECTIONS:
        raise ValueError(f"mode='forward' would carry {m} tangents (at most {MAX_DIRECTIONS}; each costs a "
                         "Hessian-vector product per step): learn fewer scalars, or use mode='reverse'")


def directions(phi_opt: OptimizerHyperparameters, like: Tensor) -> Directions:
    """One direction per learned scalar of ``phi_opt`` (group or tensor granularity)."""
    names: list[tuple[str, int]] = []
    for name, gran in phi_opt.learn.items():
        count = phi_opt.num_groups if gran == "group" else len(phi_opt.group_of)
        names += [(name, i) for i in range(count)]
    m = len(names)
    hyper_dot: list[dict[str, Tensor]] = []
    for k, g in enumerate(phi_opt.group_of):
        dots: dict[str, Tensor] = {}
        for name, gran in phi_opt.learn.items():
            mine = g if gran == "group" else k
            dots[name] = torch.tensor([1.0 if n == name and i == mine else 0.0 for n, i in names],
                                      dtype=like.dtype, device=like.device)
        hyper_dot.append(dots)
    assert all(d.shape == (m,) for dots in hyper_dot for d in dots.values())
    return Directions(names, hyper_dot)


@dataclass
class Tangents:
    """Z_j and S_j: per inner parameter, its tangent (m, *shape) and its state's tangents."""

    theta: list[Tensor]
    state: list[dict[str, Tensor]]

    @staticmethod
    def zeros(theta: Sequence[Tensor], state: Sequence[State], m: int) -> "Tangents":
        def zero(t: Tensor) -> Tensor:
            return torch.zeros((m, *t.shape), dtype=t.dtype, device=t.device)

        return Tangents([zero(t) for t in theta],
                        [{k: zero(v) for k, v in s.items() if _differentiable(v)} for s in state])

    def scaled(self, factor: float) -> "Tangents":
        return Tangents([z * factor for z in self.theta], [{k: v * factor for k, v in s.items()} for s in self.state])


def _differentiable(v: Any) -> bool:
    return isinstance(v, Tensor) and v.is_floating_point()


JvpFn = Callable[..., "tuple[Tensor, State]"]


def _jvp_of(impl: Any) -> JvpFn:
    """The optimizer's JVP: hand-written where it has one, else derived with ``torch.func.jvp``."""
    jvp = getattr(impl, "jvp", None)
    if jvp is not None:
        return jvp
    return _derived_jvp(impl.step)


def _derived_jvp(step: Callable[..., Any]) -> JvpFn:
    def step_jvp(theta: Tensor, G: Tensor, state: State, hyper: Hyper, theta_dot: Tensor, G_dot: Tensor,
                 state_dot: dict[str, Tensor], hyper_dot: dict[str, Tensor]) -> tuple[Tensor, State]:
        skeys = [k for k in state_dot if _differentiable(state.get(k))]
        hkeys = [k for k in hyper_dot if isinstance(hyper.get(k), Tensor)]

        def f(t: Tensor, g: Tensor, svals: list[Tensor], hvals: list[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
            tn, sn = step(t, g, {**state, **dict(zip(skeys, svals))}, {**hyper, **dict(zip(hkeys, hvals))})
            return tn, {k: v for k, v in sn.items() if _differentiable(v)}

        tn_dot, sn_dot = torch.func.jvp(
            f, (theta, G, [state[k] for k in skeys], [hyper[k] for k in hkeys]),
            (theta_dot, G_dot, [state_dot[k] for k in skeys], [hyper_dot[k] for k in hkeys]))[1]  # the tangents
        return tn_dot, sn_dot

    return step_jvp


def hessian_tangents(grad: StepGradient, Z: Sequence[Tensor], problem: InnerProblem) -> list[Optional[Tensor]]:
    """Ġ_j = H_j Z_j for every direction at once: one backward pass through G_j's graph with the
    batched cotangents Z (H is symmetric, so the vector-Jacobian product is H Z); distributed, the
    mean over the ranks (the Hessian of the mean loss).

    One direction (m = 1) takes a plain backward pass: batched cotangents run the backward
    under vmap, which costs more than the pass itself on small graphs (Note [One direction]).
    """
    assert grad.leaves is not None and grad.graph is not None
    outs = [(g, z) for g, z in zip(grad.graph, Z) if g is not None and g.requires_grad]
    n = len(grad.leaves)
    if not outs:
        HZ: list[Optional[Tensor]] = [None] * n
    elif Z[0].shape[0] == 1:
        single = engine.grad([g for g, _ in outs], grad.leaves, [z[0] for _, z in outs])
        HZ = [None if h is None else h.unsqueeze(0) for h in single]
    else:
        try:
            HZ = list(torch.autograd.grad([g for g, _ in outs], grad.leaves, [z for _, z in outs],
                                          allow_unused=True, is_grads_batched=True))
        except RuntimeError:  # an op without a batching rule for its double backward: one direction at a time
            per = [torch.autograd.grad([g for g, _ in outs], grad.leaves, [z[i] for _, z in outs],
                                       retain_graph=True, allow_unused=True) for i in range(Z[0].shape[0])]
            HZ = [None if per[0][k] is None else torch.stack([p[k] for p in per]) for k in range(n)]
    if problem.reducer is not None:
        like = [torch.zeros_like(z) for z in Z]
        HZ = problem.all_reduce_mean(HZ, like, "H_j·Z_j (forward mode)")
    return HZ


def _step_tangents(jvp: JvpFn, primals: Sequence[tuple[Tensor, Tensor, State, Hyper]],
                   tangents: Sequence[tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]],
                   m: int) -> list[tuple[Tensor, State]]:
    """The optimizer's JVP of every stepped tensor, for the m directions (leading dimension).

    Note [One direction]: ``torch.func.vmap`` flattens and rebuilds its arguments' pytrees on
    every call, which on a small model costs several times the JVP's arithmetic. So all tensors
    go through one vmapped call per step, and with one direction there is no vmap at all: the
    JVP runs on the unbatched tangents and its results gain the leading dimension back.
    """
    if m == 1:
        out = []
        for (t, g, s, h), (z, g_dot, s_dot, dots) in zip(primals, tangents):
            tn_dot, sn_dot = jvp(t, g, s, h, z[0], g_dot[0], {k: v[0] for k, v in s_dot.items()},
                                 {k: v[0] for k, v in dots.items()})
            out.append((tn_dot.unsqueeze(0), {k: v.unsqueeze(0) for k, v in sn_dot.items()}))
        return out

    def all_tensors(batched: Sequence[tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]]
                    ) -> list[tuple[Tensor, State]]:
        return [jvp(t, g, s, h, z, g_dot, s_dot, dots) for (t, g, s, h), (z, g_dot, s_dot, dots)
                in zip(primals, batched)]

    return torch.func.vmap(all_tensors)(list(tangents))


def forward_step(problem: InnerProblem, theta: list[Tensor], state: list[State], buffers: dict[str, Tensor],
                 batch: Any, j: int, tangents: Tangents, dirs: Directions, second_order: bool = True,
                 ) -> tuple[Tensor, list[Tensor], list[State], Tangents]:
    """One inner step with its tangents: ``(ℓ_j, θ_{j+1}, σ_{j+1}, (Z_{j+1}, S_{j+1}))``
    (Note [Forward-mode hypergradients]); ``buffers`` are updated in place."""
    grad = problem.step_gradient(theta, buffers, batch, j, keep_graph=second_order)
    Z, S = tangents.theta, tangents.state
    HZ = hessian_tangents(grad, Z, problem) if second_order else [None] * len(theta)
    hyper = problem.hyper_at(j)
    with torch.no_grad():
        theta_next, state_next = problem.step(theta, grad.G, state, hyper)
    scale = problem.lr_scale(j)
    G = {k: g for k, g in enumerate(grad.G) if g is not None}
    stepped = list(G)  # the others keep their tensor, state and tangents
    primals = [(theta[k], G[k], state[k], hyper[k]) for k in stepped]
    dotted = [(Z[k], dense_dot(HZ[k], Z[k]),
               {key: v for key, v in S[k].items() if _differentiable(state[k].get(key))},
               {name: (d * scale if name == "lr" else d) for name, d in dirs.hyper_dot[k].items()})
              for k in stepped]
    Z_next, S_next = list(Z), list(S)
    with torch.no_grad():
        results = _step_tangents(_jvp_of(problem.impl), primals, dotted, dirs.m) if stepped else []
    for k, (tn_dot, sn_dot) in zip(stepped, results):
        Z_next[k] = tn_dot
        S_next[k] = {key: v for key, v in sn_dot.items() if _differentiable(state_next[k].get(key))}
    return grad.loss, theta_next, state_next, Tangents(Z_next, S_next)


def directional_hypergradients(B: Sequence[Tensor], tangents: Tangents) -> Tensor:
    """``dL/dφ_i = Σ_k ⟨B_k, Z_k[i]⟩`` for the m directions, from the gradient B = ∇_θ L."""
    out = None
    for b, z in zip(B, tangents.theta):
        part = (z * b).reshape(z.shape[0], -1).sum(1)
        out = part if out is None else out + part
    assert out is not None
    return out


def as_hypergrads(values: Tensor, dirs: Directions, phi_opt: OptimizerHyperparameters) -> dict[str, Tensor]:
    """The m directional derivatives as ``{name: tensor}`` shaped like the learned values."""
    out = {name: torch.zeros_like(v) for name, v in phi_opt.values.items()}  # type: ignore[arg-type]
    for value, (name, i) in zip(values, dirs.names):
        out[name][i] = value
    return {k: v.detach() for k, v in out.items()}


def forward_unroll(problem: InnerProblem, theta: list[Tensor], state: list[State], buffers: dict[str, Tensor],
                   batches: Sequence[Any], dirs: Directions, second_order: bool = True,
                   tangents: Optional[Tangents] = None, first_step: int = 0, tick: Optional[Callable[[], None]] = None,
                   ) -> tuple[list[Tensor], list[State], dict[str, Tensor], Tangents, Tensor]:
    """The J inner steps with their tangents, from ``tangents`` (default: zero):
    ``(θ_J, σ_J, buffers, (Z_J, S_J), ℓ_0 ... ℓ_{J-1})``; nothing else is kept."""
    if tangents is None:
        tangents = Tangents.zeros(theta, state, dirs.m)
    losses = []
    for j, batch in enumerate(batches):
        buffers = problem.fresh_buffers(buffers)
        loss, theta, state, tangents = forward_step(problem, theta, state, buffers, batch, first_step + j, tangents,
                                                    dirs, second_order)
        losses.append(loss)
        if tick is not None:
            tick()
    stacked = torch.stack(losses)
    problem.check_losses(stacked)  # on an accelerator: Note [Deferred finiteness check]
    return theta, state, buffers, tangents, stacked


__all__ = ["Directions", "MAX_DIRECTIONS", "Tangents", "as_hypergrads", "check_learnable", "directional_hypergradients",
           "directions", "forward_step", "forward_unroll", "hessian_tangents"]
