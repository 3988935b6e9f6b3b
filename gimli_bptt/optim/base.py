# SPDX-License-Identifier: Apache-2.0
"""The differentiable-optimizer contract: a pure ``step`` and its hand-written ``step_vjp``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype

#: A hyperparameter value for one parameter tensor: a Python float (fixed), a 0-d tensor
#: (learned per group or per tensor) or a tensor shaped like the parameter (learned per element).
HyperValue = Any
#: The hyperparameters of one parameter tensor: float values and boolean flags by name.
Hyper = Mapping[str, Any]
#: The optimizer state of one parameter tensor, as a plain dict (``torch.optim`` naming).
State = dict[str, Any]

StepFn = Callable[[Tensor, Tensor, State, Hyper], "tuple[Tensor, State]"]
StepVjpFn = Callable[
    [Tensor, Tensor, State, Hyper, Tensor, State],
    "tuple[Tensor, Tensor, State, dict[str, Tensor]]",
]


@dataclass(frozen=True)
class DiffOptimizer:
    """A ``torch.optim`` optimizer as a pair of pure per-tensor functions.

    ``step(theta, G, state, hyper) -> (theta_next, state_next)`` reproduces the update that
    ``torch.optim`` makes to one parameter tensor, out of place (Algorithm 1, line 6).

    ``step_vjp(theta, G, state, hyper, theta_next_bar, state_next_bar)
    -> (theta_bar, G_bar, state_bar, hyper_bar)`` is its vector-Jacobian product, written by
    hand (the direct partials of lines 11, 12 and the first term of line 14). ``hyper_bar``
    holds one entry for every hyperparameter given as a tensor, shaped like that tensor; plain
    floats get no cotangent. Entries of ``state_next_bar`` may be missing (taken as zero).

    Attributes:
        name: Display name, e.g. ``"Adam"``.
        torch_cls: The ``torch.optim`` class this implements.
        hyper_names: The float hyperparameters that can be meta-learned, in our naming
            (Adam's ``betas`` appear as ``beta1`` and ``beta2``).
        flag_names: The boolean options the step honours (``nesterov``, ``amsgrad``, ...).
        state_keys: The differentiable tensor entries of the state (e.g. ``exp_avg``).
        step: The pure per-tensor step.
        step_vjp: Its vector-Jacobian product.
        read_hyper: Reads ``{name: float or bool}`` from a ``torch.optim`` param group.
        write_hyper: Writes one float hyperparameter back into a param group.
        import_state: Builds our state of one tensor from ``opt.state[p]`` (a copy).
        export_state: Builds ``opt.state[p]`` from our state.
        flat: The kind of flat-buffer op that implements this optimizer (``"sgd"``, ``"adam"``),
            or None: ``step_all``/``step_vjp_all`` then loop over the tensors.
        kernels: How ``step_all``/``step_vjp_all`` run: ``"auto"`` (fused kernels where they are
            available and suit the tensors, else their pure-PyTorch flat twin), ``"fused"`` (raise
            if the kernels cannot run), ``"reference"`` (the flat twin) or ``"loop"`` (the
            per-tensor functions, one tensor at a time). See ``gimli_bptt.kernels``.
    """

    name: str
    torch_cls: type
    hyper_names: tuple[str, ...]
    flag_names: tuple[str, ...]
    state_keys: tuple[str, ...]
    step: StepFn
    step_vjp: StepVjpFn
    read_hyper: Callable[[Mapping[str, Any]], dict[str, Any]]
    write_hyper: Callable[[dict[str, Any], str, float], None]
    import_state: Callable[[Mapping[str, Any], Tensor, Hyper], State]
    export_state: Callable[[State, Tensor], dict[str, Any]]
    notes: str = field(default="")
    flat: Optional[str] = None
    kernels: str = "auto"


def reduce_like(x: Tensor, like: HyperValue) -> Tensor:
    """Sums an element-wise cotangent ``x`` down to the shape of the hyperparameter ``like``.

    A hyperparameter learned per group or per tensor is a 0-d tensor broadcast over the whole
    parameter, so its cotangent is the sum of the element-wise one; one learned per element
    keeps the element-wise cotangent.
    """
    if isinstance(like, Tensor) and like.dim() == x.dim():
        return x
    return x.sum()


def is_learned(value: HyperValue) -> bool:
    """Whether a hyperparameter value is a tensor (and therefore gets a cotangent)."""
    return isinstance(value, Tensor)


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


def coupled_gradient(theta: Tensor, G: Tensor, hyper: Hyper) -> Tensor:
    """g = ±G + λθ: the gradient a step uses after ``maximize`` and coupled (L2) weight decay,
    formed as ``torch.optim`` forms it (Algorithm 1, line 6)."""
    wd = hyper["weight_decay"]
    g = -G if hyper["maximize"] else G
    if is_learned(wd) or wd != 0:
        g = g + wd * theta
    return g


def coupled_gradient_vjp(theta: Tensor, g_bar: Tensor, theta_bar: Tensor, hyper: Hyper,
                         bars: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The VJP of :func:`coupled_gradient` (Algorithm 1, line 11): ``(θ̄ + λ ḡ, ±ḡ)``, with λ's
    partial θ·ḡ added into ``bars``; ``theta_bar`` is θ's cotangent from the rest of the step."""
    wd = hyper["weight_decay"]
    if is_learned(wd) or wd != 0:
        theta_bar = theta_bar + wd * g_bar
        add_bar(bars, hyper, "weight_decay", lambda: theta * g_bar)
    return theta_bar, (-g_bar if hyper["maximize"] else g_bar)


def clone_state(state: Mapping[str, Any]) -> State:
    """A copy of one tensor's state whose tensors are detached clones."""
    return {k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in state.items()}


KERNEL_MODES = ("auto", "fused", "reference", "loop")


def _differentiable(*lists: Sequence[Any]) -> bool:
    """Whether autograd records the step: grad mode on and some input requires grad."""
    if not torch.is_grad_enabled():
        return False
    for items in lists:
        for x in items:
            if isinstance(x, Tensor) and x.requires_grad:
                return True
            if isinstance(x, Mapping) and any(isinstance(v, Tensor) and v.requires_grad for v in x.values()):
                return True
    return False


def _use_flat(opt: DiffOptimizer, *inputs: Sequence[Any]) -> bool:
    """Whether ``step_all``/``step_vjp_all`` take the flat-buffer path.

    Note [Flat ops under autograd]: the flat ops (compiled or their twin) have no autograd
    formula, and the engine never differentiates through a step (the tape runs under
    ``no_grad``; the sweep's VJP is hand-written). A caller that does, such as the reference
    unroll of :mod:`gimli_bptt.testing`, gets the per-tensor functions, whatever ``kernels`` says.
    """
    if opt.kernels not in KERNEL_MODES:
        raise ValueError(f"kernels must be one of {KERNEL_MODES}, got {opt.kernels!r}")
    if opt.flat is None:
        if opt.kernels in ("fused", "reference"):
            raise ValueError(f"{opt.name} has no flat-buffer implementation; use kernels='auto' or 'loop'")
        return False
    return opt.kernels != "loop" and not _differentiable(*inputs)


def step_all(
    opt: DiffOptimizer,
    theta: Sequence[Tensor],
    G: Sequence[Optional[Tensor]],
    state: Sequence[State],
    hyper: Sequence[Hyper],
) -> tuple[list[Tensor], list[State]]:
    """Applies ``opt.step`` to every parameter tensor (Algorithm 1, line 6).

    A tensor whose gradient is ``None`` (it did not take part in the loss) is left as it is,
    with its state, exactly as ``torch.optim`` skips parameters whose ``.grad`` is ``None``.
    With ``opt.flat`` set and ``opt.kernels != "loop"``, the tensors go through one fused op
    per bucket of flat buffers instead (:mod:`gimli_bptt.kernels.flat`), with the same result.
    """
    if _use_flat(opt, theta, G, hyper):
        from ..kernels import flat

        return flat.step_all(opt, theta, G, state, hyper, impl=opt.kernels)
    theta_next: list[Tensor] = []
    state_next: list[State] = []
    for t, g, s, h in zip(theta, G, state, hyper):
        if g is None:
            theta_next.append(t)
            state_next.append(s)
        else:
            tn, sn = opt.step(t, g, s, h)
            theta_next.append(tn)
            state_next.append(sn)
    return theta_next, state_next


def step_vjp_all(
    opt: DiffOptimizer,
    theta: Sequence[Tensor],
    G: Sequence[Optional[Tensor]],
    state: Sequence[State],
    hyper: Sequence[Hyper],
    theta_next_bar: Sequence[Tensor],
    state_next_bar: Sequence[State],
) -> tuple[list[Tensor], list[Optional[Tensor]], list[State], list[dict[str, Tensor]]]:
    """Applies ``opt.step_vjp`` to every parameter tensor (Algorithm 1, lines 11-12).

    Returns ``(θ̄_j, Ḡ_j, σ̄_j, φ̄_opt per tensor)``. A tensor whose gradient was ``None`` was left
    as it was by the step, so its cotangents pass through unchanged and ``Ḡ`` is ``None``.
    Dispatches to the flat-buffer ops as :func:`step_all` does.
    """
    if _use_flat(opt, theta, G, hyper, theta_next_bar):
        from ..kernels import flat

        return flat.step_vjp_all(opt, theta, G, state, hyper, theta_next_bar, state_next_bar, impl=opt.kernels)
    theta_bar: list[Tensor] = []
    G_bar: list[Optional[Tensor]] = []
    state_bar: list[State] = []
    hyper_bar: list[dict[str, Tensor]] = []
    for t, g, s, h, tb, sb in zip(theta, G, state, hyper, theta_next_bar, state_next_bar):
        if g is None:
            theta_bar.append(tb)
            G_bar.append(None)
            state_bar.append(sb)
            hyper_bar.append({})
        else:
            a, b, c, d = opt.step_vjp(t, g, s, h, tb, sb)
            theta_bar.append(a)
            G_bar.append(b)
            state_bar.append(c)
            hyper_bar.append(d)
    return theta_bar, G_bar, state_bar, hyper_bar


#: Adam-style optimizers keep beta1 and beta2 in the tuple option ``betas``.
BETAS: dict[str, tuple[str, int]] = {"beta1": ("betas", 0), "beta2": ("betas", 1)}


def hyper_writer(in_tuples: Mapping[str, tuple[str, int]] | None = None) -> Callable[[dict[str, Any], str, float], None]:
    """A ``write_hyper`` for ``DiffOptimizer``: ``group[name] = value``, except for the names that
    live inside a tuple option (``in_tuples[name] = (option, index)``, e.g. :data:`BETAS`)."""
    in_tuples = dict(in_tuples or {})

    def write_hyper(group: dict[str, Any], name: str, value: float) -> None:
        if name in in_tuples:
            option, index = in_tuples[name]
            values = list(group[option])
            values[index] = value
            group[option] = tuple(values)
        else:
            group[name] = value

    return write_hyper


def import_step_state(torch_state: Mapping[str, Any], param: Tensor, keys: Sequence[str]) -> State:
    """``opt.state[p]`` of an optimizer whose state is a step count and tensors shaped like ``p``
    that start at zero: copies of the tensors and the count as a float, or a fresh state."""
    if len(torch_state) == 0:
        fresh: State = {"step": 0.0}
        fresh.update({k: torch.zeros_like(param, memory_format=torch.preserve_format).detach() for k in keys})
        return fresh
    state: State = {"step": float(torch_state["step"])}
    state.update({k: torch_state[k].detach().clone() for k in keys})
    return state


def export_step_state(state: State, keys: Sequence[str]) -> dict[str, Any]:
    """``opt.state[p]`` as ``torch.optim`` keeps it: the step as a scalar tensor of torch's scalar
    dtype, and copies of the tensors among ``keys`` that the state holds (missing or None: left out)."""
    out: dict[str, Any] = {"step": torch.tensor(float(state["step"]), dtype=_get_scalar_dtype())}
    for key in keys:
        if state.get(key) is not None:
            out[key] = state[key].detach().clone()
    return out


def zeros_state_bar(state: State, keys: Sequence[str]) -> State:
    """Zero cotangents for the differentiable entries of one tensor's state."""
    return {k: torch.zeros_like(state[k]) for k in keys if isinstance(state.get(k), Tensor)}


__all__ = [
    "BETAS",
    "DiffOptimizer",
    "Hyper",
    "KERNEL_MODES",
    "HyperValue",
    "State",
    "add_bar",
    "clone_state",
    "export_step_state",
    "hyper_writer",
    "import_step_state",
    "is_learned",
    "reduce_like",
    "step_all",
    "step_vjp_all",
    "zeros_state_bar",
]
