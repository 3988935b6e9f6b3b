# SPDX-License-Identifier: Apache-2.0
"""The inner problem of one meta step: what stays fixed while Algorithm 1 runs [Alg.1 L3]-[Alg.1 L15]."""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from . import engine
from .compiled import CompiledSteps
from .distributed import Reducer
from .errors import NonFiniteError
from ._typing import Grads, Hyper, State
from .functional import FunctionalModel, ModuleSlots, clone_buffers
from .optim.base import DiffOptimizer
from .second_order import SafeModeLatch, explain_missing_derivatives
from .stepping import SegmentBars, gradient_list, step_all, step_vjp_all
from .tasks import step_per_task, step_vjp_per_task, vmapped_losses

LossFn = Callable[[FunctionalModel, Any], Tensor]


#: Device types whose inner losses are checked for NaN/Inf once per meta step, after the tape's
#: first pass, instead of at each inner step: Note [Deferred finiteness check].
DEFERRED_CHECK_DEVICES: frozenset[str] = frozenset({"cuda", "xpu", "mps"})

# Note [Deferred finiteness check]: reading a loss on the host (``loss.item()``, ``bool(...)``)
# blocks until the device has run everything queued before it, so checking ℓ_j at every inner
# step would stop the host from queueing step j+1 while the device computes step j, J times per
# meta step. On an accelerator the tape therefore checks the ℓ_j it keeps anyway once its first
# pass reaches s_J (InnerProblem.check_losses, called by Tape.forward): one host sync, the same
# NonFiniteError naming the first non-finite step, and nothing changed, since the model, the
# optimizer and φ are written only after the sweep. The steps after a non-finite one run on
# NaN first (wasted work, no harm). Recomputed losses (checkpointing, the rev HVP) are the first
# pass's bit for bit and are not checked again there. On the CPU a check costs nothing and runs
# at each step, so a NaN stops the tape at once.


@dataclass
class RngState:
    """The random number generator states saved before an inner step's loss (CPU, CUDA)."""

    cpu: Tensor
    cuda: dict[int, Tensor] = field(default_factory=dict)


def capture_rng(cuda_devices: Sequence[int]) -> RngState:
    """Saves the CPU generator and the generators of ``cuda_devices``."""
    return RngState(torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in cuda_devices})


def same_rng(a: RngState, b: RngState) -> bool:
    """Whether two saved generator states are equal (nothing random ran in between)."""
    return torch.equal(a.cpu, b.cpu) and all(torch.equal(a.cuda[d], b.cuda[d]) for d in a.cuda)


def restore_rng(rng: RngState) -> None:
    """Sets the generators back to ``rng`` (to compute a meta step again from its start)."""
    torch.set_rng_state(rng.cpu)
    for d, s in rng.cuda.items():
        torch.cuda.set_rng_state(s, d)


@contextmanager
def replay_rng(rng: Optional[RngState], cuda_devices: Sequence[int]) -> Iterator[None]:
    """Runs the body with the generators set to ``rng`` and restores them afterwards.

    Recomputing an inner step in the reverse sweep must draw the same dropout masks as the
    forward tape did, without advancing the caller's generators (as ``torch.utils.checkpoint``).
    With ``rng=None`` the step drew no random numbers, and the body runs as it is.
    """
    if rng is None:
        yield
        return
    with torch.random.fork_rng(devices=list(cuda_devices)):
        restore_rng(rng)
        yield


def check_scalar_loss(loss: Any, what: str) -> Tensor:
    """Checks that a loss function returned a scalar tensor that depends on the parameters."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"{what} must return a scalar torch.Tensor, got {type(loss).__name__}")
    if loss.dim() != 0:
        raise ValueError(
            f"{what} must return a scalar (0-d) tensor, got shape {tuple(loss.shape)}; "
            "reduce it, e.g. with .mean() or .sum()"
        )
    if not loss.is_floating_point():
        raise TypeError(f"{what} returned a {loss.dtype} tensor; a loss must be floating point")
    return loss


@dataclass
class StepGradient:
    """ℓ_j and G_j of one inner step ([Alg.1 L5]).

    Attributes:
        loss: ℓ_j, detached (distributed: the mean over the ranks).
        G: G_j per inner parameter, detached (the mean over the ranks); None where ℓ_j ignores θ_k.
        leaves: With a kept graph, the θ leaves it was taken at, else None.
        graph: With a kept graph, this rank's G_j with its autograd graph, else None.
    """

    loss: Tensor
    G: list[Optional[Tensor]]
    leaves: Optional[list[Tensor]] = None
    graph: Optional[list[Optional[Tensor]]] = None


@dataclass
class InnerProblem:
    """Everything one meta step holds fixed: the module, the losses, the optimizer and φ.

    ``theta`` lists always hold the *inner* parameters (those the inner optimizer updates),
    in the module's parameter order; ``frozen`` holds the module's other parameters, which
    the inner loop uses but never changes.

    Attributes:
        module: The user's module (never modified here).
        names: Names of the inner parameters.
        frozen: Other parameters by name: detached, or live leaves when their hypergradient
            is wanted (``learn_init``; they are then among ``loss_leaves``).
        train_loss: ``train_loss(model, batch)``.
        impl: The differentiable optimizer.
        hyper: Per inner parameter, its hyperparameters (learned ones as detached tensors).
        loss_leaves: Leaves whose hypergradient is accumulated in A^loss: the user's loss
            parameters, then the frozen parameters when learned.
        cuda_devices: CUDA device indices whose generators are saved with each step.
        check_finite: Raise :class:`NonFiniteError` on a non-finite inner loss.
        kernels: How the optimizer runs over the tensors (:mod:`gimli_bptt.stepping`).
        lr_schedule: ``j -> factor`` applied to the learning rate at inner step j (a warm-up or
            decay inside the unroll); the learned lr is the base value it scales.
        hvp_fallback: Set once the forward-over-reverse HVP failed on an op of ``train_loss``
            (see Note [Forward-mode fallback] in :mod:`gimli_bptt.hvp`).
        reducer: Data-parallel runs: averages G_j, ℓ_j and the second-order terms over the
            ranks (:mod:`gimli_bptt.distributed`); None on a single process.
        tasks: T, the number of tasks stacked along a leading dimension of every inner tensor
            (Note [The task dimension] in :mod:`gimli_bptt.tasks`), or None. It is read here
            only: :meth:`loss`, :meth:`validation_loss`, :meth:`step` and :meth:`step_vjp`
            handle the task dimension, so the tape and the sweep never see it.
        safe_mode: Whether the passes whose graphs are differentiated again need the
            second-order-safe mode (the updater's latch: Note [Skipping the safe mode]); every
            such pass runs under the mode where none is given.
        compiled: With ``compile=True``, the updater's compiled step functions
            (:class:`~gimli_bptt.compiled.CompiledSteps`), which :meth:`advance`, the sweep and the
            validation gradient run instead of the eager steps; else None.
    """

    module: nn.Module
    names: list[str]
    frozen: dict[str, Tensor]
    train_loss: LossFn
    impl: DiffOptimizer
    hyper: list[dict[str, Any]]
    loss_leaves: list[Tensor]
    cuda_devices: list[int]
    check_finite: bool = True
    kernels: str = "auto"
    hvp_fallback: bool = False
    lr_schedule: Optional[Callable[[int], float]] = None
    _order: Optional[list[str]] = field(default=None, repr=False)
    _slots: Optional[ModuleSlots] = field(default=None, repr=False)
    _inner_only: bool = field(default=False, repr=False)
    reducer: Optional[Reducer] = None
    tasks: Optional[int] = None
    safe_mode: SafeModeLatch = field(default_factory=lambda: SafeModeLatch(learns=False))
    compiled: Optional[CompiledSteps] = None
    _per_task_steps: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        # Note [The task dimension]: an element-wise optimizer steps the stacked tasks as one
        # tensor (through the kernels); another runs per task under vmap. Decided once, here.
        self._per_task_steps = self.tasks is not None and not self.impl.elementwise

    def step(self, theta: Sequence[Tensor], G: Grads, state: Sequence[State],
             hyper: Sequence[Hyper]) -> tuple[list[Tensor], list[State]]:
        """[Alg.1 L6]: ``(θ_{j+1}, σ_{j+1})`` from θ_j, G_j and σ_j with step j's hyperparameters
        (:meth:`hyper_at`), over every inner parameter (:func:`~gimli_bptt.stepping.step_all`
        with the problem's ``kernels``, or per task: Note [The task dimension])."""
        if self._per_task_steps:
            return step_per_task(self.impl, theta, G, state, hyper)
        return step_all(self.impl, theta, G, state, hyper, self.kernels)

    def step_vjp(self, theta: Sequence[Tensor], G: Grads, state: Sequence[State], hyper: Sequence[Hyper],
                 theta_next_bar: Sequence[Tensor], state_next_bar: Sequence[State],
                 ) -> tuple[list[Tensor], list[Optional[Tensor]], list[State], Any]:
        """[Alg.1 L11]-[Alg.1 L12]: ``(θ̄', Ḡ_j, σ̄_j, φ̄_opt)``, the VJP of :meth:`step` at step j.

        φ̄_opt is a :class:`~gimli_bptt.stepping.SegmentBars` from the flat ops or a list of
        per-tensor dicts; ``OptimizerHyperparameters.accumulate_all`` takes either, after
        :meth:`hyper_bar_at`.
        """
        if self._per_task_steps:
            return step_vjp_per_task(self.impl, theta, G, state, hyper, theta_next_bar, state_next_bar)
        return step_vjp_all(self.impl, theta, G, state, hyper, theta_next_bar, state_next_bar, self.kernels,
                            segment_bars=True)

    def advance(self, theta: Sequence[Tensor], buffers: dict[str, Tensor], batch: Any, state: Sequence[State], j: int,
                *, rng: Optional[RngState] = None, keep_graph: bool = False
                ) -> tuple["StepGradient", list[Tensor], list[State]]:
        """[Alg.1 L5]-[Alg.1 L6]: ``(ℓ_j and G_j, θ_{j+1}, σ_{j+1})`` from s_j (``buffers`` updated in place).

        Eager, :meth:`step_gradient` then :meth:`step`; with compiled steps one compiled call
        (Note [Compiled meta-steps] in :mod:`gimli_bptt.compiled`), except where a graph is kept
        for the sweep or the gradients are averaged over ranks.
        """
        def eager() -> tuple[StepGradient, list[Tensor], list[State]]:
            grad = self.step_gradient(theta, buffers, batch, j, rng=rng, keep_graph=keep_graph)
            with torch.no_grad():
                theta_next, state_next = self.step(theta, grad.G, state, self.hyper_at(j))
            return grad, theta_next, state_next

        if self.compiled is None or keep_graph or self.reducer is not None:
            return eager()
        with replay_rng(rng, self.cuda_devices):
            ok, out = self.compiled.inner_step(self, theta, buffers, batch, state, self.hyper, self.schedule_factor(j), j,
                                               eager)
        if not ok:
            return out  # type: ignore[no-any-return]
        loss, G, theta_next, state_next = out
        self._check_finite(loss, j)
        return StepGradient(loss, G), theta_next, state_next

    def all_reduce_mean(self, tensors: Sequence[Optional[Tensor]], like: Sequence[Tensor],
                        what: str) -> list[Optional[Tensor]]:
        """The seam of data parallelism: the mean of ``tensors`` over the ranks (identity on one process).

        ``None`` entries count as zeros shaped like ``like``; a result is None only when the
        entry is None on every rank. One collective per call, whatever the number of tensors.
        """
        if self.reducer is None:
            return list(tensors)
        return self.reducer.mean(tensors, like, what)

    def reduce_gradient(self, loss: Tensor, G: Sequence[Optional[Tensor]], theta: Sequence[Tensor],
                        j: int) -> tuple[Tensor, list[Optional[Tensor]]]:
        """Line 5 across ranks: ``(ℓ_j, G_j)`` averaged in one collective, detached.

        With a reducer the finiteness of ℓ_j is checked on the mean (NaN or Inf on any rank makes
        it non-finite), so every rank raises :class:`NonFiniteError` together.
        """
        detached = gradient_list([None if g is None else g.detach() for g in G])
        if self.reducer is None:
            return loss.detach(), detached
        out = self.reducer.mean([loss.detach()] + detached, [loss] + list(theta), f"ℓ_{j} and G_{j} (inner step {j})")
        mean_loss = out[0]
        assert mean_loss is not None
        self._check_finite(mean_loss, j)
        return mean_loss, gradient_list(out[1:])

    def _check_finite(self, loss: Tensor, j: int) -> None:
        """ℓ_j's check at step j, on the CPU; on an accelerator it waits for :meth:`check_losses`."""
        if not self.check_finite or loss.device.type in DEFERRED_CHECK_DEVICES:
            return
        value = loss.item() if loss.dim() == 0 else loss.detach().sum().item()  # per task: NaN/Inf anywhere shows in the sum
        if not math.isfinite(value):  # no op, unlike torch.isfinite
            self._raise_nonfinite(loss, j)

    def check_losses(self, losses: Tensor, every_device: bool = False) -> None:
        """The deferred check of ℓ_0 ... ℓ_{J-1} on an accelerator, when the tape's first pass has
        reached s_J: one host sync per meta step (Note [Deferred finiteness check]). With
        ``every_device`` on the CPU too (a whole meta step compiled as one call computed them all).

        Raises:
            NonFiniteError: naming the first inner step whose loss is NaN or infinite.
        """
        if not self.check_finite or (losses.device.type not in DEFERRED_CHECK_DEVICES and not every_device):
            return
        finite = torch.isfinite(losses)
        if bool(finite.all()):
            return
        j = int((~finite).nonzero()[0, 0])
        self._raise_nonfinite(losses[j], j)

    def _raise_nonfinite(self, loss: Tensor, j: int) -> None:
        where = " (the mean over the ranks)" if self.reducer is not None else ""
        if loss.dim() == 0:
            raise NonFiniteError(f"train_loss{where} is {loss.item()} at inner step {j}; check the batch of step {j}")
        t = int((~torch.isfinite(loss)).nonzero()[0, 0]) if not bool(torch.isfinite(loss).all()) else 0
        raise NonFiniteError(f"train_loss{where} is {loss[t].item()} at inner step {j} for task {t}; "
                             f"check task {t}'s batch of step {j}")

    def lr_scale(self, j: int) -> float:
        """The inner learning-rate schedule's factor at inner step j (1 without a schedule)."""
        if self.lr_schedule is None:
            return 1.0
        scale = self.lr_schedule(j)
        try:
            value = float(scale)
        except (TypeError, ValueError):
            raise TypeError(f"lr_schedule({j}) must return a float, got {type(scale).__name__}") from None
        if not value >= 0.0 or value == float("inf"):
            raise ValueError(f"lr_schedule({j}) returned {value}; it must be a finite factor >= 0")
        return value

    def schedule_factor(self, j: int) -> Optional[float]:
        """The schedule's factor at inner step j, or None without a schedule (compiled steps take the factor
        as a tensor, so that one graph serves every step)."""
        return None if self.lr_schedule is None else self.lr_scale(j)

    def hyper_at(self, j: int) -> list[dict[str, Any]]:
        """The hyperparameters of inner step j: ``hyper`` with lr scaled by the schedule."""
        scale = self.lr_scale(j)
        if scale == 1.0:
            return self.hyper
        return [{**h, "lr": h["lr"] * scale} for h in self.hyper]

    def hyper_bar_at(self, j: int, hyper_bar: Any) -> Any:
        """The chain rule through :meth:`hyper_at`: the cotangents of step j's hyperparameters as
        cotangents of φ_opt (d lr_j / d lr is the schedule's factor). ``hyper_bar`` is a list of
        per-tensor dicts or a :class:`~gimli_bptt.stepping.SegmentBars`."""
        scale = self.lr_scale(j)
        if scale == 1.0:
            return hyper_bar
        if isinstance(hyper_bar, SegmentBars):
            hyper_bar.scale("lr", scale)
            return hyper_bar
        for bars in hyper_bar:
            if "lr" in bars:
                bars["lr"] = bars["lr"] * scale
        return hyper_bar

    def view(self, theta: Sequence[Tensor], buffers: dict[str, Tensor]) -> FunctionalModel:
        """The module bound to inner parameters ``theta``, the frozen parameters and ``buffers``."""
        if self._order is None:  # the module's parameter order and slots, once per meta step
            self._order = [name for name, _ in self.module.named_parameters()]
            self._slots = ModuleSlots(self.module)
            self._inner_only = not self.frozen and self._order == list(self.names)
        if self._inner_only:  # every parameter is an inner one, in the module's order
            params = dict(zip(self.names, theta))
        else:
            named = dict(zip(self.names, theta))
            named.update(self.frozen)
            params = {name: named[name] for name in self._order}
        return FunctionalModel(self.module, params, buffers, self._slots, owned=True)

    def loss(self, theta: Sequence[Tensor], buffers: dict[str, Tensor], batch: Any, j: int) -> Tensor:
        """ℓ_j(θ, φ_loss) with ``buffers`` updated in place, checked ([Alg.1 L5]'s loss); with
        tasks, the (T,) losses of the tasks (differentiate their sum: Note [The task dimension])."""
        if self.tasks is None:
            loss = check_scalar_loss(self.train_loss(self.view(theta, buffers), batch), "train_loss")
        else:
            loss = self.task_losses(self.train_loss, theta, buffers, batch, "train_loss")
        if self.reducer is None:  # distributed: checked on the mean in reduce_gradient, on every rank alike
            self._check_finite(loss, j)
        return loss

    def validation_loss(self, val_loss: LossFn, theta: Sequence[Tensor], buffers: dict[str, Tensor],
                        batch: Any) -> tuple[Tensor, Optional[Tensor]]:
        """L_val(θ'_J) ([Alg.1 L9]'s loss, ``buffers`` updated in place) and, with tasks, each task's
        (shape ``(T,)``; L_val is their mean: Note [The task dimension]), else None."""
        if self.tasks is None:
            return check_scalar_loss(val_loss(self.view(theta, buffers), batch), "val_loss"), None
        task_L = self.task_losses(val_loss, theta, buffers, batch, "val_loss")
        return task_L.mean(), task_L

    def task_losses(self, fn: LossFn, theta: Sequence[Tensor], buffers: dict[str, Tensor], batch: Any,
                    what: str) -> Tensor:
        """``fn`` of every task, vectorised over the leading task dimension (:func:`~gimli_bptt.tasks.vmapped_losses`)."""
        def one(theta_t: list[Tensor], buffers_t: dict[str, Tensor], batch_t: Any) -> Tensor:
            return check_scalar_loss(fn(self.view(theta_t, buffers_t), batch_t), what)

        return vmapped_losses(one, list(theta), buffers, batch, what)

    def step_gradient(self, theta: Sequence[Tensor], buffers: dict[str, Tensor], batch: Any, j: int, *,
                      rng: Optional[RngState] = None, keep_graph: bool = False) -> "StepGradient":
        """[Alg.1 L5]: ℓ_j and G_j at ``theta`` (``buffers`` updated in place), the one place they are computed.

        The tape's first pass, its recomputations from checkpoints and the sweep's recomputation
        before a Hessian-vector product all call this. ``rng`` replays the generator state of
        the first pass (Note [Bit-identical recomputation] in ``reverse/tape.py``). With
        ``keep_graph`` the result keeps this rank's G_j with its autograd graph (for the HVP);
        the ``G`` it hands the optimizer is detached and, distributed, the mean over the ranks.

        Raises:
            ValueError: the loss does not depend on the inner parameters.
            NonFiniteError: ℓ_j is NaN or infinite (on the CPU; Note [Deferred finiteness check]).
        """
        leaves = [t.detach().requires_grad_(True) for t in theta]
        with replay_rng(rng, self.cuda_devices), torch.enable_grad():
            if keep_graph:  # a graph to differentiate again: Note [Second-order-safe passes]
                with self.safe_mode.second_order_pass():
                    loss = self.loss(leaves, buffers, batch, j)
            else:
                loss = self.loss(leaves, buffers, batch, j)
            if not loss.requires_grad:
                raise ValueError(
                    f"train_loss does not depend on the model's parameters at inner step {j}: "
                    "compute it from model(...) or model.parameters() of the model it is given"
                )
            total = loss if loss.dim() == 0 else loss.sum()  # the tasks' sum: each task's own G_j
            again = lambda: self.loss([t.detach().requires_grad_(True) for t in theta], clone_buffers(buffers), batch, j)  # noqa: E731
            with explain_missing_derivatives(self.module, again, f"the gradient graph of inner step {j}", keep_graph):
                G = list(engine.grad((total,), leaves, create_graph=keep_graph))
        if all(g is None for g in G):
            raise ValueError(
                f"train_loss does not depend on any parameter the optimizer updates at inner step {j}"
            )
        mean_loss, G_mean = self.reduce_gradient(loss, G, leaves, j)
        if not keep_graph:
            return StepGradient(mean_loss, G_mean)
        return StepGradient(mean_loss, G_mean, leaves, G)

    def fresh_buffers(self, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
        """Copies of buffers for one forward call (empty when the module has none)."""
        return clone_buffers(buffers) if buffers else {}


__all__ = ["InnerProblem", "RngState", "StepGradient", "capture_rng", "check_scalar_loss", "replay_rng", "restore_rng",
           "same_rng"]
