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

Note [One declaration per optimizer]: everything the engine needs to know about an optimizer
beyond its math lives in its ``DiffOptimizer`` row, in the optimizer's own file, and the
registry (``optim/__init__.py``) is one tuple of rows. How a fused flat-buffer op implements
it (:class:`FlatLayout`) is declared beside it too, but *which* implementation runs (the
per-tensor loop, the pure-PyTorch twin or the compiled kernels) is decided by
:mod:`gimli_bptt.stepping`, never by the row.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .._typing import Hyper, HyperValue, State
from .derived import derive_step_jvp
from .scalars import export_scalar, scalar_state_dtype, torch_scalar_dtype


StepFn = Callable[[Tensor, Tensor, State, Hyper], "tuple[Tensor, State]"]
StepVjpFn = Callable[
    [Tensor, Tensor, State, Hyper, Tensor, State],
    "tuple[Tensor, Tensor, State, dict[str, Tensor]]",
]
StepJvpFn = Callable[
    [Tensor, Tensor, State, Hyper, Tensor, Tensor, State, Mapping[str, Tensor]],
    "tuple[Tensor, State]",
]
#: A tangent inside a JVP: a tensor, or None for a tangent that is known to be zero (no term).
Dot = Optional[Tensor]


# ---------------------------------------------------------------------------- the declaration
@dataclass(frozen=True)
class Hyperparameter:
    """A float option of a param group that can be meta-learned.

    Attributes:
        name: Our name, the key of ``hyper`` in ``step`` (Adam's ``betas`` are ``beta1``, ``beta2``).
        option: The param-group key that holds it (default: ``name``).
        index: Its position when the option is a tuple (``betas[0]``), else None.
        low: The lowest valid value (None: unbounded).
        high: The highest valid value (None: unbounded).
        open_low: ``low`` itself is invalid (eps > 0): projection stops just above it.
        open_high: ``high`` itself is invalid (beta < 1): projection stops just below it.
        default: The value when a param group lacks the option (None: the option is required).
        doc: What it is, for error messages and the README's table.
    """

    name: str
    option: Optional[str] = None
    index: Optional[int] = None
    low: Optional[float] = 0.0
    high: Optional[float] = None
    open_low: bool = False
    open_high: bool = False
    default: Optional[float] = None
    doc: str = ""

    @property
    def key(self) -> str:
        """The param-group key."""
        return self.option or self.name

    def read(self, group: Mapping[str, Any]) -> float:
        """The value in a ``torch.optim`` param group, as a float."""
        if self.key not in group:
            if self.default is None:
                raise KeyError(f"the param group has no option {self.key!r}")
            return float(self.default)
        value = group[self.key]
        if self.index is not None:
            value = value[self.index]
        return float(value)

    def write(self, group: dict[str, Any], value: float) -> None:
        """Stores ``value`` into a param group (inside its tuple option when ``index`` is set)."""
        if self.index is None:
            group[self.key] = value
            return
        values = list(group[self.key])
        values[self.index] = value
        group[self.key] = tuple(values)

    @torch.no_grad()
    def project_(self, t: Tensor) -> None:
        """Clamps ``t`` in place into the valid range (projected gradient descent on φ_opt)."""
        finfo = torch.finfo(t.dtype)
        if self.low is not None:
            low = max(self.low + abs(self.low) * finfo.eps, self.low + finfo.tiny) if self.open_low else self.low
            t.clamp_(min=low)
        if self.high is not None:
            high = self.high - max(abs(self.high), 1.0) * finfo.eps if self.open_high else self.high
            t.clamp_(max=high)


@dataclass(frozen=True)
class Flag:
    """An option of a param group that the step reads but that is not meta-learned.

    Attributes:
        name: The param-group key (and the key in ``hyper``).
        default: The value when a param group lacks the option.
        kind: How it is read (``bool``, or ``float``/``int`` for a fixed number such as ASGD's ``t0``).
        why: Why it cannot be learned, for the error message of ``learn={name: ...}``.
    """

    name: str
    default: Any = False
    kind: type = bool
    why: str = ""

    def read(self, group: Mapping[str, Any]) -> Any:
        return self.kind(group.get(self.name, self.default))


#: Makes the fresh value of one state entry from the parameter and its hyperparameters.
StateInit = Callable[[Tensor, Hyper], Tensor]


@dataclass(frozen=True)
class StateEntry:
    """One tensor entry of ``opt.state[p]``.

    Attributes:
        name: Its key, in ``torch.optim``'s naming (``exp_avg``).
        init: Its value in a fresh state: a fill value (0.0: zeros like the parameter), or a
            function ``init(param, hyper)``.
        scalar: A 0-d entry that ``torch.optim`` keeps in its scalar dtype (NAdam's
            ``mu_product``); a fill value then makes a 0-d tensor.
        lazy: Absent until the first step creates it (SGD's momentum buffer): a fresh state
            holds None.
        when: The entry exists only for these options (amsgrad's ``max_exp_avg_sq``).
    """

    name: str
    init: Union[float, StateInit] = 0.0
    scalar: bool = False
    lazy: bool = False
    when: Optional[Callable[[Hyper], bool]] = None

    def fresh(self, param: Tensor, hyper: Hyper) -> Optional[Tensor]:
        if self.lazy:
            return None
        if callable(self.init):
            return self.init(param, hyper).detach()
        if self.scalar:
            return torch.full((), float(self.init), dtype=scalar_state_dtype(param), device=param.device)
        return torch.full_like(param, float(self.init), memory_format=torch.preserve_format).detach()

    def copy(self, value: Any, param: Tensor) -> Tensor:
        if self.scalar:
            return torch.as_tensor(value).detach().to(dtype=scalar_state_dtype(param), device=param.device).clone()
        return value.detach().clone()


@dataclass(frozen=True)
class FlatLayout:
    """How one optimizer's per-tensor contract maps onto a pair of fused flat-buffer ops.

    The ops ``<op>_step`` and ``<op>_step_vjp`` (``torch.ops.gimli`` and their pure-PyTorch twin
    in :mod:`gimli_bptt.kernels._reference`) take many tensors laid end to end; a *bucket* of
    tensors shares the op's static options (Note [Flat buffers] in ``kernels/flat.py``).
    The step op is called as ``step(θ, G, *state_in, offsets, hyper, elementwise, *args)`` and
    returns ``(θ', *state_out)``; the VJP op as ``vjp(θ, G, *state_in, θ̄', *bar_in, offsets,
    hyper, elementwise, learned, *args)`` and returns ``(θ̄, Ḡ, *bar_out, hyper_bars)``. A
    name of None in those lists is an absent buffer (passed as None, ignored on return).

    Attributes:
        op: The op pair's name stem (``"adam"``).
        hyper: The hyperparameter slots, in the op's order.
        options: ``options(hyper, state)`` of one tensor: the op's static options (a tuple);
            tensors with different options go to different buckets.
        state_in: ``state_in(options)``: the state entries the ops read.
        state_out: ``state_out(options)``: the state entries the step op returns.
        bar_in: ``bar_in(options)``: the carried state cotangents the VJP op reads.
        bar_out: ``bar_out(options)``: the state cotangents it returns.
        args: ``args(options, t)``: the trailing scalar arguments (``t`` is the step count of
            the step being taken when ``counter`` is set, else None).
        counter: The state's step count (``"step"``), read per call and advanced by one, or None.
        cpu_loop_below: Under ``kernels="auto"``, a call on CPU tensors that hold fewer elements
            than this in all runs the per-tensor functions instead of the flat ops (0: never),
            if ``cpu_loop_if`` holds for every tensor's hyperparameters.
            See Note [Small steps run per tensor] in :mod:`gimli_bptt.stepping`.
        cpu_loop_if: ``cpu_loop_if(hyper)``: whether a tensor with these hyperparameters is cheap
            enough per tensor for ``cpu_loop_below`` (None: always).
    """

    op: str
    hyper: tuple[str, ...]
    options: Callable[[Hyper, State], tuple]
    state_in: Callable[[tuple], tuple[Optional[str], ...]]
    state_out: Callable[[tuple], tuple[Optional[str], ...]]
    bar_in: Callable[[tuple], tuple[Optional[str], ...]]
    bar_out: Callable[[tuple], tuple[Optional[str], ...]]
    args: Callable[[tuple, Optional[float]], tuple]
    counter: Optional[str] = None
    cpu_loop_below: int = 0
    cpu_loop_if: Optional[Callable[[Hyper], bool]] = None


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


def add_dots(*terms: Dot) -> Dot:
    """The sum of the tangents that are present (None where none is)."""
    out: Dot = None
    for term in terms:
        if term is not None:
            out = term if out is None else out + term
    return out


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


def clone_state(state: Mapping[str, Any]) -> State:
    """A copy of one tensor's state whose tensors are detached clones."""
    return {k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in state.items()}


# ---------------------------------------------------------------------------- common declarations
def lr(**kw: Any) -> Hyperparameter:
    return Hyperparameter("lr", doc="learning rate", **kw)


def weight_decay(**kw: Any) -> Hyperparameter:
    return Hyperparameter("weight_decay", doc="weight decay", **kw)


def eps(**kw: Any) -> Hyperparameter:
    return Hyperparameter("eps", open_low=True, doc="the term that keeps a denominator away from 0", **kw)


def betas(first: str = "beta1", second: str = "beta2") -> tuple[Hyperparameter, Hyperparameter]:
    """Adam-style ``betas=(beta1, beta2)``, each in [0, 1)."""
    return (Hyperparameter(first, option="betas", index=0, high=1.0, open_high=True, doc="first-moment decay"),
            Hyperparameter(second, option="betas", index=1, high=1.0, open_high=True, doc="second-moment decay"))


MAXIMIZE = Flag("maximize")

#: The domain a hyperparameter registered by name alone gets (register_optimizer), by convention.
CONVENTIONAL: dict[str, Hyperparameter] = {
    h.name: h for h in (lr(), weight_decay(), eps(), *betas(),
                        Hyperparameter("momentum", high=1.0), Hyperparameter("dampening", high=1.0))
}


def unit_interval(name: str, **kw: Any) -> Hyperparameter:
    """A decay rate in [0, 1] (momentum, rho, alpha)."""
    return Hyperparameter(name, high=1.0, **kw)


def declared(names: Sequence[Union[str, Hyperparameter]]) -> tuple[Hyperparameter, ...]:
    """Hyperparameters from declarations or bare names: a bare name is read as ``group[name]``
    and gets :data:`CONVENTIONAL`'s range when it has one (``beta1`` in [0, 1)), else no bound."""
    out = []
    for n in names:
        if isinstance(n, Hyperparameter):
            out.append(n)
        elif n in CONVENTIONAL:
            out.append(dataclasses.replace(CONVENTIONAL[n], option=None, index=None))
        else:
            out.append(Hyperparameter(n, low=None))
    return tuple(out)


__all__ = [
    "CONVENTIONAL",
    "DiffOptimizer",
    "Dot",
    "Flag",
    "FlatLayout",
    "Hyper",
    "HyperValue",
    "Hyperparameter",
    "MAXIMIZE",
    "State",
    "StateEntry",
    "StepFn",
    "StepJvpFn",
    "StepVjpFn",
    "add_bar",
    "add_dots",
    "betas",
    "carried_dots",
    "clone_state",
    "coupled_gradient",
    "coupled_gradient_jvp",
    "coupled_gradient_vjp",
    "declared",
    "dense_dot",
    "eps",
    "hyper_dot_of",
    "is_active",
    "is_learned",
    "lr",
    "mul_dot",
    "reduce_like",
    "state_dot_of",
    "unit_interval",
    "weight_decay",
    "where_dot",
    "zero_missing_bars",
]
