# SPDX-License-Identifier: Apache-2.0
"""The differentiable-optimizer contract: a pure ``step``, its hand-written ``step_vjp`` and ``step_jvp``, and one declaration.

An optimizer is math plus a declaration (Note [One declaration per optimizer]):

- ``step(theta, G, state, hyper) -> (theta_next, state_next)`` for one parameter tensor, out
  of place, exactly as ``torch.optim`` updates it ([Alg.1 L6]);
- ``step_vjp(theta, G, state, hyper, theta_next_bar, state_next_bar)
  -> (theta_bar, G_bar, state_bar, hyper_bar)``, its vector-Jacobian product by hand
  ([Alg.1 L11], [Alg.1 L12] and the first term of [Alg.1 L14]);
- ``step_jvp(theta, G, state, hyper, theta_dot, G_dot, state_dot, hyper_dot)
  -> (theta_next_dot, state_next_dot)``, its Jacobian-vector product by hand, for
  forward-mode (online) hypergradients (Note [Forward-mode derivatives of a step]);
- a :class:`DiffOptimizer` row that declares its hyperparameters (:class:`Hyperparameter`:
  name, ``torch.optim`` option, valid range), its other options (:class:`Flag`) and its state
  (:class:`StateEntry`). Reading and writing param groups, importing and exporting
  ``opt.state[p]`` and projecting learned values into range are generated from it.

The declarations live in :mod:`gimli_bptt.optim.declarations` (and :class:`Hyperparameter` with the rest of φ in
:mod:`gimli_bptt.metaparams`); the pieces the hand-written derivatives are built from in
:mod:`gimli_bptt.optim.adjoints`.

Note [One declaration per optimizer]: everything the engine needs to know about an optimizer
beyond its math lives in its ``DiffOptimizer`` row, in the optimizer's own file, and the
registry (``optim/__init__.py``) is one tuple of rows. How a fused flat-buffer op implements
it (:class:`FlatLayout`) is declared beside it too, but *which* implementation runs (the
per-tensor loop, the pure-PyTorch twin or the compiled kernels) is decided by
:mod:`gimli_bptt.stepping`, never by the row.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

from .._typing import Hyper, State
from ..metaparams.declaration import Hyperparameter
from .declarations import Flag, FlatLayout, StateEntry
from .derived import derive_step_jvp
from .scalars import export_scalar, torch_scalar_dtype


StepFn = Callable[[Tensor, Tensor, State, Hyper], "tuple[Tensor, State]"]
StepVjpFn = Callable[
    [Tensor, Tensor, State, Hyper, Tensor, State],
    "tuple[Tensor, Tensor, State, dict[str, Tensor]]",
]
StepJvpFn = Callable[
    [Tensor, Tensor, State, Hyper, Tensor, Tensor, State, Mapping[str, Tensor]],
    "tuple[Tensor, State]",
]


@dataclass(frozen=True)
class DiffOptimizer:
    """A ``torch.optim`` optimizer as pure per-tensor math and one declaration.

    ``step(theta, G, state, hyper) -> (theta_next, state_next)`` reproduces the update that
    ``torch.optim`` makes to one parameter tensor, out of place ([Alg.1 L6]).

    ``step_vjp(theta, G, state, hyper, theta_next_bar, state_next_bar)
    -> (theta_bar, G_bar, state_bar, hyper_bar)`` is its vector-Jacobian product, written by
    hand ([Alg.1 L11], [Alg.1 L12] and the first term of [Alg.1 L14]). ``hyper_bar`` holds one
    entry for every hyperparameter given as a tensor, reduced to that tensor's shape with
    :func:`reduce_like`; plain floats get no cotangent. Entries of ``state_next_bar`` may be
    missing (taken as zero).

    ``step_jvp(theta, G, state, hyper, theta_dot, G_dot, state_dot, hyper_dot)
    -> (theta_next_dot, state_next_dot)`` is its Jacobian-vector product, written by hand: the
    derivative of ``(theta_next, state_next)`` in the direction ``(theta_dot, G_dot, state_dot,
    hyper_dot)``, for forward-mode (online) hypergradients, which carry the tangents
    :math:`d\\theta_j/d\\varphi` and :math:`d\\sigma_j/d\\varphi` along the inner loop (Franceschi et
    al., 2017). ``state_dot`` holds a tensor shaped like its entry for differentiable tensor
    entries of ``state``, ``hyper_dot`` one shaped like the hyperparameter (0-d or like the
    parameter) for hyperparameters given as tensors; missing entries are zero, and floats,
    flags and the step count are constants. ``state_next_dot`` holds one entry, shaped like its
    entry, for every differentiable tensor entry of ``state_next``.

    Note [Forward-mode derivatives of a step]: ``step_jvp`` is the forward linearisation of the
    same math as ``step_vjp`` (for each intermediate :math:`x` of the step,
    :math:`\\dot x = \\sum_i \\partial x / \\partial y_i \\, \\dot y_i` over its inputs :math:`y_i`), so that
    :math:`\\langle u, J v \\rangle = \\langle J^\\top u, v \\rangle` holds between the two to round-off:
    every convention at a kink (the branch of a ``max``, a clamp, a sign, a zero second moment)
    is the VJP's. The tangents may carry a leading dimension of directions that the primals do
    not have: the engine calls ``torch.func.vmap(step_jvp, in_dims=(None, None, None, None, 0, 0,
    0, 0))``, so a ``step_jvp`` uses no ``.item()`` and no Python branch on tensor values (only
    on shapes, flags, floats and which tangents are present).

    ``hyper`` maps the name of every :class:`Hyperparameter` (a float, or a tensor when learned)
    and of every :class:`Flag` to its value; ``state`` holds the step count ``"step"`` (a float)
    when ``counts_steps``, and the :class:`StateEntry` tensors.

    Attributes:
        name: Display name, e.g. ``"Adam"``.
        torch_cls: The ``torch.optim`` class this implements.
        step: The pure per-tensor step.
        step_vjp: Its vector-Jacobian product.
        hyper: The float options that can be meta-learned.
        flags: The other options the step reads (booleans, fixed numbers).
        state: The tensor entries of ``opt.state[p]``; None when ``init_state`` builds the state.
        counts_steps: The state holds ``torch.optim``'s step count ``"step"``.
        tensor_step_count: ``step``/``step_vjp`` also take the step count as a 0-d tensor, reading it
            through :func:`~gimli_bptt.optim.adjoints.next_count` and computing with it in tensor arithmetic
            only (no Python branch on it): compiled meta-steps pass it so (Note [Step counts as tensors]
            in :mod:`gimli_bptt.compiled`); otherwise they specialise on each count.
        init_state: ``init_state(param, hyper) -> state`` for optimizers that declare no
            ``state`` entries (registered ones): a fresh state; an existing ``opt.state[p]`` is
            copied as it is.
        elementwise: The step acts on each element alone (so it applies unchanged to tensors
            with a leading task dimension); False for Adafactor's factored moments and Muon's
            orthogonalisation.
        check_param: ``check_param(name, param)`` raises ``ValueError`` for a parameter the
            optimizer cannot take (Muon: not a matrix), or None.
        flat: How the fused flat-buffer ops implement it, or None (per-tensor only).
        notes: What needs care in its derivative, in a sentence.
        step_jvp: Its Jacobian-vector product, or None: derived from ``step`` with
            ``torch.func.jvp`` (:attr:`jvp` gives the one in use).
    """

    name: str
    torch_cls: type
    step: StepFn
    step_vjp: StepVjpFn
    hyper: tuple[Hyperparameter, ...]
    flags: tuple[Flag, ...] = ()
    state: Optional[tuple[StateEntry, ...]] = ()
    counts_steps: bool = False
    tensor_step_count: bool = False
    init_state: Optional[Callable[[Tensor, Hyper], State]] = None
    elementwise: bool = True
    check_param: Optional[Callable[[str, Tensor], None]] = None
    flat: Optional[FlatLayout] = None
    notes: str = field(default="")
    step_jvp: Optional[StepJvpFn] = None

    # --------------------------------------------------------------- the derivatives in use
    @functools.cached_property
    def jvp(self) -> StepJvpFn:
        """The Jacobian-vector product of ``step``: ``step_jvp`` where it is given, else one
        derived with ``torch.func.jvp`` (:func:`gimli_bptt.optim.derived.derive_step_jvp`)."""
        return self.step_jvp if self.step_jvp is not None else derive_step_jvp(self.step)

    @property
    def has_hand_written_jvp(self) -> bool:
        """Whether ``step_jvp`` is given (else :attr:`jvp` is derived with ``torch.func.jvp``)."""
        return self.step_jvp is not None

    # --------------------------------------------------------------- what the declaration implies
    @property
    def hyper_names(self) -> tuple[str, ...]:
        """The names of the learnable hyperparameters."""
        return tuple(h.name for h in self.hyper)

    @property
    def flag_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.flags)

    def hyperparameter(self, name: str) -> Hyperparameter:
        """The declaration of one learnable hyperparameter."""
        for h in self.hyper:
            if h.name == name:
                return h
        raise KeyError(f"{self.name} has no hyperparameter {name!r}")

    def flag(self, name: str) -> Optional[Flag]:
        return next((f for f in self.flags if f.name == name), None)

    def read_hyper(self, group: Mapping[str, Any]) -> dict[str, Any]:
        """``{name: float or flag}`` from a ``torch.optim`` param group."""
        missing = [h.key for h in self.hyper if h.default is None and h.key not in group]
        if missing:
            raise KeyError(f"{self.name} param groups lack {sorted(set(missing))}; declare a default for them")
        out: dict[str, Any] = {h.name: h.read(group) for h in self.hyper}
        out.update({f.name: f.read(group) for f in self.flags})
        return out

    def write_hyper(self, group: dict[str, Any], name: str, value: float) -> None:
        """Writes one learned value back into a param group."""
        self.hyperparameter(name).write(group, value)

    def import_state(self, torch_state: Mapping[str, Any], param: Tensor, hyper: Hyper) -> State:
        """Our state of one tensor from ``opt.state[p]``: copies, or a fresh state where it is empty.

        An entry the options need but ``opt.state[p]`` lacks (amsgrad switched on later) starts fresh.
        """
        if self.state is None:
            if len(torch_state) == 0:
                return dict(self.init_state(param, hyper)) if self.init_state is not None else {}
            return clone_state(torch_state)
        state: State = {}
        if self.counts_steps:
            state["step"] = float(torch_state["step"]) if "step" in torch_state else 0.0
        for entry in self.state:
            value = torch_state.get(entry.name)
            if value is not None:
                state[entry.name] = entry.copy(value, param)
            elif entry.lazy:
                state[entry.name] = None
            elif entry.when is None or entry.when(hyper):
                state[entry.name] = entry.fresh(param, hyper)
        return state

    def export_state(self, state: State, param: Tensor) -> dict[str, Any]:
        """``opt.state[p]`` as ``torch.optim`` keeps it (copies): the step count as a scalar
        tensor of torch's scalar dtype, and the entries that exist."""
        if self.state is None:
            return clone_state(state)
        out: dict[str, Any] = {}
        if self.counts_steps:
            out["step"] = torch.tensor(float(state["step"]), dtype=torch_scalar_dtype())
        for entry in self.state:
            value = state.get(entry.name)
            if value is not None:
                out[entry.name] = export_scalar(value) if entry.scalar else value.detach().clone()
        return out

    def validate(self) -> "DiffOptimizer":
        """Checks that the declaration is coherent; returns ``self``."""
        names = self.hyper_names + self.flag_names
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: a name is declared twice among {names}")
        if not callable(self.step) or not callable(self.step_vjp):
            raise TypeError(f"{self.name}: step and step_vjp must be callables")
        if self.step_jvp is not None and not callable(self.step_jvp):
            raise TypeError(f"{self.name}: step_jvp must be a callable or None")
        if self.flat is not None and any(n not in self.hyper_names for n in self.flat.hyper):
            raise ValueError(f"{self.name}: the flat layout names hyperparameters it does not declare")
        return self



def clone_state(state: Mapping[str, Any]) -> State:
    """A copy of one tensor's state whose tensors are detached clones."""
    return {k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in state.items()}


__all__ = ["DiffOptimizer", "StepFn", "StepJvpFn", "StepVjpFn", "clone_state"]
