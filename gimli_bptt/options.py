# SPDX-License-Identifier: Apache-2.0
"""The options of ``GimliUpdater`` and the checks of what a user hands it: clear errors, before anything runs."""
from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .memory import Memory, as_memory
from .optim.base import DiffOptimizer
from .stepping import check_kernel_mode
from .tasks import check_task_batch

#: How the hypergradient is computed: Algorithm 1's reverse sweep, or tangents carried forwards.
MODES = ("reverse", "forward")

#: How the second-order terms of a step are computed (:mod:`gimli_bptt.hvp`): reverse-over-reverse or
#: forward-over-reverse.
HVP_MODES = ("rev", "fwd")

#: What a non-finite loss or hypergradient does (Note [Non-finite values] below).
ON_NONFINITE = ("raise", "skip", "ignore")

# Note [Non-finite values]: with "raise" (default) and "skip", every inner loss ℓ_j is checked
# for NaN/Inf (at each step on the CPU, once per meta step on an accelerator: Note [Deferred
# finiteness check] in problem.py), and so are L_val and the hypergradient; "raise" raises
# NonFiniteError naming the first bad one, "skip" returns a result with skipped=True. Either
# way nothing changes. "ignore" checks nothing (no host sync at all) and applies whatever the
# hypergradient is.


@dataclass(frozen=True)
class Options:
    """The validated options of one ``GimliUpdater`` (see its docstring for each)."""

    unroll: int
    hvp: str
    commit: bool
    on_nonfinite: str
    project: bool
    memory: Memory
    progress: Optional[bool]
    lr_schedule: Optional[Callable[[int], float]]
    kernels: str
    learn_init: bool
    tasks: Optional[int] = None
    first_order: bool = False
    truncate: Optional[int] = None
    mode: str = "reverse"
    compile: bool = False

    @property
    def window(self) -> int:
        """K, the inner steps the sweep differentiates (J without truncation)."""
        return self.unroll if self.truncate is None else self.truncate

    @property
    def check_finite(self) -> bool:
        """Whether losses and hypergradients are checked for NaN/Inf."""
        return self.on_nonfinite != "ignore"

    def saved(self) -> dict[str, Any]:
        """The options a saved state must agree with to be loaded (memory and speed options may differ)."""
        return {"unroll": self.unroll, "learn_init": self.learn_init, "hvp": self.hvp, "commit": self.commit,
                "on_nonfinite": self.on_nonfinite, "project": self.project, "tasks": self.tasks,
                "first_order": self.first_order, "truncate": self.truncate, "mode": self.mode}


def validate_options(impl: DiffOptimizer, *, unroll: Any, hvp: Any, commit: Any, on_nonfinite: Any, project: Any,
                     memory: Any, progress: Any, lr_schedule: Any, kernels: Any, learn_init: Any,
                     tasks: Any = None, first_order: Any = False, truncate: Any = None, mode: Any = "reverse",
                     compile: Any = False) -> Options:
    """Checks every option.

    Raises:
        TypeError: an option of the wrong type.
        ValueError: an option out of range, or options that contradict each other.
    """
    if isinstance(unroll, bool) or not isinstance(unroll, int):
        raise TypeError(f"unroll must be an int, got {type(unroll).__name__}")
    if unroll < 1:
        raise ValueError(f"unroll must be at least 1 (the number of inner steps J), got {unroll}")
    if hvp not in HVP_MODES:
        raise ValueError(f"hvp must be one of {HVP_MODES}, got {hvp!r}")
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}")
    if commit and learn_init:
        raise ValueError(
            "commit=True and learn_init=True contradict each other: with learn_init the model's "
            "parameters are θ_0, updated by the meta optimizer; drop one of them"
        )
    if tasks is not None:
        if isinstance(tasks, bool) or not isinstance(tasks, int):
            raise TypeError(f"tasks must be None or a number of tasks (an int), got {type(tasks).__name__}")
        if tasks < 1:
            raise ValueError(f"tasks must be at least 1, got {tasks}")
        if commit:
            raise ValueError(
                f"commit=True and tasks={tasks} contradict each other: the {tasks} tasks end at {tasks} different "
                "θ'_J, and there is no one of them to write into the model; drop commit, or use tasks=None"
            )
    if not isinstance(first_order, bool):
        raise TypeError(f"first_order must be True or False, got {type(first_order).__name__}")
    if truncate is not None:
        if isinstance(truncate, bool) or not isinstance(truncate, int):
            raise TypeError(f"truncate must be None or a number of inner steps (an int), got {type(truncate).__name__}")
        if not 1 <= truncate <= unroll:
            raise ValueError(f"truncate must be between 1 and unroll={unroll} (the last K of the J inner steps), "
                             f"got {truncate}")
        if truncate < unroll and learn_init:
            raise ValueError(
                f"truncate={truncate} < unroll={unroll} with learn_init=True: θ_0 is a constant of the truncated "
                "window (only the last K steps are differentiated), so its hypergradient would be zero; use "
                "truncate=None (or truncate=unroll) to learn θ_0"
            )
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "forward":
        if truncate is not None:
            raise ValueError("truncate= and mode='forward' contradict each other: forward mode carries the tangents "
                             "from step 0 and keeps no tape to truncate; use one of them")
        if tasks is not None:
            raise ValueError("mode='forward' does not take tasks= yet: use mode='reverse' for a meta-batch of tasks")
        if learn_init:
            raise ValueError("mode='forward' carries one tangent per learned scalar, and θ_0 has as many as the model "
                             "has weights: learn θ_0 with mode='reverse'")
    check_kernel_mode(impl, kernels)
    plan = as_memory(memory)
    if plan.keep_graphs and first_order:
        raise ValueError("Memory(keep_graphs=True) keeps gradient graphs, which first_order=True never builds: "
                         "drop one of them")
    if plan.keep_graphs and hvp == "fwd":
        raise ValueError("Memory(keep_graphs=True) reuses the forward pass's graph, a reverse-over-reverse HVP: "
                         "use hvp='rev'")
    check_compile(compile, mode=mode, hvp=hvp, kernels=kernels, memory=plan)
    if lr_schedule is not None and not callable(lr_schedule):
        raise TypeError(f"lr_schedule must be a function of the inner step, got {type(lr_schedule).__name__}")
    if lr_schedule is not None and "lr" not in impl.hyper_names:
        raise ValueError(f"lr_schedule needs an optimizer with a learning rate; {impl.name} has none")
    return Options(unroll=unroll, hvp=hvp, commit=bool(commit), on_nonfinite=on_nonfinite, project=bool(project),
                   memory=plan, progress=progress, lr_schedule=lr_schedule, kernels=kernels,
                   learn_init=bool(learn_init), tasks=tasks, first_order=first_order, truncate=truncate, mode=mode,
                   compile=compile)


def check_compile(compile: Any, *, mode: str, hvp: str, kernels: str, memory: Memory) -> None:
    """``compile=True`` with the options it cannot take (Note [Compiled meta-steps] in :mod:`gimli_bptt.compiled`).

    Raises:
        TypeError: ``compile`` is not a bool.
        ValueError: naming the option that cannot be compiled, and the fix.
    """
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {type(compile).__name__}")
    if not compile:
        return
    if mode == "forward":
        raise ValueError("compile=True compiles the steps of the reverse sweep; mode='forward' has none. Drop one of them")
    if hvp == "fwd":
        raise ValueError("compile=True computes the Hessian-vector product reverse-over-reverse inside the compiled "
                         "reverse step (inductor crashes on forward-over-reverse); use hvp='rev' (the default)")
    if kernels in ("fused", "reference"):
        raise ValueError(f"compile=True runs the optimizer as its per-tensor functions, which inductor fuses itself; "
                         f"kernels={kernels!r} cannot be honoured: use kernels='auto' (or 'loop')")
    if memory.keep_graphs:
        raise ValueError("Memory(keep_graphs=True) keeps autograd's graphs of the forward pass; compile=True "
                         "recomputes each step inside its compiled reverse step. Drop one of them")


#: The one-line fix the loss errors suggest.
LOSS_FIX = "lambda m, b: F.cross_entropy(m(b[0]), b[1])"


def check_callables(train_loss: Any, val_loss: Any) -> None:
    """The losses are functions ``(model, batch) -> scalar tensor`` ([Alg.1 L6, L10]).

    Raises:
        TypeError: not callable; a ``torch.nn`` loss module (``nn.CrossEntropyLoss()``, which takes
            ``(input, target)``); or a function that cannot be called with two positional arguments.
    """
    for what, fn in (("train_loss", train_loss), ("val_loss", val_loss)):
        if not callable(fn):
            raise TypeError(f"{what} must be callable as {what}(model, batch), got {type(fn).__name__}")
        if isinstance(fn, nn.modules.loss._Loss):
            raise TypeError(
                f"{what} is the loss module {type(fn).__name__}(), which takes (input, target); {what} must be a "
                f"function (model, batch) -> scalar tensor that runs the model on the batch. Fix: {what}={LOSS_FIX} "
                f"(or wrap your module: lambda m, b: {type(fn).__name__.lower()}(m(b[0]), b[1]))"
            )
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):  # a builtin or an extension without one: nothing to check
            continue
        try:
            signature.bind(None, None)
        except TypeError:
            raise TypeError(
                f"{what} must be a function (model, batch) -> scalar tensor, taking two positional arguments, "
                f"but its signature is {getattr(fn, '__name__', type(fn).__name__)}{signature}. "
                f"Fix, e.g.: {what}={LOSS_FIX}"
            ) from None


@dataclass(frozen=True)
class InnerParameters:
    """Which of the model's parameters the inner optimizer updates.

    Attributes:
        names: The inner parameters' names, in the module's order.
        params: The inner parameters.
        frozen_names: The module's other parameters, and those with ``requires_grad=False`` that the optimizer
            holds (torch.optim skips them): used, never changed by the inner loop.
    """

    names: list[str]
    params: list[Tensor]
    frozen_names: list[str]


def inner_parameters(model: nn.Module, opt: torch.optim.Optimizer, impl: DiffOptimizer) -> InnerParameters:
    """Checks the model and the optimizer and returns the parameters the optimizer updates.

    Raises:
        TypeError: a parameter that is not real floating point, sparse, or in float16/bfloat16.
        ValueError: an optimizer over tensors that are not the model's, or over none of them;
            a parameter the optimizer cannot take (Muon: not a matrix).
    """
    named = list(model.named_parameters())
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    model_ids = {id(p) for _, p in named}
    stray = [i for i, group in enumerate(opt.param_groups) for p in group["params"] if id(p) not in model_ids]
    if stray:
        raise ValueError(
            f"the optimizer holds tensors that are not parameters of the model (param groups {sorted(set(stray))}); "
            "build it over model.parameters()"
        )
    # torch.optim skips a parameter whose .grad is None, as it always is with requires_grad=False:
    # such a parameter is a constant of the unroll even where the optimizer holds it.
    inner = [(n, p) for n, p in named if id(p) in in_opt and p.requires_grad]
    inner_ids = {id(p) for _, p in inner}
    out = InnerParameters([n for n, _ in inner], [p for _, p in inner], [n for n, p in named if id(p) not in inner_ids])
    if not out.params:
        if any(id(p) in in_opt for _, p in named):
            raise ValueError("every parameter the optimizer holds has requires_grad=False, so torch.optim would never "
                             "update one; unfreeze the parameters to train (p.requires_grad_(True))")
        raise ValueError("the optimizer holds no parameters of the model")
    for name, p in zip(out.names, out.params):
        if not p.is_floating_point() or p.is_complex():
            raise TypeError(f"parameter {name!r} is {p.dtype}; only real floating-point parameters are supported")
        if p.is_sparse:
            raise TypeError(f"parameter {name!r} is sparse; sparse parameters are not supported")
        if p.dtype in (torch.float16, torch.bfloat16):
            raise TypeError(
                f"parameter {name!r} is stored in {p.dtype}: the inner optimizer's parameters and state must be "
                "float32 or float64 (each step would round them to a few significant bits, a piecewise constant map "
                "whose derivative is zero, so that training has no useful hypergradient). Keep the model in float32 and run the "
                "losses under torch.autocast(device_type, dtype=torch.bfloat16): the hypergradient is then that "
                "of the autocast training. Frozen parameters outside the optimizer may stay in low precision."
            )
        if impl.check_param is not None:
            impl.check_param(name, p)
    return out


def check_loss_params(loss_params: Any, ref: Tensor) -> dict[str, Tensor]:
    """Checks ``loss_params`` (φ_loss): leaves that require grad, floating point, on the model's device and dtype.

    Raises:
        TypeError: not a dict of tensors, or an integer tensor.
        ValueError: a tensor that is not a leaf requiring grad, or on another device or dtype.
    """
    loss_params = {} if loss_params is None else loss_params
    if not isinstance(loss_params, Mapping):
        raise TypeError("loss_params must be a dict from name to leaf tensor")
    out: dict[str, Tensor] = {}
    for name, t in loss_params.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"loss_params[{name!r}] must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"loss_params[{name!r}] is {t.dtype}; meta-parameters must be floating point")
        if not t.is_leaf or not t.requires_grad:
            raise ValueError(
                f"loss_params[{name!r}] must be a leaf tensor that requires grad "
                "(create it with torch.tensor(..., requires_grad=True) or nn.Parameter)"
            )
        if t.device != ref.device:
            raise ValueError(f"loss_params[{name!r}] is on {t.device} but the model is on {ref.device}; move it with .to()")
        if t.dtype != ref.dtype:
            raise ValueError(f"loss_params[{name!r}] is {t.dtype} but the model is {ref.dtype}; convert it with .to()")
        out[name] = t
    return out


def _one_batch_hint(batches: list[Any], unroll: int) -> Optional[str]:
    """Why ``train_batches`` may be a single ``(x, y)`` batch rather than a list of J batches, or None.

    Only a sequence of bare tensors can be confused with one batch (a list of J batches holds tuples,
    dicts, or J tensors of one kind): flagged when their number is not J, or when they mix
    floating-point and integer tensors (inputs and labels), which the J batches of one loss never do.
    """
    if len(batches) < 2 or not all(isinstance(b, Tensor) for b in batches):
        return None
    fix = "pass a list of batches, e.g. [batch] * unroll, or [(x, y)] when unroll=1"
    if len({b.is_floating_point() for b in batches}) > 1:
        return (f"train_batches looks like one batch ({len(batches)} tensors, floating-point and integer: inputs and "
                f"targets), but step() takes a list of unroll={unroll} batches, one per inner step: {fix}")
    if len(batches) != unroll:
        return (f"got {len(batches)} tensors as train batches but unroll={unroll}: give exactly one batch per inner "
                f"step; if these tensors are one batch (inputs and targets), {fix}")
    return None


def check_batches(train_batches: Any, unroll: int, tasks: Optional[int] = None, val_batch: Any = None) -> list[Any]:
    """The J training batches as a list; with ``tasks``, each (and ``val_batch``) with its task dimension.

    Raises:
        TypeError: not a sequence of batches.
        ValueError: not exactly J of them, one ``(x, y)`` batch in their place, or a batch without the
            leading task dimension.
    """
    if isinstance(train_batches, (Tensor, str, bytes)) or not isinstance(train_batches, Iterable):
        raise TypeError(
            "train_batches must be a sequence of the J inner batches (a list or tuple), "
            f"got {type(train_batches).__name__}"
        )
    batches = list(train_batches)
    hint = _one_batch_hint(batches, unroll)
    if hint is not None:
        raise ValueError(hint)
    if len(batches) != unroll:
        raise ValueError(
            f"got {len(batches)} train batches but unroll={unroll}: give exactly one batch per inner step"
        )
    if tasks is not None:
        for j, batch in enumerate(batches):
            check_task_batch(batch, tasks, f"the train batch of inner step {j}")
        check_task_batch(val_batch, tasks, "the validation batch")
    return batches


MetaOptFactory = Union[type, Callable[[list[Tensor]], torch.optim.Optimizer]]


def build_meta_optimizer(meta_opt: Optional[MetaOptFactory], leaves: Sequence[Tensor]) -> torch.optim.Optimizer:
    """The meta optimizer over φ ([Alg.1 L16]): a ``torch.optim`` class or a factory (default ``Adam``)."""
    if meta_opt is None:
        meta_opt = torch.optim.Adam
    if not callable(meta_opt):
        raise TypeError("meta_opt must be a torch.optim class or a factory taking the list of meta-parameters")
    built = meta_opt(list(leaves))
    if not isinstance(built, torch.optim.Optimizer):
        raise TypeError(f"meta_opt must build a torch.optim.Optimizer, got {type(built).__name__}")
    return built


__all__ = [
    "HVP_MODES",
    "InnerParameters",
    "MetaOptFactory",
    "MODES",
    "ON_NONFINITE",
    "Options",
    "build_meta_optimizer",
    "check_batches",
    "check_callables",
    "check_loss_params",
    "inner_parameters",
    "validate_options",
]
