# SPDX-License-Identifier: Apache-2.0
"""The optimizer table: one :class:`Row` per optimizer configuration, read by every oracle of the test suite.

Adding an optimizer
===================

1. ``gimli_bptt/optim/<name>.py``: its ``step``, ``step_vjp`` and :class:`~gimli_bptt.optim.DiffOptimizer` row.
2. ``gimli_bptt/optim/__init__.py``: that row in ``BUILT_IN``.
3. Here: its rows in :data:`ROWS` (a family helper such as ``_sgd`` below, then one line per
   configuration). ``test_every_built_in_optimizer_has_a_row`` fails until it has one.
4. ``docs/GUIDE.md``: its line in the table of optimizers.

No other edit: every oracle iterates over :data:`ROWS` and collects each row under its ``id``
(``python -m pytest --collect-only -q | grep <id>`` lists them). The oracles, by the key that
``skips`` and ``xfails`` use, with the :class:`Tolerances` field each one reads:

- ``step`` (test_optim_step.py): ``step`` against ``torch.optim`` over 20 steps in float64, two
  param groups, every granularity, from an empty state and after 3 torch steps, every torch
  kernel (``tol.step``);
- ``export`` (test_optim_step.py): ``export_state`` loaded into torch takes our next step, and
  ``step`` changes none of its inputs;
- ``step-random`` (test_optim_step.py): ``step`` against torch at random hyperparameters,
  shapes, warm-ups and granularities (``tol.step``);
- ``vjp`` (test_optim_vjp.py): ``step_vjp`` against autograd through ``step``, for each learned
  hyperparameter alone and all together, with full, partial and empty state cotangents, and its
  purity (``tol.vjp``, ``floors``);
- ``dot`` (test_optim_vjp.py): the dot-product test <u, J v> = <J^T u, v> (``tol.vjp``);
- ``vjp-random`` (test_optim_vjp.py): both at random hyperparameters, shapes and warm-ups;
- ``jvp`` (test_optim_jvp.py): ``step_jvp`` against forward mode (``torch.func.jvp``) through
  ``step``, for each learned hyperparameter alone and all together and for each input's tangent
  alone; the adjoint test <u, JVP(v)> = <VJP(u), v> against ``step_vjp``; under
  ``torch.func.vmap`` over a leading dimension of directions; its purity (``tol.vjp``, ``floors``);
- ``jvp-random`` (test_optim_jvp.py): the same at random hyperparameters, shapes and warm-ups;
- ``hypergrad`` (test_hypergrad.py): hypergradients against the full autograd unroll
  (``check_hypergradients``) on a BatchNorm conv net, every hyperparameter at each
  granularity (``tol.hypergrad``);
- ``hypergrad-random`` (test_hypergrad.py): the same on random models, unrolls,
  meta-parameters and HVP modes;
- ``fd`` (test_hypergrad.py): hypergradients against central differences of real
  ``torch.optim`` training (``tol.fd``, ``tol.fd_floor``, ``fd``);
- ``write-back`` (test_optim_state.py): after a meta step every learned value is in
  ``param_groups``, inside its tuple option where it has one.

Edge cases that belong to one optimizer (a zero accumulator, a tie, a switch) are in
test_optim_limits.py and test_optim_state.py; they take their configurations from rows too.

A row
=====

``Row("adam-amsgrad", torch.optim.Adam, dict(lr=0.01, amsgrad=True), dict(lr=0.003))`` is
``torch.optim.Adam`` built with those kwargs (the first param group's values) whose second
param group overrides ``lr``. The defaults fit an element-wise optimizer whose step matches
``torch.optim`` to round-off; a row says where it differs, in the row:

- ``tol``: :class:`Tolerances`, per oracle (never looser than an oracle needs: they are checked
  as ``error <= tolerance``);
- ``floors``: ``floors(row, theta, G, state, hyper, theta_next_bar) -> {"G" or a hyperparameter
  name: size}``, the size of terms that cancel in a VJP cotangent (Adam's m' and v' paths at the
  first step): that cotangent is then compared relative to ``max(|expected|, size)``;
- ``fd``: :class:`FiniteDifferences`, which hyperparameters the finite-difference oracle leaves
  out (every learnable one is checked by default), and which it expects to have no effect;
- ``shapes``: :class:`Shapes`, the parameter shapes the oracles use (:data:`MATRICES` for an
  optimizer that only takes matrices); engine tests give the optimizer only the model's
  parameters it accepts;
- ``kernels``: the torch kernels the step is compared with (default: ``for_loop`` and, where the
  class has them, ``foreach`` and ``fused``);
- ``skips`` and ``xfails``: ``{oracle key: reason}`` (a kernel alone: ``"step:foreach"``), a
  documented skip, or a known library bug (``xfail(strict=True)``);
- ``ranges``, ``fixed``, ``valid``: how the random oracles draw hyperparameters. By default
  every :class:`~gimli_bptt.optim.Hyperparameter` of the declaration is drawn inside its
  declared range (``low``/``high``, open bounds kept out), around the row's own values where a
  bound is missing (:func:`default_range`), and every boolean :class:`~gimli_bptt.optim.Flag`
  that the torch class takes is drawn too; ``ranges`` narrows a hyperparameter (``Range``),
  ``fixed`` keeps names at the row's values, ``valid(hyper)`` rejects draws torch would accept
  but the optimizer is not defined for; draws torch's constructor rejects are rejected too;
- ``prepare``: moves a VJP test point off a tie where the step has no derivative (amsgrad);
- ``extra_state_when_learned``: our state may hold an entry torch's lacks when hyperparameters
  are learned (Note [Learned momentum]);
- ``torch_context``: a context in which torch's reference steps run (an optimizer whose torch
  version rounds through a lower precision can remove that rounding there).

``prepare(row, theta, G, state, hyper, warmup)`` changes ``state`` in place; the floors and
``valid`` read the hyper dict of one tensor (floats, flags, and tensors where learned). Rows of
one class share their fields through a family helper::

    _muon = _family(torch.optim.Muon, shapes=MATRICES, torch_context=without_bfloat16_cast)

    ROWS: list[Row] = [
        ...
        # Muon
        _muon("muon-default", dict(), dict(lr=0.02)),
        _muon("muon-no_nesterov", dict(lr=0.02, nesterov=False), dict(momentum=0.9)),
    ]

and a tolerance that must differ says why beside it, from the row's conditioning (CONTRIBUTING.md,
"How a tolerance is chosen"): ``tol=Tolerances(step=float64_rtol(terms=1, condition=1e4))``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Mapping, Optional, Sequence

import pytest
import torch
from hypothesis import assume
from hypothesis import strategies as st
import torch.optim._muon as _torch_muon
from torch import Tensor

from gimli_bptt.optim import BUILT_IN, DiffOptimizer, Hyperparameter, get_optimizer
from gimli_bptt.testing import float64_rtol, relative_error
from gimli_bptt.optim.adafactor import _forward as _adafactor_forward

DTYPE = torch.float64
Shape = tuple[int, ...]

#: The granularities of a hyperparameter in the per-tensor oracles: a Python float (fixed), a
#: 0-d tensor (learned per group or per tensor), a tensor shaped like the parameter (per element).
GRANULARITIES = ("float", "0d", "element")

#: The oracles a row can skip or mark as failing (the keys of ``Row.skips`` and ``Row.xfails``).
ORACLES = ("step", "export", "step-random", "vjp", "dot", "vjp-random", "hypergrad", "hypergrad-random", "fd",
           "write-back", "jvp", "jvp-random")
#: The torch implementations of a step: the keyword that selects each.
KERNELS: dict[str, dict[str, bool]] = {"for_loop": {"foreach": False}, "foreach": {"foreach": True},
                                       "fused": {"fused": True}}


# ---------------------------------------------------------------------------- what a row holds
@dataclass(frozen=True)
class Tolerances:
    """The largest error each oracle accepts for a row.

    Attributes:
        step: Relative error of θ and every state entry against ``torch.optim`` (float64, 20 steps).
        vjp: Relative error of every cotangent against autograd, and of the dot-product test;
            of every tangent of ``step_jvp`` against forward mode.
        hypergrad: Relative error against the full autograd unroll (``check_hypergradients``).
        fd: Error against central differences of ``torch.optim`` runs, relative to
            ``max(|fd|, fd_floor)``.
        fd_floor: See ``fd``.
    """

    #: 20 steps of torch.optim grow the rounding of θ and the state at most 8.7 times over the rows at
    #: their defaults (testing.rounding_amplification of each row's 20 torch.optim steps, float32 vs
    #: float64); drawn hyperparameters (eps near its bound, β2 near 1) grow it further, hence 1e3
    step: float = float64_rtol(terms=1, condition=1e3)
    vjp: float = 1e-10
    hypergrad: float = 1e-9
    fd: float = 1e-5
    fd_floor: float = 1e-6


@dataclass(frozen=True)
class FiniteDifferences:
    """What the finite-difference oracle checks for a row (every learnable hyperparameter by default).

    Attributes:
        skip: ``{name: reason}``: hyperparameters it leaves out.
        zero: ``{name: reason}``: hyperparameters whose finite difference may be exactly 0 (no
            effect on torch's run); every other one must move the validation loss. A key
            ``"name:2"`` allows it in param group 2 only (``"name:1"``: group 1).
        steps: ``{name: h}``: the step of one hyperparameter, instead of 1e-4 of the smaller of
            its value and its distance to a declared bound (1e-6, one-sided, at 0).
    """

    skip: Mapping[str, str] = field(default_factory=dict)
    zero: Mapping[str, str] = field(default_factory=dict)
    steps: Mapping[str, float] = field(default_factory=dict)

    def may_be_zero(self, name: str, group: int) -> bool:
        """Whether the finite difference of ``name`` in param group ``group`` (0-based) may be 0."""
        return name in self.zero or f"{name}:{group + 1}" in self.zero


@dataclass(frozen=True)
class Shapes:
    """The parameter shapes the oracles give a row's optimizer.

    Attributes:
        groups: The shapes of the tensors of param group 1 and of param group 2 (step oracle).
        vjp: The shapes of the VJP oracles' points.
        single: The shape of single-tensor checks (purity, probes).
        min_ndim: The fewest dimensions a parameter may have.
        max_ndim: The most (None: any).
    """

    groups: tuple[tuple[Shape, ...], tuple[Shape, ...]] = (((), (3, 5)), ((7,), (2, 1, 3)))
    vjp: tuple[Shape, ...] = ((), (7,), (2, 3))
    single: Shape = (3, 4)
    min_ndim: int = 0
    max_ndim: Optional[int] = None

    def accepts(self, shape: Sequence[int]) -> bool:
        """Whether the optimizer takes a parameter of this shape."""
        return len(shape) >= self.min_ndim and (self.max_ndim is None or len(shape) <= self.max_ndim)

    def strategy(self) -> st.SearchStrategy[Shape]:
        """Random shapes it takes: 1 to 4 elements along each of up to 3 dimensions."""
        high = 3 if self.max_ndim is None else min(self.max_ndim, max(3, self.min_ndim))
        return st.lists(st.integers(1, 4), min_size=self.min_ndim, max_size=high).map(tuple)


#: Every shape, 0-d included.
ANY_SHAPE = Shapes()
#: Matrices only (an optimizer that orthogonalises its update).
MATRICES = Shapes(groups=(((3, 5), (4, 4)), ((6, 2), (2, 7))), vjp=((3, 4), (5, 2), (1, 6)), single=(3, 4),
                  min_ndim=2, max_ndim=2)


@dataclass(frozen=True)
class Range:
    """Where a random oracle draws one hyperparameter: ``special`` values, or a float in
    ``[low, high]`` (log-uniform when ``log``)."""

    low: float
    high: float
    log: bool = False
    special: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.low <= self.high or (self.log and self.low <= 0):
            raise ValueError(f"empty or invalid range {self}")

    def strategy(self) -> st.SearchStrategy[float]:
        low, high = self.low, self.high
        if low == high:
            core: st.SearchStrategy[float] = st.just(low)
        elif self.log:
            core = st.floats(math.log10(low), math.log10(high)).map(lambda e: min(max(10.0**e, low), high))
        else:
            core = st.floats(low, high)
        return st.sampled_from(self.special) | core if self.special else core


def default_range(h: Hyperparameter, values: Sequence[float]) -> Range:
    """Where a hyperparameter is drawn by default: inside its declared range, near the row's values.

    A range bounded on both sides is drawn whole, 1e-4 of its width away from each end (an open
    end is invalid, a closed upper end is a corner of its own: momentum 1 never decays). A range
    open above is drawn from 1/100 to 10 times the largest distance of the row's values from
    its lower bound (0.1 where every value is at the bound), log-uniformly above 0; likewise
    below an upper bound only; an unbounded one within half the largest value either side.
    Where one of the row's values sits on a closed bound (weight decay 0, momentum 0: a term
    switched off), that bound is drawn too, half of the time.
    """
    lo, hi = h.low, h.high
    special = tuple(sorted({b for b, closed in ((lo, not h.open_low), (hi, not h.open_high))
                            if b is not None and closed and any(v == b for v in values)}))
    if lo is not None and hi is not None:
        pad = 1e-4 * (hi - lo)
        return Range(lo + pad, hi - pad, special=special)
    if lo is not None:
        s = max((abs(v - lo) for v in values), default=0.0) or 0.1
        return Range(lo + s / 100, lo + 10 * s, log=lo == 0.0, special=special)
    if hi is not None:
        s = max((abs(v - hi) for v in values), default=0.0) or 0.1
        return Range(hi - 10 * s, hi - s / 100, special=special)
    s = max((abs(v) for v in values), default=0.0) or 1.0
    return Range(min(values, default=0.0) - s / 2, max(values, default=0.0) + s / 2)


#: ``floors(row, theta, G, state, hyper, theta_next_bar) -> {"G" or hyperparameter name: size}``.
Floors = Callable[..., dict[str, float]]


@dataclass(frozen=True)
class Row:
    """One optimizer configuration, and everything the oracles need to know to test it.

    The first four fields are positional: ``Row(id, torch_cls, kwargs, group2)``. See the
    module docstring for the others.
    """

    id: str
    torch_cls: type
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    group2: Mapping[str, Any] = field(default_factory=dict)
    tol: Tolerances = Tolerances()
    floors: Optional[Floors] = None
    fd: FiniteDifferences = FiniteDifferences()
    shapes: Shapes = ANY_SHAPE
    kernels: Optional[tuple[str, ...]] = None
    skips: Mapping[str, str] = field(default_factory=dict)
    xfails: Mapping[str, str] = field(default_factory=dict)
    ranges: Mapping[str, Range] = field(default_factory=dict)
    fixed: frozenset[str] = frozenset()
    valid: Optional[Callable[[Mapping[str, Any]], bool]] = None
    prepare: Optional[Callable[..., None]] = None
    extra_state_when_learned: Optional[Callable[[Mapping[str, Any]], bool]] = None
    torch_context: Callable[[], ContextManager[Any]] = contextlib.nullcontext

    def __post_init__(self) -> None:
        for key in (*self.skips, *self.xfails):
            oracle = key.partition(":")[0]
            if oracle not in ORACLES:
                raise ValueError(f"row {self.id}: unknown oracle {key!r} (one of {ORACLES})")
        names = set(self.impl.hyper_names) | set(self.impl.flag_names)
        zero = {key.partition(":")[0] for key in self.fd.zero}
        unknown = (set(self.ranges) | set(self.fixed) | set(self.fd.skip) | zero | set(self.fd.steps)) - names
        if unknown:
            raise ValueError(f"row {self.id}: {self.impl.name} has no hyperparameter or flag {sorted(unknown)}")
        for kernel in self.kernels or ():
            if kernel not in self.torch_kernels():
                raise ValueError(f"row {self.id}: torch.optim.{self.torch_cls.__name__} has no {kernel} kernel")

    def __repr__(self) -> str:
        return f"{self.id}({self.torch_cls.__name__}, {dict(self.kwargs)}, group2={dict(self.group2)})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """How hypothesis prints a falsifying row: its id and settings, not every field."""
        printer.text(repr(self))

    # ------------------------------------------------------------------ the optimizer
    @property
    def impl(self) -> DiffOptimizer:
        """Our differentiable version of the row's class."""
        return get_optimizer(self.torch_cls)

    def signature(self) -> frozenset[str]:
        """The keyword arguments of the torch class's constructor."""
        return _signature(self.torch_cls)

    def torch_kernels(self) -> tuple[str, ...]:
        """The torch implementations the class has (``for_loop`` always)."""
        return ("for_loop",) + tuple(k for k in ("foreach", "fused") if k in self.signature())

    @property
    def step_kernels(self) -> tuple[str, ...]:
        """The torch kernels the step oracle compares with."""
        return self.kernels if self.kernels is not None else self.torch_kernels()

    def torch_optimizer(self, groups: Sequence[Sequence[Tensor]], kernel: Optional[str] = None
                        ) -> torch.optim.Optimizer:
        """The row's ``torch.optim`` optimizer over one or two param groups.

        The first group takes ``kwargs``, the second ``kwargs`` and the ``group2`` overrides; an
        empty second group is left out. ``kernel`` picks torch's implementation (None: torch's
        default, the for-loop on the CPU).
        """
        param_groups: list[dict[str, Any]] = [{"params": list(groups[0])}]
        if len(groups) > 1 and len(groups[1]) > 0:
            param_groups.append({"params": list(groups[1]), **self.group2})
        extra = {} if kernel is None or (kernel == "for_loop" and "foreach" not in self.signature()) \
            else KERNELS[kernel]
        return self.torch_cls(param_groups, **self.kwargs, **extra)

    def for_model(self, model: torch.nn.Module, grouped: bool = True) -> torch.optim.Optimizer:
        """The optimizer over the model's parameters it accepts (:class:`Shapes`), in two param
        groups (the first half of them and the rest) or in one."""
        params = [p for p in model.parameters() if self.shapes.accepts(p.shape)]
        if not params:
            raise ValueError(f"row {self.id}: the model has no parameter of the shapes it takes")
        if not grouped or len(params) == 1:
            return self.torch_optimizer([params])
        half = len(params) // 2
        return self.torch_optimizer([params[:half], params[half:]])

    def hyper(self, group: int = 0) -> dict[str, Any]:
        """The hyper dict (floats and flags) that ``read_hyper`` gives for one of the two groups."""
        probe = [torch.nn.Parameter(torch.zeros(self.shapes.single, dtype=DTYPE)) for _ in range(2)]
        opt = self.torch_optimizer([probe[:1], probe[1:]])
        return self.impl.read_hyper(opt.param_groups[group])

    # ------------------------------------------------------------------ the oracles
    def marks(self, oracle: str) -> list[pytest.MarkDecorator]:
        """The skip or strict xfail of one oracle (``"step:foreach"`` also looks up ``"step"``)."""
        marks = []
        for key in (oracle, oracle.partition(":")[0]):
            if key in self.skips:
                marks.append(pytest.mark.skip(reason=f"{self.id}: {self.skips[key]}"))
            if key in self.xfails:
                marks.append(pytest.mark.xfail(strict=True, reason=f"{self.id}: {self.xfails[key]}"))
        return marks

    def fd_names(self) -> tuple[str, ...]:
        """The hyperparameters the finite-difference oracle checks."""
        return tuple(n for n in self.impl.hyper_names if n not in self.fd.skip)

    # ------------------------------------------------------------------ random draws
    def range(self, name: str) -> Range:
        """Where the random oracles draw ``name``."""
        if name in self.ranges:
            return self.ranges[name]
        return default_range(self.impl.hyperparameter(name), [float(self.hyper(g)[name]) for g in (0, 1)])

    def random_flags(self) -> tuple[str, ...]:
        """The boolean flags the random oracles draw: those the torch class takes."""
        return tuple(f.name for f in self.impl.flags
                     if f.kind is bool and f.name in self.signature() and f.name not in self.fixed)

    def with_kwargs(self, kwargs: Mapping[str, Any], suffix: str = "random") -> "Row":
        """This row with other constructor kwargs and one setting for both groups."""
        return dataclasses.replace(self, id=f"{self.id}~{suffix}", kwargs=dict(kwargs), group2={})

    def is_valid(self) -> bool:
        """Whether torch's constructor takes ``kwargs`` and ``valid`` accepts them."""
        try:
            self.torch_cls([torch.nn.Parameter(torch.zeros(self.shapes.single, dtype=DTYPE))], **self.kwargs)
        except ValueError:
            return False
        return self.valid is None or bool(self.valid(self.hyper(0)))


@functools.cache
def _signature(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.__init__).parameters)


@st.composite
def random_variant(draw: st.DrawFn, row: Row) -> Row:
    """``row`` with every hyperparameter and boolean flag drawn as the row declares (one setting for
    both param groups); draws torch's constructor or ``row.valid`` rejects are rejected."""
    impl = row.impl
    probe = row.torch_optimizer([[torch.nn.Parameter(torch.zeros(row.shapes.single, dtype=DTYPE))]])
    defaults = probe.param_groups[0]
    kwargs: dict[str, Any] = dict(row.kwargs)
    for h in impl.hyper:
        if h.name in row.fixed:
            continue
        if h.index is not None and h.key not in kwargs:
            kwargs[h.key] = tuple(defaults[h.key])
        h.write(kwargs, draw(row.range(h.name).strategy(), label=h.name))
    for name in row.random_flags():
        kwargs[name] = draw(st.booleans(), label=name)
    variant = row.with_kwargs(kwargs)
    assume(variant.is_valid())
    return variant


# ---------------------------------------------------------------------------- numeric helpers
def learn(hyper: Mapping[str, Any], names: Sequence[str], granularity: str, like: Tensor) -> dict[str, Any]:
    """A copy of ``hyper`` whose ``names`` are turned into tensors of the given granularity."""
    out = dict(hyper)
    if granularity == "float":
        return out
    for name in names:
        value = float(hyper[name])
        if granularity == "0d":
            out[name] = torch.tensor(value, dtype=DTYPE)
        elif granularity == "element":
            out[name] = torch.full_like(like, value, dtype=DTYPE)
        else:
            raise ValueError(granularity)
    return out


def random_like(shape: Sequence[int], gen: torch.Generator) -> Tensor:
    """A standard normal float64 tensor of ``shape`` from ``gen``."""
    return torch.randn(tuple(shape), generator=gen, dtype=DTYPE)


def tensor_keys(state: Mapping[str, Any]) -> list[str]:
    """The keys of the differentiable (tensor) entries of one tensor's state, sorted."""
    return sorted(k for k, v in state.items() if isinstance(v, Tensor))


def rel_err(actual: Tensor, expected: Tensor, floor: float = 0.0) -> float:
    """:func:`gimli_bptt.testing.relative_error` of two tensors of the same shape (in float64).

    ``floor`` is the size of the terms that cancel in ``expected`` where it is much smaller
    than they are: neither side can then be more accurate than round-off of those terms.
    """
    actual, expected = torch.as_tensor(actual, dtype=DTYPE), torch.as_tensor(expected, dtype=DTYPE)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return relative_error(actual, expected, floor)


def assert_rel(actual: Tensor, expected: Tensor, tol: float, what: str, floor: float = 0.0) -> None:
    """``actual`` is finite and within relative error ``tol`` of ``expected`` (see :func:`rel_err`)."""
    assert torch.isfinite(torch.as_tensor(actual)).all(), f"{what}: not finite: {actual}"
    err = rel_err(actual, expected, floor)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}\nactual={actual}\nexpected={expected}"


# ---------------------------------------------------------------------------- per-optimizer knowledge
def _adam_m_path(row: Row, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                 theta_next_bar: Tensor) -> Tensor:
    """|theta_next_bar| (1 - b1) lr / (c1 d): the size of the m' path of Adam's G cotangent.

    At the first step sqrt(v')/c2 = |g|, so theta' = theta - lr sign(g) |g| / (|g| + eps): the m'
    and v' paths of dtheta'/dg nearly cancel, leaving lr eps / (|g| + eps)^2. autograd and the
    hand-written VJP both subtract the two paths, so both are only accurate relative to them.
    """
    sn = row.impl.step(theta, G, state, hyper)[1]
    b1, b2, lr, eps, t = hyper["beta1"], hyper["beta2"], hyper["lr"], hyper["eps"], sn["step"]
    v_hat = sn.get("max_exp_avg_sq", sn["exp_avg_sq"])
    denom = v_hat.sqrt() / (1 - b2**t) ** 0.5 + eps
    return (theta_next_bar.abs() * (1 - b1) * lr / (1 - b1**t) / denom).detach()


def adam_floors(row: Row, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                theta_next_bar: Tensor) -> dict[str, float]:
    """Adam and AdamW: G's cotangent relative to its m' path (:func:`_adam_m_path`), and coupled
    weight decay's, <theta, g_bar>, relative to <|theta|, that path>."""
    path = _adam_m_path(row, theta, G, state, hyper, theta_next_bar)
    floors = {"G": path.max().item()}
    if not hyper["decoupled_weight_decay"]:
        floors["weight_decay"] = (theta.abs() * path).sum().item()
    return floors


def untie_amsgrad(row: Row, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                  warmup: int) -> None:
    """With amsgrad, after a warm-up: moves the running maximum away from v' (``v' != vmax``
    everywhere, each side on some elements): max(vmax, v') has no derivative at a tie."""
    if not hyper.get("amsgrad") or warmup == 0:
        return
    v_next = row.impl.step(theta, G, state, hyper)[1]["exp_avg_sq"]
    side = torch.arange(v_next.numel()).reshape(v_next.shape) % 2 == 0
    state["max_exp_avg_sq"] = torch.where(side, 0.5 * v_next, 2.0 * v_next)


def _nadam_g_path(row: Row, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                  theta_next_bar: Tensor) -> Tensor:
    """|theta_next_bar| (|c_g| + (1 - b1) |c_m|) / d: the size of NAdam's first-order paths of G_bar.

    As for Adam (:func:`_adam_m_path`), at the first step they nearly cancel against the v' path."""
    sn = row.impl.step(theta, G, state, hyper)[1]
    b1, b2, lr, eps, md, t = (hyper["beta1"], hyper["beta2"], hyper["lr"], hyper["eps"], hyper["momentum_decay"],
                              sn["step"])
    mu, mu_n = b1 * (1 - 0.5 * 0.96 ** (t * md)), b1 * (1 - 0.5 * 0.96 ** ((t + 1) * md))
    p1 = sn["mu_product"]
    denom = (sn["exp_avg_sq"] / (1 - b2**t)).sqrt() + eps
    c_g, c_m = lr * (1 - mu) / (1 - p1), lr * mu_n / (1 - p1 * mu_n)
    return (theta_next_bar.abs() * (abs(c_g) + (1 - b1) * abs(c_m)) / denom).detach()


def nadam_floors(row: Row, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                 theta_next_bar: Tensor) -> dict[str, float]:
    """NAdam: as :func:`adam_floors`, with NAdam's paths (:func:`_nadam_g_path`)."""
    path = _nadam_g_path(row, theta, G, state, hyper, theta_next_bar)
    floors = {"G": path.max().item()}
    if not hyper["decoupled_weight_decay"]:
        floors["weight_decay"] = (theta.abs() * path).sum().item()
    return floors


def _linear_path_floors(path: Tensor, theta: Tensor) -> dict[str, float]:
    return {"G": path.max().item(), "weight_decay": (theta.abs() * path).sum().item()}


def adagrad_floors(row: Row, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                   theta_next_bar: Tensor) -> dict[str, float]:
    """Adagrad, g / (sqrt(sum) + eps): where the sum is dominated by g^2 (the first step from a zero
    state above all) it is nearly flat in g, the numerator and denominator paths of G_bar nearly
    cancel (as Adam's), and both sides are accurate only relative to the numerator's path."""
    with torch.no_grad():
        sn = row.impl.step(theta, G, state, hyper)[1]
        path = hyper["lr"] / (1 + (sn["step"] - 1) * hyper["lr_decay"]) / (sn["sum"].sqrt() + hyper["eps"])
        return _linear_path_floors((theta_next_bar.abs() * path).detach(), theta)


def rmsprop_floors(row: Row, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                   theta_next_bar: Tensor) -> dict[str, float]:
    """RMSprop, g / (sqrt(square_avg [- grad_avg^2]) + eps): as :func:`adagrad_floors`."""
    with torch.no_grad():
        sn = row.impl.step(theta, G, state, hyper)[1]
        w = sn["square_avg"] - (sn["grad_avg"] ** 2 if hyper["centered"] else 0)
        path = hyper["lr"] / (w.clamp(min=0).sqrt() + hyper["eps"])
        return _linear_path_floors((theta_next_bar.abs() * path).detach(), theta)


def adadelta_floors(row: Row, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                    theta_next_bar: Tensor) -> dict[str, float]:
    """Adadelta, sqrt(u + eps) g / sqrt(v' + eps): at the first step (u = 0, v' = (1 - rho) g^2) it
    is nearly flat in g where g^2 dominates eps/(1 - rho), as :func:`adagrad_floors`."""
    with torch.no_grad():
        sn = row.impl.step(theta, G, state, hyper)[1]
        path = hyper["lr"] * (state["acc_delta"] + hyper["eps"]).sqrt() / (sn["square_avg"] + hyper["eps"]).sqrt()
        return _linear_path_floors((theta_next_bar.abs() * path).detach(), theta)


def adamax_floors(row: Row, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                  theta_next_bar: Tensor) -> dict[str, float]:
    """Adamax, m' / max(b2 u, |g| + eps): as :func:`adagrad_floors`."""
    with torch.no_grad():
        sn = row.impl.step(theta, G, state, hyper)[1]
        path = hyper["lr"] / (1 - hyper["beta1"] ** sn["step"]) * (1 - hyper["beta1"]) / sn["exp_inf"]
        return _linear_path_floors((theta_next_bar.abs() * path).detach(), theta)


def _zero_momentum(hyper: Mapping[str, Any]) -> bool:
    """Note [Learned momentum]: a learned momentum takes the buffer path even at momentum 0, so our
    state then holds a buffer that torch's does not (the parameters agree)."""
    return float(hyper["momentum"]) == 0.0


def _dampening_acts(hyper: Mapping[str, Any]) -> bool:
    """At momentum 0 torch.optim.SGD ignores dampening, a learned momentum does not (Note [Learned
    momentum]): the two agree there only at dampening 0."""
    return float(hyper["momentum"]) != 0.0 or float(hyper["dampening"]) == 0.0


def _rprop_bounds_ordered(hyper: Mapping[str, Any]) -> bool:
    """Rprop clamps the step sizes into [step_size_min, step_size_max]: an empty interval is no rule."""
    return float(hyper["step_size_min"]) <= float(hyper["step_size_max"])


#: The reason the finite-difference oracle leaves out SGD's dampening where momentum is 0.
_DAMPENING_AT_ZERO_MOMENTUM = FiniteDifferences(skip={
    "dampening": "at momentum 0 torch.optim ignores dampening, while a learned momentum takes the buffer path, "
                 "where it acts (Note [Learned momentum]): the two functions differ"})
#: eps = 1e-8 (1e-10 for Adagrad) moves the loss on the scale of the gradients, not on its own: a step
#: of 1e-4 eps changes it by less than its round-off.
_EPS_STEP = FiniteDifferences(steps={"eps": 1e-9})
_RADAM_FD = FiniteDifferences(steps={"eps": 1e-9}, zero={
    "beta2": "RAdam's first 5 steps are unrectified (rho_t <= 5 for beta2 >= 0.9): beta2 only reaches v, "
             "which none of the oracle's 4 steps reads",
    "eps": "eps acts in the rectified update only, from step 6 on"})
_RPROP_FD = FiniteDifferences(zero={
    "step_size_min": "no step size shrinks to the lower bound in the oracle's 4 steps",
    "step_size_max": "no step size grows to the upper bound in the oracle's 4 steps"})
_TORCH_FOREACH_ASGD = {
    "step:foreach": "torch's foreach ASGD computes eta in float32 tensor arithmetic: it differs from torch's own "
                    "for-loop ASGD by ~1e-8 (we match the for-loop)"}


def _family(torch_cls: type, **common: Any) -> Callable[..., Row]:
    """Rows of one class that share ``common`` fields: ``make(id, kwargs, group2, **more)``."""

    def make(id: str, kwargs: Optional[Mapping[str, Any]] = None, group2: Optional[Mapping[str, Any]] = None,
             **more: Any) -> Row:
        return Row(id, torch_cls, dict(kwargs or {}), dict(group2 or {}), **{**common, **more})

    return make


_sgd = _family(torch.optim.SGD, extra_state_when_learned=_zero_momentum, valid=_dampening_acts)
_adam = _family(torch.optim.Adam, floors=adam_floors, prepare=untie_amsgrad, fd=_EPS_STEP)
_adamw = _family(torch.optim.AdamW, floors=adam_floors, prepare=untie_amsgrad, fd=_EPS_STEP)
# Adagrad's initial_accumulator_value is never overridden in group 2: torch fills every state
# from the constructor's value (Note [Adagrad's initial accumulator]).
_adagrad = _family(torch.optim.Adagrad, floors=adagrad_floors, fd=FiniteDifferences(steps={"eps": 1e-7}))
_rmsprop = _family(torch.optim.RMSprop, floors=rmsprop_floors, extra_state_when_learned=_zero_momentum, fd=_EPS_STEP)
_adadelta = _family(torch.optim.Adadelta)
_adamax = _family(torch.optim.Adamax, floors=adamax_floors, fd=_EPS_STEP)
_nadam = _family(torch.optim.NAdam, floors=nadam_floors, fd=_EPS_STEP)
_radam = _family(torch.optim.RAdam, fd=_RADAM_FD)
_asgd = _family(torch.optim.ASGD, skips=_TORCH_FOREACH_ASGD)
_rprop = _family(torch.optim.Rprop, valid=_rprop_bounds_ordered, fd=_RPROP_FD)

# ---------------------------------------------------------------------------- the table
ROWS: list[Row] = [
    # SGD
    _sgd("sgd-plain", dict(lr=0.1), dict(lr=0.03), fd=_DAMPENING_AT_ZERO_MOMENTUM),
    _sgd("sgd-momentum", dict(lr=0.05, momentum=0.9), dict(lr=0.02, momentum=0.5)),
    _sgd("sgd-dampening", dict(lr=0.05, momentum=0.9, dampening=0.3), dict(dampening=0.7)),
    _sgd("sgd-nesterov", dict(lr=0.05, momentum=0.8, nesterov=True), dict(lr=0.1, momentum=0.6)),
    _sgd("sgd-weight_decay", dict(lr=0.1, weight_decay=0.05), dict(weight_decay=0.0), fd=_DAMPENING_AT_ZERO_MOMENTUM),
    _sgd("sgd-maximize", dict(lr=0.1, maximize=True), dict(lr=0.02, weight_decay=0.1), fd=_DAMPENING_AT_ZERO_MOMENTUM),
    _sgd("sgd-momentum-dampening-wd-maximize", dict(lr=0.03, momentum=0.7, dampening=0.2, weight_decay=0.05,
                                                    maximize=True),
         dict(lr=0.05, momentum=0.4, dampening=0.0, weight_decay=0.01)),
    _sgd("sgd-nesterov-wd-maximize", dict(lr=0.04, momentum=0.6, nesterov=True, weight_decay=0.02, maximize=True),
         dict(momentum=0.9, weight_decay=0.0)),
    _sgd("sgd-momentum-dampening-wd", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01), dict(lr=0.025)),
    _sgd("sgd-nesterov-wd", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.02), dict(lr=0.025)),
    _sgd("sgd-momentum-maximize", dict(lr=0.05, momentum=0.5, maximize=True), dict(lr=0.025)),
    _sgd("sgd-heavy_momentum", dict(lr=0.1, momentum=0.9), dict(lr=0.05)),
    _sgd("sgd-heavy_nesterov", dict(lr=0.1, momentum=0.9, nesterov=True), dict(lr=0.05)),
    _sgd("sgd-half_momentum", dict(lr=0.1, momentum=0.5), dict(lr=0.05)),
    # Adam
    _adam("adam-default", dict(), dict(lr=0.01)),
    _adam("adam-amsgrad", dict(lr=0.01, amsgrad=True), dict(lr=0.003, betas=(0.8, 0.9))),
    _adam("adam-weight_decay", dict(lr=0.01, weight_decay=0.1), dict(weight_decay=0.0)),
    _adam("adam-maximize", dict(lr=0.01, maximize=True), dict(eps=1e-4)),
    _adam("adam-amsgrad-maximize-wd", dict(lr=0.01, amsgrad=True, maximize=True, weight_decay=0.05),
          dict(lr=0.02, weight_decay=0.2, betas=(0.5, 0.99))),
    _adam("adam-betas-eps", dict(lr=0.02, betas=(0.8, 0.99), eps=1e-3), dict(betas=(0.95, 0.9), eps=1e-6)),
    _adam("adam-decoupled_weight_decay", dict(lr=0.01, weight_decay=0.05, decoupled_weight_decay=True),
          dict(weight_decay=0.2)),
    _adam("adam-lr", dict(lr=0.01), dict(lr=0.005)),
    _adam("adam-amsgrad-wd-eps", dict(lr=0.01, amsgrad=True, weight_decay=0.01, eps=1e-3), dict(lr=0.005)),
    # AdamW
    _adamw("adamw-default", dict(), dict(lr=0.01, weight_decay=0.0)),
    _adamw("adamw-amsgrad", dict(lr=0.01, amsgrad=True), dict(lr=0.003, betas=(0.8, 0.9))),
    _adamw("adamw-weight_decay", dict(lr=0.01, weight_decay=0.1), dict(weight_decay=0.5)),
    _adamw("adamw-maximize", dict(lr=0.01, maximize=True), dict(eps=1e-4)),
    _adamw("adamw-amsgrad-maximize-wd", dict(lr=0.01, amsgrad=True, maximize=True, weight_decay=0.05),
           dict(lr=0.02, weight_decay=0.2, betas=(0.5, 0.99))),
    _adamw("adamw-betas-eps", dict(lr=0.02, betas=(0.8, 0.99), eps=1e-3), dict(betas=(0.95, 0.9), eps=1e-6)),
    _adamw("adamw-lr-weight_decay", dict(lr=0.01, weight_decay=0.05), dict(lr=0.005)),
    # Adagrad
    _adagrad("adagrad-default", dict(lr=0.1), dict(lr=0.05)),
    _adagrad("adagrad-lr_decay-wd", dict(lr=0.1, lr_decay=0.05, weight_decay=0.1),
             dict(lr_decay=0.2, weight_decay=0.0)),
    _adagrad("adagrad-init_acc-eps-maximize", dict(lr=0.05, initial_accumulator_value=0.1, eps=1e-6, maximize=True),
             dict(lr=0.1, lr_decay=0.01)),
    _adagrad("adagrad-lr_decay-wd-init_acc", dict(lr=0.05, lr_decay=0.02, weight_decay=0.01,
                                                  initial_accumulator_value=0.1), dict(lr=0.025)),
    _adagrad("adagrad-lr_decay-wd-eps-init_acc", dict(lr=0.05, lr_decay=0.1, weight_decay=0.02, eps=1e-3,
                                                      initial_accumulator_value=0.1), dict(lr=0.025)),
    # RMSprop
    _rmsprop("rmsprop-default", dict(lr=0.01), dict(alpha=0.9)),
    _rmsprop("rmsprop-centered", dict(lr=0.01, centered=True), dict(alpha=0.8, eps=1e-4)),
    _rmsprop("rmsprop-momentum-wd", dict(lr=0.01, momentum=0.9, weight_decay=0.1),
             dict(momentum=0.0, weight_decay=0.0)),
    _rmsprop("rmsprop-centered-momentum-wd-maximize",
             dict(lr=0.005, alpha=0.95, centered=True, momentum=0.5, weight_decay=0.05, maximize=True),
             dict(lr=0.01, momentum=0.8)),
    _rmsprop("rmsprop-weight_decay", dict(lr=0.01, weight_decay=0.01), dict(lr=0.005)),
    _rmsprop("rmsprop-centered-momentum-maximize-eps",
             dict(lr=0.005, alpha=0.9, centered=True, momentum=0.5, maximize=True, eps=1e-4), dict(lr=0.0025)),
    # momentum 0 is learned here on the buffer path, which torch skips (Note [RMSprop learned momentum])
    _rmsprop("rmsprop-centered-zero_momentum-eps-wd",
             dict(lr=0.01, alpha=0.9, eps=1e-3, weight_decay=0.02, momentum=0.0, centered=True), dict(lr=0.005)),
    # Adadelta
    _adadelta("adadelta-default", dict(), dict(lr=0.5)),
    _adadelta("adadelta-rho-eps-wd", dict(lr=0.5, rho=0.8, eps=1e-4, weight_decay=0.1),
              dict(rho=0.95, weight_decay=0.0)),
    _adadelta("adadelta-maximize", dict(lr=1.0, maximize=True), dict(lr=0.3, eps=1e-3)),
    # eps 1e-6 against g^2 (1 - rho): at the first step G's two paths cancel to 2e-10 of each
    _adadelta("adadelta-rho-wd", dict(lr=0.5, rho=0.8, weight_decay=0.01), dict(lr=0.25), floors=adadelta_floors),
    _adadelta("adadelta-rho-eps-small_wd", dict(lr=0.5, rho=0.8, eps=1e-4, weight_decay=0.02), dict(lr=0.25)),
    # Adamax
    _adamax("adamax-default", dict(), dict(lr=0.01)),
    _adamax("adamax-betas-eps-wd", dict(lr=0.01, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1),
            dict(betas=(0.95, 0.99), weight_decay=0.0)),
    _adamax("adamax-maximize", dict(lr=0.02, maximize=True), dict(eps=1e-4)),
    _adamax("adamax-wd-eps", dict(lr=0.01, weight_decay=0.01, eps=1e-4), dict(lr=0.005)),
    _adamax("adamax-betas-eps-small_wd", dict(lr=0.01, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.02), dict(lr=0.005)),
    # NAdam
    _nadam("nadam-default", dict(lr=0.01), dict(lr=0.003, momentum_decay=0.01)),
    _nadam("nadam-weight_decay", dict(lr=0.01, weight_decay=0.1), dict(weight_decay=0.0, betas=(0.8, 0.99))),
    _nadam("nadam-decoupled_weight_decay", dict(lr=0.01, weight_decay=0.05, decoupled_weight_decay=True),
           dict(weight_decay=0.2, momentum_decay=0.0)),
    _nadam("nadam-maximize-betas-eps", dict(lr=0.02, betas=(0.8, 0.99), eps=1e-3, maximize=True, momentum_decay=0.1),
           dict(betas=(0.95, 0.9), eps=1e-6)),
    _nadam("nadam-wd-eps", dict(lr=0.01, weight_decay=0.01, eps=1e-3), dict(lr=0.005)),
    _nadam("nadamw-maximize-momentum_decay", dict(lr=0.01, weight_decay=0.05, decoupled_weight_decay=True,
                                                  maximize=True, momentum_decay=0.1), dict(lr=0.005)),
    _nadam("nadam-wd-momentum_decay", dict(lr=0.01, weight_decay=0.01, momentum_decay=0.05), dict(lr=0.005)),
    # RAdam rectifies from step 6 (beta2 >= 0.9) or step 10 (beta2 = 0.7): 20 steps see both branches.
    _radam("radam-default", dict(lr=0.01), dict(lr=0.003, betas=(0.8, 0.9))),
    _radam("radam-weight_decay", dict(lr=0.01, weight_decay=0.1), dict(weight_decay=0.0)),
    _radam("radam-decoupled_weight_decay", dict(lr=0.01, weight_decay=0.05, decoupled_weight_decay=True),
           dict(weight_decay=0.2)),
    _radam("radam-maximize-betas-eps", dict(lr=0.02, betas=(0.8, 0.99), eps=1e-3, maximize=True),
           dict(betas=(0.95, 0.7), eps=1e-6)),
    # rectified from inner step 6 on (beta2 = 0.9): unrolls of 6 to 8 steps cross the switch
    _radam("radam-beta2_0.9-wd", dict(lr=0.01, betas=(0.9, 0.9), weight_decay=0.01), dict(lr=0.005)),
    _radam("radam-beta2_0.9-eps", dict(lr=0.01, betas=(0.9, 0.9), eps=1e-4), dict(lr=0.005)),
    # ASGD
    _asgd("asgd-default", dict(lr=0.01), dict(lr=0.05, lambd=1e-3)),
    _asgd("asgd-t0", dict(lr=0.02, lambd=0.01, alpha=0.5, t0=3.0), dict(t0=0.0, alpha=1.0)),
    _asgd("asgd-weight_decay-maximize", dict(lr=0.01, lambd=0.05, t0=5.0, weight_decay=0.1, maximize=True),
          dict(lr=0.1, weight_decay=0.0)),
    _asgd("asgd-t0_2-wd", dict(lr=0.05, lambd=0.01, t0=2.0, weight_decay=0.01), dict(lr=0.025)),
    _asgd("asgd-t0_1", dict(lr=0.05, lambd=0.01, t0=1.0), dict(lr=0.025)),
    # Rprop
    _rprop("rprop-default", dict(lr=0.01), dict(lr=0.002, etas=(0.3, 1.5))),
    # tight step-size bounds: both clamps act within a few steps
    _rprop("rprop-clamped", dict(lr=0.01, step_sizes=(0.004, 0.015)), dict(etas=(0.4, 1.1), step_sizes=(0.008, 0.02)),
           fd=FiniteDifferences(zero={"etaminus": "group 2's lower bound 0.008 clamps every shrunk step size "
                                                  "(0.4 of at most 0.02) in the oracle's 4 steps",
                                      "step_size_min": "group 1's step sizes shrink at most once (to 0.005) in "
                                                       "the oracle's 4 steps",
                                      "step_size_max:2": "group 2's step sizes grow by 1.1 a step, to 0.0133 < 0.02 "
                                                         "in the oracle's 4 steps"})),
    _rprop("rprop-maximize", dict(lr=0.01, maximize=True, step_sizes=(1e-3, 0.05)), dict(lr=0.03)),
    _rprop("rprop-step_sizes", dict(lr=0.01, step_sizes=(2e-3, 0.02)), dict(lr=0.005)),
    # the upper bound acts in both groups within the finite-difference oracle's 4 steps
    _rprop("rprop-narrow_step_sizes", dict(lr=0.01, step_sizes=(2e-3, 0.013)), dict(etas=(0.3, 1.25)),
           fd=FiniteDifferences(zero={"step_size_min": "no step size shrinks to 2e-3 in the oracle's 4 steps"})),
]


# ---------------------------------------------------------------------------- steps that are not element-wise
def adafactor_floors(row: Row, theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any],
                     theta_next_bar: Tensor) -> dict[str, float]:
    """Adafactor, U = g / sqrt(max(V_hat, eps1^2)): at the first step a vector's estimate is g^2
    itself, so U = g / |g| and G's direct path and its path through sqrt(Q) cancel exactly; G's
    cotangent is compared relative to the direct path, |theta_next_bar| (alpha / D) / sqrt(Q)."""
    with torch.no_grad():
        f = _adafactor_forward(theta, G, state, hyper)
        return {"G": (theta_next_bar.abs() * f["step_size"] * f["rsqrt_Q"]).max().item()}


def newtonschulz_float64(grad: Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                         eps: float) -> Tensor:
    """``torch.optim._muon._zeropower_via_newtonschulz`` line by line, with ``grad.clone()`` in
    place of ``grad.bfloat16()``: torch's iteration in the parameters' dtype."""
    if ns_steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if len(grad.shape) != 2:
        raise ValueError("Input tensor gradient must be a 2D matrix")
    a, b, c = ns_coefficients
    ortho_grad = grad.clone()
    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    ortho_grad.div_(ortho_grad.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram_matrix = ortho_grad @ ortho_grad.T
        gram_update = torch.addmm(gram_matrix, gram_matrix, gram_matrix, beta=b, alpha=c)
        ortho_grad = torch.addmm(ortho_grad, gram_update, ortho_grad, beta=a)
    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    return ortho_grad


@contextlib.contextmanager
def without_bfloat16_cast() -> Any:
    """``torch.optim.Muon`` as it is, but with its Newton-Schulz iteration in the parameters' dtype
    (Note [Muon in the parameters' dtype]): the reference our float64 Muon matches to round-off."""
    original = _torch_muon._zeropower_via_newtonschulz
    _torch_muon._zeropower_via_newtonschulz = newtonschulz_float64
    try:
        yield
    finally:
        _torch_muon._zeropower_via_newtonschulz = original


def _newtonschulz_bounded(hyper: Mapping[str, Any]) -> bool:
    """Random Newton-Schulz coefficients whose polynomial, iterated ``ns_steps`` times, maps the
    singular values [0, 1] of the normalised update into [-2, 2] (the defaults: into [0, 1.16]);
    others diverge and overflow to inf in torch's step and in ours alike."""
    a, b, c = (float(hyper[n]) for n in ("ns_a", "ns_b", "ns_c"))
    s = torch.linspace(0, 1, 401, dtype=DTYPE)
    for _ in range(int(hyper["ns_steps"])):
        s = a * s + b * s**3 + c * s**5
        if not bool(s.abs().max() <= 2.0):
            return False
    return True


#: Adafactor's scalars and vectors keep a full second moment, its tensors of two or more
#: dimensions a row and a column statistic over the last two (the rest are batch dimensions).
FACTORED = Shapes(groups=(((), (3, 5), (2, 3, 4)), ((7,), (2, 1, 3), (6, 2))), vjp=((), (7,), (3, 5), (2, 3, 4)))
#: Adafactor's fd oracle at d = 1: a vector's first update U = g / |g| has RMS 1 to round-off, the
#: corner of the clipping max(1, RMS(U) / d), so a difference in d straddles it; eps1 = None (the
#: dtype's eps) and eps2 = 1e-3 below the parameters' RMS never act.
_ADAFACTOR_FD = FiniteDifferences(
    skip={"d": "d = 1 is the corner of the clipping at a vector's first update (RMS(U) = 1 to round-off)"},
    zero={"eps1": "the dtype's eps never reaches the second-moment estimates",
          "eps2": "1e-3 is below the parameters' RMS: max(eps2, RMS) takes the RMS"},
    # a difference at the dtype's eps (2.2e-16) stays there: the default step (1e-9) reaches
    # values of eps1 that clamp the smallest estimates
    steps={"eps1": 1e-20})
#: One central difference in a Newton-Schulz coefficient with h = 1e-4 |a| is off by 2e-4
#: relative (the polynomial is that curved in them): h = 1e-5 brings it to 1e-7.
_MUON_FD = FiniteDifferences(
    zero={"eps": "the default 1e-7 is far below the update's Frobenius norm (group 1 of muon-eps_clamps acts)"},
    steps={"ns_a": 1e-5, "ns_b": 1e-5, "ns_c": 1e-5})
#: Random Newton-Schulz coefficients within 10% of torch's (Keller Jordan's) values.
_MUON_RANGES = {"ns_a": Range(3.1, 3.8), "ns_b": Range(-5.25, -4.3), "ns_c": Range(1.8, 2.25)}
#: The oracles a row against torch's own bfloat16 Muon leaves to the other Muon rows: its step is
#: theirs, only the torch reference differs.
_SAME_STEP_AS_MUON_DEFAULT = "the same step as muon-default: only the torch reference (bfloat16) differs"

_adafactor = _family(torch.optim.Adafactor, floors=adafactor_floors, shapes=FACTORED, fd=_ADAFACTOR_FD)
_muon = _family(torch.optim.Muon, shapes=MATRICES, torch_context=without_bfloat16_cast, fd=_MUON_FD,
                ranges=_MUON_RANGES, valid=_newtonschulz_bounded)

ROWS += [
    # Adafactor
    _adafactor("adafactor-default", dict(), dict(lr=0.005)),
    _adafactor("adafactor-wd-maximize", dict(lr=0.05, weight_decay=0.1, maximize=True), dict(lr=0.02, weight_decay=0.0)),
    # eps1 clamps some estimates (group 1: 0.3^2 against g^2 ~ 1, group 2: the row mean against 1.2),
    # eps2 is above the parameters' RMS in group 1; d = 1.2 clips some updates
    _adafactor("adafactor-eps-d-beta2_decay", dict(lr=0.1, eps=(0.3, 2.0), d=1.2, beta2_decay=-0.5),
               dict(eps=(1.2, 1e-3), d=2.0, beta2_decay=-0.9), fd=FiniteDifferences(zero={
                   **{n: "eps1 = 0.3 and 1.2 clamp every second-moment estimate of the fd model's small gradients "
                         "(U = g / eps1): the moments and the clipping do not act" for n in ("beta2_decay", "d")},
                   "eps2": "1e-3 is below the parameters' RMS in group 2"})),
    # every hyperparameter acts in the fd oracle's training: eps2 above the parameters' RMS,
    # d below some updates' RMS (there, with float64 as the default dtype: 1.06 and 1.11 in
    # group 1, 1.21 and 1.25 in group 2; none within 1% of d, the corner of the clipping),
    # eps1 clamps the smallest estimates
    _adafactor("adafactor-clip-eps2-wd", dict(lr=0.05, eps=(1e-3, 0.3), d=1.05, weight_decay=0.05, beta2_decay=-0.7),
               dict(lr=0.02, d=1.1, eps=(3e-3, 0.5)), fd=FiniteDifferences()),
    # Muon: against torch's iteration in float64 (without_bfloat16_cast)
    _muon("muon-default", dict(), dict(lr=0.02)),
    _muon("muon-no_nesterov", dict(lr=0.02, nesterov=False, weight_decay=0.0), dict(momentum=0.5, weight_decay=0.05)),
    _muon("muon-match_rms_adamw-ns", dict(lr=0.01, adjust_lr_fn="match_rms_adamw", ns_steps=3),
          dict(ns_coefficients=(3.0, -3.2, 1.2), eps=1e-3)),
    # eps above the update's Frobenius norm in group 1: the normalisation divides by eps
    _muon("muon-eps_clamps", dict(lr=0.02, eps=10.0, adjust_lr_fn="original"), dict(eps=1e-7)),
    # Against torch.optim.Muon itself, bfloat16 inside. In 20 steps at lr 1e-3, θ moves by at most
    # 20 lr sqrt(3) max|O| < 0.05 (O's entries are below its spectral norm, < 1.2); bfloat16
    # (8 significant bits, amplified on small singular values) changes each update by up to
    # ~1e-1 of its largest entry on these matrices, so θ (entries of size 1) by < 5e-3.
    _muon("muon-bfloat16", dict(lr=1e-3), dict(lr=1e-3, momentum=0.9), torch_context=contextlib.nullcontext,
          tol=Tolerances(step=5e-3),
          skips={"step-random": "random learning rates scale the bfloat16 drift past any fixed tolerance",
                 "fd": "finite differences of bfloat16 steps measure their rounding, not their derivative",
                 **{k: _SAME_STEP_AS_MUON_DEFAULT for k in ("vjp", "dot", "vjp-random", "hypergrad",
                                                            "hypergrad-random", "jvp", "jvp-random")}}),
]

#: Built-in optimizers tested outside this table for now, with where.
NOT_IN_THE_TABLE: dict[type, str] = {}

_BY_ID: dict[str, Row] = {}
for _row in ROWS:
    if _row.id in _BY_ID:
        raise ValueError(f"two rows have the id {_row.id!r}")
    _BY_ID[_row.id] = _row


def row(id: str) -> Row:
    """The row with this id."""
    try:
        return _BY_ID[id]
    except KeyError:
        raise KeyError(f"no row {id!r} in tests/optim_table.py") from None


def rows(*, cls: Optional[type] = None, where: Optional[Callable[[Row], bool]] = None) -> list[Row]:
    """The rows of one class, or those for which ``where(row)`` holds (every row by default)."""
    return [r for r in ROWS if (cls is None or r.torch_cls is cls) and (where is None or where(r))]


def params(oracle: str, selected: Optional[Sequence[Row]] = None) -> list[Any]:
    """``pytest.param(row, id=row.id)`` for every row (or the ``selected`` ones), with the row's skip
    or xfail of ``oracle``."""
    return [pytest.param(r, id=r.id, marks=r.marks(oracle)) for r in (ROWS if selected is None else selected)]


def built_in_classes() -> list[type]:
    """The ``torch.optim`` classes of the built-in optimizers."""
    return [impl.torch_cls for impl in BUILT_IN]


__all__ = [
    "ANY_SHAPE", "DTYPE", "FiniteDifferences", "GRANULARITIES", "KERNELS", "MATRICES", "NOT_IN_THE_TABLE", "ORACLES",
    "ROWS", "Range", "Row", "Shapes", "Tolerances", "adadelta_floors", "adagrad_floors", "adam_floors",
    "adamax_floors", "assert_rel",
    "built_in_classes", "default_range", "learn", "nadam_floors", "params", "random_like", "random_variant",
    "rel_err", "rmsprop_floors", "row", "rows", "tensor_keys", "untie_amsgrad",
    "FACTORED", "adafactor_floors", "newtonschulz_float64", "without_bfloat16_cast",
]
