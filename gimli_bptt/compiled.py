# SPDX-License-Identifier: Apache-2.0
"""Compiled meta-steps (``GimliUpdater(compile=True)``): each inner step and each reverse step of
Algorithm 1 as one compiled first-order graph.

Note [Compiled meta-steps]: the reverse sweep is written by hand, so no step of a meta step needs
autograd's double backward (which ``torch.compile`` refuses): every step is a pure function of
tensors, compiled once with ``torch.compile(fullgraph=True)`` and run J times. Four functions:

- ``inner`` ([Alg.1 L5]-[Alg.1 L6]): ℓ_j and G_j = ∇_θ ℓ_j (``torch.func.grad``), then the
  optimizer's step, from (θ_j, σ_j, the buffers, the batch, step j's hyperparameters);
- ``reverse`` ([Alg.1 L11]-[Alg.1 L14]): G_j once more, under ``torch.func.vjp``, the optimizer's
  closed-form VJP (θ̄', Ḡ_j, σ̄_j, φ̄_opt), then the HVP as the VJP of the gradient, H_j·Ḡ_j
  (reverse over reverse), and B_j = θ̄' + H_j·Ḡ_j; the frozen parameters whose θ_0 is learned
  get their mixed term (∂G_j/∂θ_frozen)ᵀ·Ḡ_j from the same VJP;
- ``first_order`` ([Alg.1 L11]-[Alg.1 L12] of Note [First order]): the optimizer's VJP alone;
- ``validation`` ([Alg.1 L9]): L_val(θ'_J), B_J and the direct term of the learned frozen parameters.

The user's loss parameters (``loss_params``) are tensors the loss function closes over, so the
``torch.func`` transforms cannot take them as inputs: their mixed term (∂G_j/∂φ_loss)ᵀ·Ḡ_j
([Alg.1 L13]) is the autograd gradient of ⟨G_j, Ḡ_j⟩ with respect to them, through the compiled
graph of a fifth function, ``mixed`` (⟨G_j, Ḡ_j⟩, run with autograd recording); their direct term
in L_val is the autograd gradient of ``validation``'s L_val. Without loss parameters every call
runs under ``no_grad`` and no backward graph is compiled.

Each function is compiled (``dynamic=False``) for the shapes, dtypes and devices it sees and for the
optimizer's fixed hyperparameters and flags, which are constants of its graph (``torch.compile``'s
guards); a change of any of these compiles it again. What changes at every step enters as a tensor, so
one graph serves every j and the compile time does not grow with J: the learning-rate schedule's factor,
and the step counts (Note [Step counts as tensors]).

Note [Step counts as tensors]: ``torch.optim`` keeps the step count as a float, and so do gimli's
states. In torch 2.13 a float that ``torch.compile`` treats as symbolic (as it does once a float input
has changed) is unreliable: arithmetic that mixes it with tensors specialises the graph on each value,
and a value derived from it can come back from the graph as it was when traced. So the compiled steps
pass the counts as 0-d float64 tensors (``CompiledSteps._counts_in``), to the optimizers whose step
functions compute with the count in tensor arithmetic only (``DiffOptimizer.tensor_step_count``, read
through ``optim.adjoints.next_count``: the Adam family, Adagrad, Adadelta, RMSprop), and turn them back
into floats after. The optimizers that branch on the count in Python (Rprop and ASGD at step 0, RAdam's
rectification, Adafactor) would compile one graph per count: their step-by-step functions run eagerly
(one warning), and their whole meta step (where the counts are constants of the one graph) compiles.

Note [Whole meta steps]: for J <= ``WHOLE_MAX_UNROLL`` under a budgeted memory plan (``"auto"`` or
bytes), ``whole`` runs [Alg.1 L4]-[Alg.1 L15] as one graph instead of the tape and the sweep: each step's
``torch.func.vjp`` of the gradient is kept inside the graph (the memory of an autograd unroll's graph), so
no step is recomputed and random draws are the forward pass's own. One call instead of 2J + 1 saves the
per-call overhead of the compiled functions (measured 0.80-0.95x a compiled ``torch.func`` unroll, where
one graph per step took 1.2-1.3x), but the graph, and its compile time, grow with J: hence the bound.
Loss parameters captured by closure, a verifying or slot-based plan and several ranks run step by step.

The optimizer runs as its per-tensor functions (``kernels="loop"``) inside the compiled graphs:
inductor fuses their arithmetic itself, so the hand-written kernels are not needed there.

Random draws (dropout) replay as in eager mode: each compiled call runs with the generator state of
the tape's first pass (:func:`~gimli_bptt.problem.replay_rng`), and inductor draws through the eager
random ops (``fallback_random``), so ``inner``, ``reverse`` and ``mixed`` draw the same masks.

Note [Compile fallback]: a graph break or a model the compiler cannot take raises when the function
is first compiled (``fullgraph=True``), before anything has run; the call then runs the eager path
of the same step. If the eager path succeeds the function stays eager for the rest of the updater's
life, with one warning naming it and the reason; if the eager path fails too, its error (the user's
problem, named as in eager mode) is raised and nothing is marked. Either way the result is eager
gimli's, never a partial compiled one, and a failed meta step changes nothing.
"""
from __future__ import annotations

import itertools
import os
import sys
import time
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor, nn

from ._typing import Grads, Hyper, State
from .functional import FunctionalModel
from .memory import Memory
from .optim.base import DiffOptimizer
from .stepping import step_all, step_vjp_all
from .tasks import step_per_task, step_vjp_per_task


class InnerProblemLike(Protocol):
    """What the compiled steps read of :class:`~gimli_bptt.problem.InnerProblem` (which holds them:
    this module stands below it)."""

    frozen: dict[str, Tensor]
    loss_leaves: list[Tensor]
    cuda_devices: list[int]

    def step_gradient(self, theta: Sequence[Tensor], buffers: dict[str, Tensor], batch: Any, j: int) -> Any: ...

    def fresh_buffers(self, buffers: dict[str, Tensor]) -> dict[str, Tensor]: ...

#: The inductor options of every compiled meta-step function: random ops draw as in eager mode
#: (Note [Compiled meta-steps]).
INDUCTOR_OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {"fallback_random": True}

#: The longest unroll compiled as one whole meta step (Note [Whole meta steps]).
WHOLE_MAX_UNROLL = 5

#: A first call that compiles for longer than this (seconds) is reported on stderr when it ends.
ANNOUNCE_AFTER_S = 2.0


def _compiles() -> int:
    """How many graphs dynamo has compiled in this process so far."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _scaled(hyper: Sequence[Hyper], scale: Optional[Tensor]) -> list[Hyper]:
    """Step j's hyperparameters: lr times the schedule's factor, a 0-d tensor (one graph for every j)."""
    return list(hyper) if scale is None else [{**h, "lr": h["lr"] * scale} for h in hyper]


_COPIES = itertools.count()


def _own_code(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` bound to a copy of its function with a code object, and a name, of its own.

    Note [One code object per updater]: ``torch.compile`` keeps its compiled graphs, and its limit of
    recompilations (``torch._dynamo.config.recompile_limit``), per code object: without a copy every
    updater of the process would share one limit per function, and the ninth model or optimizer
    configuration would silently run uncompiled. It also remembers which input sizes changed between
    calls (and so compiles them as symbolic sizes) per file, line and function *name*, within the
    process and across runs (its local profile); a name of its own per updater and process keeps one
    updater's shapes from making another's symbolic.
    """
    fn = method.__func__  # type: ignore[attr-defined]
    unique = f"{fn.__name__}_{os.getpid()}_{next(_COPIES)}"
    code = fn.__code__.replace(co_name=unique, co_qualname=unique)
    copy = types.FunctionType(code, fn.__globals__, unique, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return types.MethodType(copy, method.__self__)  # type: ignore[attr-defined]


@dataclass
class _Inputs:
    """One inner problem's constant inputs, prepared once per meta step.

    Attributes:
        fixed: The frozen parameters whose θ_0 is not learned, detached.
        learned: The frozen parameters whose θ_0 is learned (``learn_init``), detached: differentiated
            with θ inside the compiled functions.
        closure: The loss leaves the loss functions close over (the user's ``loss_params``).
        slots: Per loss leaf, ``("learned", name)`` or ``("closure", index into closure)``.
    """

    fixed: dict[str, Tensor]
    learned: dict[str, Tensor]
    closure: list[Tensor]
    slots: list[tuple[str, Any]] = field(default_factory=list)


class CompiledSteps:
    """The compiled step functions of one updater (Note [Compiled meta-steps]).

    Built once per :class:`~gimli_bptt.GimliUpdater` with ``compile=True`` and handed to every
    inner problem it makes; the compiled graphs live as long as it does.

    Args:
        module: The user's module.
        names: The inner parameters' names, in the module's order.
        train_loss, val_loss: The losses, ``(model, batch) -> scalar``.
        impl: The differentiable optimizer.
        tasks: T with a task dimension, else None.

    Attributes:
        compile_seconds: Seconds spent in calls that compiled a graph, since the last
            :meth:`take_compile_seconds`.
        eager: ``{function: reason}`` for the functions that fell back to eager
            (Note [Compile fallback]).
    """

    def __init__(self, module: nn.Module, names: Sequence[str], train_loss: Callable[[Any, Any], Tensor],
                 val_loss: Callable[[Any, Any], Tensor], impl: DiffOptimizer, tasks: Optional[int]):
        self.module = module
        self.names = list(names)
        self.order = [name for name, _ in module.named_parameters()]
        self.train_loss, self.val_loss = train_loss, val_loss
        self.impl = impl
        self.tasks = tasks
        self.per_task = tasks is not None and not impl.elementwise  # Note [The task dimension]
        self.used: Optional[tuple[bool, ...]] = None
        self.compile_seconds = 0.0
        self.eager: dict[str, str] = {}
        self._announced = False
        self._prepared: Optional[tuple[Any, _Inputs]] = None
        bodies: dict[str, Callable[..., Any]] = {"inner": self._inner, "reverse": self._reverse, "first_order": self._first_order,
                  "validation": self._validation, "mixed": self._mixed, "whole": self._whole}
        self._fns = {name: torch.compile(_own_code(fn), fullgraph=True, dynamic=False, options=INDUCTOR_OPTIONS)
                     for name, fn in bodies.items()}
        if impl.counts_steps and not impl.tensor_step_count:  # Note [Step counts as tensors]
            reason = (f"{impl.name} reads its step count as a Python float (branches on it), so a graph per step "
                      "would compile once per step count")
            self._eager_by_design = {name: reason for name in ("inner", "reverse", "first_order")}
        else:
            self._eager_by_design = {}

    # ------------------------------------------------------------------ the traced bodies
    def _params(self, theta: Sequence[Tensor], frozen: dict[str, Tensor]) -> dict[str, Tensor]:
        named = dict(zip(self.names, theta))
        named.update(frozen)
        return {name: named[name] for name in self.order}

    def _loss(self, fn: Callable[[Any, Any], Tensor], theta: Sequence[Tensor], frozen: dict[str, Tensor],
              buffers: dict[str, Tensor], batch: Any) -> Tensor:
        """The loss, or with tasks the (T,) losses of the tasks under ``vmap`` (Note [The task dimension])."""
        if self.tasks is None:
            return fn(FunctionalModel(self.module, self._params(theta, frozen), buffers), batch)

        def one(theta_t: list[Tensor], buffers_t: dict[str, Tensor], batch_t: Any) -> Tensor:
            return fn(FunctionalModel(self.module, self._params(theta_t, frozen), buffers_t), batch_t)

        return torch.func.vmap(one, in_dims=(0, 0, 0), randomness="different")(list(theta), buffers, batch)

    def _gradient(self, theta: Sequence[Tensor], learned: dict[str, Tensor], fixed: dict[str, Tensor],
                  buffers: dict[str, Tensor], batch: Any) -> tuple[tuple[Tensor, ...], tuple[Tensor, dict[str, Tensor]]]:
        """(G_j, (ℓ_j, the buffers after the step)): the gradient of the loss (the tasks' sum) in θ.

        Note [Buffers under torch.func]: a ``torch.func`` transform refuses an in-place update of a
        tensor it captured (BatchNorm's running statistics), so the loss updates copies made inside
        the transform, which leave it as an auxiliary output.
        """
        def total(th: list[Tensor]) -> tuple[Tensor, tuple[Tensor, dict[str, Tensor]]]:
            own = {k: v.clone() for k, v in buffers.items()}
            loss = self._loss(self.train_loss, th, {**fixed, **learned}, own, batch)
            return (loss if loss.dim() == 0 else loss.sum()), (loss, own)

        G, aux = torch.func.grad(total, has_aux=True)(list(theta))
        return tuple(G), aux

    def _mask(self, G: Sequence[Tensor]) -> list[Optional[Tensor]]:
        """None where ℓ_j does not use θ_k, as eager gimli and torch.optim skip such a tensor."""
        assert self.used is not None
        return [g if u else None for g, u in zip(G, self.used)]

    def _step(self, theta: Sequence[Tensor], G: Grads, state: Sequence[State], hyper: Sequence[Hyper]
              ) -> tuple[list[Tensor], list[State]]:
        """[Alg.1 L6] as eagerly (``InnerProblem.step``): per task where the optimizer is not element-wise."""
        if self.per_task:
            return step_per_task(self.impl, theta, G, state, hyper)
        return step_all(self.impl, theta, G, state, hyper, "loop")

    def _step_vjp(self, theta: Sequence[Tensor], G: Grads, state: Sequence[State], hyper: Sequence[Hyper],
                  B: Sequence[Tensor], state_bar: Sequence[State]) -> tuple:
        """[Alg.1 L11]-[Alg.1 L12] as eagerly (``InnerProblem.step_vjp``)."""
        if self.per_task:
            return step_vjp_per_task(self.impl, theta, G, state, hyper, B, state_bar)
        return step_vjp_all(self.impl, theta, G, state, hyper, B, state_bar, "loop")

    def _inner(self, theta: list[Tensor], fixed: dict[str, Tensor], learned: dict[str, Tensor],
               buffers: dict[str, Tensor], batch: Any, state: list[State], hyper: list[Hyper],
               scale: Optional[Tensor]) -> tuple:
        G, (loss, buffers_next) = self._gradient(theta, learned, fixed, buffers, batch)
        for name, b in buffers_next.items():  # the caller's buffers are updated in place, as eagerly
            buffers[name].copy_(b)
        Gm = self._mask(G)
        theta_next, state_next = self._step(theta, Gm, state, _scaled(hyper, scale))
        return loss, Gm, theta_next, state_next

    def _reverse(self, theta: list[Tensor], fixed: dict[str, Tensor], learned: dict[str, Tensor],
                 buffers: dict[str, Tensor], batch: Any, state: list[State], hyper: list[Hyper],
                 scale: Optional[Tensor], B: list[Tensor], state_bar: list[State]) -> tuple:
        def gradient(th: list[Tensor], le: dict[str, Tensor]) -> tuple[Tensor, ...]:
            return self._gradient(th, le, fixed, buffers, batch)[0]

        G, hvp = torch.func.vjp(gradient, list(theta), learned)[:2]
        Gm = self._mask(G)
        theta_bar, G_bar, state_bar_j, hyper_bar = self._step_vjp(theta, Gm, state, _scaled(hyper, scale), B, state_bar)
        cotangent = tuple(torch.zeros_like(g) if gb is None else gb for g, gb in zip(G, G_bar))
        h_theta, h_learned = hvp(cotangent)
        B_j = [tb + h for tb, h in zip(theta_bar, h_theta)]
        return B_j, state_bar_j, hyper_bar, h_learned, G_bar

    def _first_order(self, theta: list[Tensor], G: list[Optional[Tensor]], state: list[State], hyper: list[Hyper],
                     scale: Optional[Tensor], B: list[Tensor], state_bar: list[State]) -> tuple:
        return self._step_vjp(theta, G, state, _scaled(hyper, scale), B, state_bar)

    def _validation(self, theta: list[Tensor], fixed: dict[str, Tensor], learned: dict[str, Tensor],
                    buffers: dict[str, Tensor], batch: Any) -> tuple:
        def total(th: list[Tensor], le: dict[str, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            own = {k: v.clone() for k, v in buffers.items()}  # Note [Buffers under torch.func]
            losses = self._loss(self.val_loss, th, {**fixed, **le}, own, batch)
            L = losses if losses.dim() == 0 else losses.mean()
            return L, (L, losses)

        (B_J, direct), (L, losses) = torch.func.grad(total, argnums=(0, 1), has_aux=True)(list(theta), learned)
        return L, losses, list(B_J), direct

    def _mixed(self, theta: list[Tensor], fixed: dict[str, Tensor], learned: dict[str, Tensor],
               buffers: dict[str, Tensor], batch: Any, G_bar: list[Optional[Tensor]]) -> Tensor:
        G = self._gradient(theta, learned, fixed, buffers, batch)[0]
        dots = [(g * gb).sum() for g, gb in zip(G, G_bar) if gb is not None]
        return torch.stack(dots).sum() if dots else G[0].new_zeros(())

    def _whole(self, theta: list[Tensor], fixed: dict[str, Tensor], learned: dict[str, Tensor],
               buffers: dict[str, Tensor], batches: list[Any], state: list[State], hyper: list[Hyper],
               scales: list[float], val_batch: Any, window: int, second_order: bool) -> tuple:
        """[Alg.1 L4]-[Alg.1 L15] as one graph (Note [Whole meta steps]): the tape keeps each step's VJP
        of the gradient, so nothing is recomputed and random draws are the forward pass's own."""
        J = len(batches)
        steps: list[tuple] = []
        losses = []
        for j in range(J):
            hyper_j = hyper if scales[j] == 1.0 else [{**h, "lr": h["lr"] * scales[j]} for h in hyper]

            def gradient(th: list[Tensor], le: dict[str, Tensor], buffers: dict[str, Tensor] = buffers,
                         batch: Any = batches[j]) -> tuple[tuple[Tensor, ...], tuple[Tensor, dict[str, Tensor]]]:
                return self._gradient(th, le, fixed, buffers, batch)

            hvp = None
            if j >= J - window and second_order:  # [Alg.1 L5], and the linearisation of G_j for L14
                G, hvp, (loss, buffers) = torch.func.vjp(gradient, theta, learned, has_aux=True)  # type: ignore[misc]
            else:
                G, (loss, buffers) = gradient(theta, learned)
            Gm = self._mask(G)
            if j >= J - window:
                steps.append((j, theta, state, Gm, hvp, hyper_j))
            theta, state = self._step(theta, Gm, state, hyper_j)  # [Alg.1 L6]
            losses.append(loss)
        L, task_L, B, direct = self._validation(theta, fixed, learned, {k: v.clone() for k, v in buffers.items()},
                                                 val_batch)  # [Alg.1 L9]
        A_opt: list[dict[str, Tensor]] = [{} for _ in theta]
        A_learned = dict(direct)
        state_bar: list[State] = [{} for _ in theta]
        for j, theta_j, state_j, Gm, hvp, hyper_j in reversed(steps):  # [Alg.1 L10]
            theta_bar, G_bar, state_bar, hyper_bar = self._step_vjp(  # [Alg.1 L11]
                theta_j, Gm, state_j, hyper_j, B, state_bar)
            for acc, bars in zip(A_opt, hyper_bar):  # [Alg.1 L12], per tensor (mapped to φ_opt after)
                for name, bar in bars.items():
                    bar = bar * scales[j] if name == "lr" and scales[j] != 1.0 else bar
                    acc[name] = acc[name] + bar if name in acc else bar
            if hvp is None:
                B = theta_bar
                continue
            cotangent = tuple(torch.zeros_like(g) if gb is None else gb for g, gb in zip(theta_j, G_bar))
            h_theta, h_learned = hvp(cotangent)
            for name, h in h_learned.items():  # [Alg.1 L13]
                A_learned[name] = A_learned[name] + h
            B = [tb + h for tb, h in zip(theta_bar, h_theta)]  # [Alg.1 L14]
        return L, task_L, B, A_opt, A_learned, torch.stack(losses), theta, state, buffers

    # ------------------------------------------------------------------ calling them
    def _inputs(self, problem: InnerProblemLike) -> _Inputs:
        """The problem's constant inputs, split once per meta step (:class:`_Inputs`)."""
        if self._prepared is not None and self._prepared[0] is problem:
            return self._prepared[1]
        learned_ids = {}
        fixed: dict[str, Tensor] = {}
        learned: dict[str, Tensor] = {}
        for name, t in problem.frozen.items():
            if t.requires_grad:
                learned[name] = t.detach()
                learned_ids[id(t)] = name
            else:
                fixed[name] = t
        inputs = _Inputs(fixed, learned, [])
        for leaf in problem.loss_leaves:
            if id(leaf) in learned_ids:
                inputs.slots.append(("learned", learned_ids[id(leaf)]))
            else:
                inputs.slots.append(("closure", len(inputs.closure)))
                inputs.closure.append(leaf)
        self._prepared = (problem, inputs)
        return inputs

    def _call(self, name: str, eager: Callable[[], Any], *args: Any) -> tuple[bool, Any]:
        """``(True, compiled result)``, or ``(False, eager result)`` once ``name`` has fallen back
        (Note [Compile fallback])."""
        if name in self.eager:
            return False, eager()
        if name in self._eager_by_design:
            self.eager[name] = self._eager_by_design[name]
            warnings.warn(f"compile=True: the {name!r} step function runs eagerly: {self.eager[name]}; the whole "
                          f"meta step (J <= {WHOLE_MAX_UNROLL}) compiles", RuntimeWarning, stacklevel=4)
            return False, eager()
        if not self._announced:
            self._announced = True
            print("gimli_bptt: compiling the meta-step functions (compile=True; once per shapes and optimizer "
                  "configuration)", file=sys.stderr, flush=True)
        before, start = _compiles(), time.perf_counter()
        rng = torch.get_rng_state()
        try:
            out = self._fns[name](*args)
        except Exception as exc:  # noqa: BLE001 - any compile failure: the eager path decides
            torch.set_rng_state(rng)
            result = eager()  # raises the user's error if the step itself is wrong
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            self.eager[name] = reason
            instead = ("meta steps run one compiled step at a time" if name == "whole"
                       else "it runs eagerly from now on, with the same results")
            warnings.warn(f"compile=True: the {name!r} step function could not be compiled ({type(exc).__name__}: "
                          f"{reason}); {instead}", RuntimeWarning, stacklevel=4)
            return False, result
        if _compiles() != before:
            spent = time.perf_counter() - start
            self.compile_seconds += spent
            if spent > ANNOUNCE_AFTER_S:
                print(f"gimli_bptt: compiled the {name!r} step in {spent:.0f} s", file=sys.stderr, flush=True)
        return True, out

    def runs_whole(self, unroll: int, memory: Memory, distributed: bool) -> bool:
        """Whether a meta step of ``unroll`` inner steps runs as one compiled call (Note [Whole meta steps])."""
        budgeted = memory.budget is not None or memory.fraction is not None
        return (unroll <= WHOLE_MAX_UNROLL and budgeted and not memory.verify and not distributed
                and "whole" not in self.eager)

    def take_compile_seconds(self) -> float:
        """The seconds spent compiling since the last call (reported with the tape statistics)."""
        spent, self.compile_seconds = self.compile_seconds, 0.0
        return spent

    def probe(self, problem: InnerProblemLike, theta: Sequence[Tensor], buffers: dict[str, Tensor], batch: Any,
              j: int) -> None:
        """Once per updater: the eager gradient of one step, for which θ_k the loss uses (``used``), and
        for the user's errors (a loss that is not a scalar, that ignores θ) as eager mode raises them.
        The generators are left as they were."""
        if self.used is not None:
            return
        with torch.random.fork_rng(devices=list(problem.cuda_devices)):
            grad = problem.step_gradient(theta, problem.fresh_buffers(buffers), batch, j)
        self.used = tuple(g is not None for g in grad.G)

    def _counts_in(self, state: Sequence[State]) -> list[State]:
        """σ_j with its step counts as 0-d float64 tensors where the optimizer takes them so (Note [Step
        counts as tensors]); as it is otherwise."""
        if not self.impl.tensor_step_count:
            return list(state)
        return [{k: torch.tensor(v, dtype=torch.float64) if isinstance(v, float) else v for k, v in st.items()}
                for st in state]

    @staticmethod
    def _counts_out(state: Sequence[State], like: Sequence[State]) -> list[State]:
        """The step counts of ``state`` as floats again where ``like`` (the input) held floats."""
        return [{k: float(v) if isinstance(like_st.get(k), float) else v for k, v in st.items()}
                for st, like_st in zip(state, like)]

    @staticmethod
    def _scale(scale: Optional[float]) -> Optional[Tensor]:
        return None if scale is None else torch.tensor(scale, dtype=torch.float64)

    def inner_step(self, problem: InnerProblemLike, theta: Sequence[Tensor], buffers: dict[str, Tensor], batch: Any,
                   state: Sequence[State], hyper: Sequence[Hyper], scale: Optional[float], j: int,
                   eager: Callable[[], Any]) -> tuple[bool, Any]:
        """[Alg.1 L5]-[Alg.1 L6] compiled: ``(True, (ℓ_j, G_j, θ_{j+1}, σ_{j+1}))`` with ``buffers``
        updated in place, or ``(False, eager())`` (Note [Compile fallback]). ``hyper`` is φ_opt per tensor
        and ``scale`` the learning-rate schedule's factor at step j (None without a schedule)."""
        self.probe(problem, theta, buffers, batch, j)
        inputs = self._inputs(problem)
        with torch.no_grad():
            ok, out = self._call("inner", eager, list(theta), inputs.fixed, inputs.learned, buffers, batch,
                                 self._counts_in(state), list(hyper), self._scale(scale))
        if not ok:
            return ok, out
        loss, G, theta_next, state_next = out
        return True, (loss, G, theta_next, self._counts_out(state_next, state))

    def reverse_step(self, problem: InnerProblemLike, theta: Sequence[Tensor], buffers: dict[str, Tensor], batch: Any,
                     state: Sequence[State], hyper: Sequence[Hyper], scale: Optional[float], B: Sequence[Tensor],
                     state_bar: Sequence[State], j: int, eager: Callable[[], Any]) -> tuple[bool, Any]:
        """[Alg.1 L11]-[Alg.1 L14] compiled: ``(True, (B_j, σ̄_j, φ̄_opt per tensor, h per loss leaf))``,
        or ``(False, eager())`` (Note [Compile fallback]). ``buffers`` are a copy of step j's."""
        self.probe(problem, theta, buffers, batch, j)
        inputs = self._inputs(problem)
        args = (list(theta), inputs.fixed, inputs.learned)
        with torch.no_grad():
            ok, out = self._call("reverse", eager, *args, dict(buffers), batch, self._counts_in(state), list(hyper),
                                 self._scale(scale), list(B), list(state_bar))
        if not ok:
            return ok, out
        B_j, state_bar_j, hyper_bar, h_learned, G_bar = out
        h_closure: list[Optional[Tensor]] = []
        if inputs.closure:
            h_closure = self._closure_mixed(problem, inputs, args, buffers, batch, G_bar)
        h_loss = [h_learned[key] if kind == "learned" else h_closure[key] for kind, key in inputs.slots]
        return True, (B_j, state_bar_j, hyper_bar, h_loss)

    def _closure_mixed(self, problem: InnerProblemLike, inputs: _Inputs,
                       args: tuple[list[Tensor], dict[str, Tensor], dict[str, Tensor]], buffers: dict[str, Tensor],
                       batch: Any, G_bar: list[Optional[Tensor]]) -> list[Optional[Tensor]]:
        """(∂G_j/∂φ_loss)ᵀ·Ḡ_j of the loss parameters the loss closes over: autograd through ``mixed``."""
        def eager() -> Tensor:
            return self._mixed(*args, problem.fresh_buffers(buffers), batch, G_bar)

        with torch.enable_grad():
            _, dot = self._call("mixed", eager, *args, problem.fresh_buffers(buffers), batch, G_bar)
            if not dot.requires_grad:
                return [None] * len(inputs.closure)
            return list(torch.autograd.grad(dot, inputs.closure, allow_unused=True))

    def whole_meta_step(self, problem: InnerProblemLike, theta: Sequence[Tensor], buffers: dict[str, Tensor],
                        batches: Sequence[Any], state: Sequence[State], hyper: Sequence[Hyper], scales: Sequence[float],
                        val_batch: Any, window: int, second_order: bool) -> Optional[tuple]:
        """[Alg.1 L4]-[Alg.1 L15] in one compiled call (Note [Whole meta steps]): ``(L_val, per-task L_val or
        None, B_0, φ̄_opt per tensor (summed over the steps), A^loss per loss leaf, ℓ_0 ... ℓ_{J-1}, s_J)``, or
        None when it cannot be compiled (the caller then runs the steps one by one)."""
        self.probe(problem, theta, buffers, batches[0], 0)
        inputs = self._inputs(problem)
        if inputs.closure:
            return None
        with torch.no_grad():
            ok, out = self._call("whole", lambda: None, list(theta), inputs.fixed, inputs.learned, buffers,
                                 list(batches), self._counts_in(state), list(hyper), list(scales), val_batch, window,
                                 second_order)
        if not ok:
            return None
        L, task_L, B, A_opt, A_learned, losses, theta_J, state_J, buffers_J = out
        state_J = self._counts_out(state_J, state)
        A_loss = [A_learned[key] for _, key in inputs.slots]
        return L, (None if self.tasks is None else task_L), B, A_opt, A_loss, losses, theta_J, state_J, buffers_J

    def first_order_step(self, theta: Sequence[Tensor], G: Grads, state: Sequence[State], hyper: Sequence[Hyper],
                         scale: Optional[float], B: Sequence[Tensor], state_bar: Sequence[State],
                         eager: Callable[[], Any]) -> tuple[bool, Any]:
        """[Alg.1 L11]-[Alg.1 L12] without second-order terms, compiled."""
        with torch.no_grad():
            return self._call("first_order", eager, list(theta), list(G), self._counts_in(state), list(hyper),
                              self._scale(scale), list(B), list(state_bar))

    def validation(self, problem: InnerProblemLike, theta: Sequence[Tensor], buffers: dict[str, Tensor], batch: Any,
                   eager: Callable[[], Any]) -> tuple[bool, Any]:
        """[Alg.1 L9] compiled: ``(True, (L_val, per-task L_val or None, B_J, ∂L_val/∂φ_loss per leaf))``."""
        inputs = self._inputs(problem)
        grad_mode = torch.enable_grad() if inputs.closure else torch.no_grad()
        with grad_mode:
            ok, out = self._call("validation", eager, list(theta), inputs.fixed, inputs.learned, buffers, batch)
            if not ok:
                return ok, out
            L, losses, B_J, direct = out
            closure: list[Optional[Tensor]] = [None] * len(inputs.closure)
            if inputs.closure and L.requires_grad:
                closure = list(torch.autograd.grad(L, inputs.closure, allow_unused=True))
        d = [direct[key] if kind == "learned" else closure[key] for kind, key in inputs.slots]
        task_L = None if self.tasks is None else losses.detach()
        return True, (L.detach(), task_L, [b.detach() for b in B_J], d)


__all__ = ["ANNOUNCE_AFTER_S", "CompiledSteps", "INDUCTOR_OPTIONS", "WHOLE_MAX_UNROLL"]
