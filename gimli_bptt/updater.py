# SPDX-License-Identifier: Apache-2.0
"""GimliUpdater: the outer loop of Algorithm 1 ([Alg.1 L1]-[Alg.1 L3] and [Alg.1 L16]) around a stock module and optimizer.

This module is the updater and its reverse mode; its forward/online half (``mode="forward"``: ``online_hypergradient``,
``online_step``, ``reset_tangents`` and the tangents ``train_step`` carries) is the mixin
:class:`~gimli_bptt.online.OnlineMode`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from . import saving
from .distributed import Reducer, agree, check_replicas, resolve_process_group
from .errors import DistributedError, NonFiniteError
from .functional import clone_buffers
from .compiled import CompiledSteps
from .memory import Memory
from .metaparams import MetaParameters, OptimizerHyperparameters, parse_learn
from .online import OnlineMode
from .optim import get_optimizer
from .options import (MetaOptFactory, build_meta_optimizer, check_batches, check_callables, check_loss_params,
                      inner_parameters, validate_options)
from ._typing import State
from .problem import InnerProblem, LossFn, capture_rng, restore_rng
from .stepping import step_all
from .tasks import stack, stack_state
from .reverse.hypergradient import reverse_hypergradient
from .reverse.meter import TapeStats
from .reverse.plan import resolve_budget, state_bytes
from .second_order import MissingDoubleBackwardError, SafeModeLatch
from .forward import Tangents, check_learnable
from .reverse.tape import InnerState, TapeResult
from .result import MetaStepResult
from .transaction import Transaction


class GimliUpdater(OnlineMode):
    """Exact hypergradients through J unrolled steps of a stock module and ``torch.optim`` optimizer.

    One call of :meth:`step` is one iteration of Algorithm 1 (Grefenstette et al., 2019): copy
    the model and optimizer state ([Alg.1 L3]), run J inner steps keeping a tape of θ'_j, σ_j
    and the batches but no autograd graph across steps ([Alg.1 L4]-[Alg.1 L7]), sweep backwards
    with the optimizer's hand-written VJP and one Hessian-vector product per step
    ([Alg.1 L8]-[Alg.1 L15]), and update the meta-parameters φ with the meta optimizer ([Alg.1 L16]).

    Example::

        model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        train_loss = lambda m, b: F.mse_loss(m(b[0]), b[1])
        updater = GimliUpdater(model, opt, train_loss, train_loss, unroll=10,
                               learn={"lr": "group"},
                               meta_opt=functools.partial(torch.optim.Adam, lr=1e-2))
        result = updater.step(train_batches, val_batch)   # 10 batches, one validation batch
        result.hypergrads["lr"]                          # d L_val / d lr, shape (1,)
        opt.param_groups[0]["lr"]                        # the learned rate, written back

    Args:
        model: A stock ``nn.Module``. Its parameters are θ_0; its buffers (BatchNorm running
            statistics) evolve through the inner loop as in training.
        opt: A ``torch.optim`` optimizer over (some of) the model's parameters, any param
            groups; its state, if any, is the inner optimizer's initial state. Parameters it
            does not hold are kept fixed in the inner loop.
        train_loss: ``train_loss(model, batch) -> scalar tensor``; ``model`` is a
            :class:`~gimli_bptt.functional.FunctionalModel` bound to θ'_j.
        val_loss: ``val_loss(model, batch) -> scalar tensor``, evaluated at θ'_J.
        unroll: J, the number of inner steps (at least 1).
        learn: Hyperparameters of ``opt`` to meta-learn, ``{name: granularity}`` with
            granularity ``"group"``, ``"tensor"`` or ``"element"`` (a list of names means
            ``"group"``). Names are the float options of the optimizer (Adam's betas as
            ``beta1``/``beta2``; ``gimli_bptt.get_optimizer(opt).hyper_names`` lists them).
        loss_params: ``{name: leaf tensor}`` used inside ``train_loss`` (φ_loss), e.g. loss
            weights or the parameters of a learned loss. Leaves that require grad, on the
            model's device and in its dtype.
        learn_init: Learn the initial weights θ_0 (MAML): the meta optimizer updates the
            model's parameters. Parameters outside ``opt`` that require grad are learned too
            (they enter every inner loss), as in ANIL; a parameter with ``requires_grad=False``
            (a frozen backbone, a base model under LoRA adapters) stays a constant. Without
            ``learn_init`` every parameter outside ``opt`` is a constant of the unroll.
        meta_opt: The meta optimizer: a ``torch.optim`` class or a factory taking the list of
            meta-parameters (default ``torch.optim.Adam`` with its default settings).
        hvp: ``"rev"`` (reverse-over-reverse, default) or ``"fwd"`` (forward-over-reverse;
            needs forward-mode AD support of every op in ``train_loss``).
        memory: How much memory the hypergradient may use (:mod:`gimli_bptt.memory`).
            ``"auto"`` (default): a budget of half the memory available when each meta step
            starts (Note [The automatic budget]). A number of bytes: that budget. Either way each
            meta step runs the fastest plan that fits: the gradient graphs of as many steps as
            fit kept from the forward pass, else every inner state, else binomial checkpointing
            (``last_tape_stats`` reports it). ``None``: every state, no graph (each step's graph
            is recomputed before its Hessian-vector product). :class:`~gimli_bptt.memory.Memory`
            chooses by hand (``fraction=``, ``slots=``, ``every=``, ``keep_graphs=True``,
            ``verify=True``). The hypergradients are bit-identical whatever the plan (on the CPU).
        commit: After a meta step, write θ'_J, the buffers and the inner optimizer state into
            the model and ``opt`` (continue training from the unrolled state). By default
            ``step()`` leaves them as they were.
        on_nonfinite: ``"raise"`` (default): a NaN/Inf inner loss, validation loss or
            hypergradient raises :class:`~gimli_bptt.errors.NonFiniteError` naming it;
            ``"skip"``: returns a result with ``skipped=True`` instead; either way nothing
            changes. ``"ignore"``: nothing is checked (no host sync on an accelerator).
        project: Clamp learned hyperparameters into their valid range after each meta step.
        progress: Draw a progress bar of the forward and reverse steps on stderr: True, False,
            or ``None`` (default): when J ≥ 100 and stderr is a terminal or this is a Jupyter
            notebook (a widget there).
        lr_schedule: ``lr_schedule(j) -> factor``: the learning rate of inner step j is the
            (learned) lr times this factor, e.g. a warm-up ``lambda j: min(1, (j + 1) / 5)``;
            the hypergradient of lr accounts for it.
        first_order: The first-order approximation (FOMAML for MAML with SGD; Note [First order]
            in :mod:`gimli_bptt.reverse.sweep`): H_j·Ḡ_j and the mixed second derivatives of the loss
            parameters are dropped, the optimizer's own Jacobians are kept; no gradient graph is
            built. Loss parameters then get only the direct term of L_val.
        mode: ``"reverse"`` (default): Algorithm 1's tape and reverse sweep. ``"forward"``: the
            tangents dθ_j/dφ are carried along the inner loop (Note [Forward-mode
            hypergradients] in :mod:`gimli_bptt.forward`): no tape, memory independent of J, and
            online hypergradients during real training (:meth:`train_step`,
            :meth:`online_hypergradient`, :meth:`online_step`); for at most 64 learned scalars
            at group or tensor granularity (no loss parameters, no θ_0), equal to reverse mode.
        truncate: K: differentiate only the last K inner steps (truncated back-propagation,
            Shaban et al., 2019): the first J - K steps run without a tape, θ'_{J-K} and the
            optimizer state there are constants, and the hyperparameters' cotangents come from
            the last K steps; the tape, and every memory plan, holds the K steps of the window.
            ``truncate=unroll`` is the full hypergradient, bit for bit. Not with ``learn_init``.
        tasks: T, a meta-batch of tasks in one sweep (MAML): every training batch and the
            validation batch holds T tasks' batches stacked along a leading dimension, and the
            losses stay single-task functions, vectorised with ``torch.func.vmap``. Each task runs
            its own inner loop from the shared θ_0 and optimizer state (with its own copy of the
            buffers, so BatchNorm uses each task's own batch statistics); the hypergradients and
            ``val_loss`` are the means over the tasks (Note [The task dimension] in
            :mod:`gimli_bptt.tasks`). Distributed, each rank holds its share of the tasks, its
            inner loops run locally, and the hypergradients are averaged over the ranks (equal
            task counts per rank give the mean over all tasks). Not with ``commit=True``.
        kernels: How the inner optimizer runs over the parameter tensors
            (:mod:`gimli_bptt.stepping`): ``"auto"``, ``"fused"``, ``"reference"`` or ``"loop"``.
            All give the same hypergradients; see ``docs/KERNELS.md``.
        process_group: Data-parallel meta-updates (``docs/DISTRIBUTED.md``). ``None``
            (default): the default group when ``torch.distributed`` is initialised with more
            than one rank, else none. ``False``: no communication. A ``ProcessGroup``: that
            group. Each rank passes its shard of every batch; G_j, ℓ_j, the validation
            gradient and every second-order term are averaged over the ranks, so every rank
            computes the hypergradient of the mean of the per-rank losses and holds the same φ.
        compile: Run each inner step and each reverse step as one compiled ``torch.compile``
            graph (Note [Compiled meta-steps] in :mod:`gimli_bptt.compiled`): the first meta step
            compiles them (seconds to a minute, flat in J, announced on stderr and reported in
            ``last_tape_stats.compile_seconds``), later ones run compiled code. The same
            hypergradients as eager mode, to rounding. A function the compiler cannot take runs
            eagerly, with one warning. Not with ``mode="forward"``, ``hvp="fwd"``,
            ``Memory(keep_graphs=True)`` or ``kernels="fused"``/``"reference"``. Distributed
            without tasks, the steps run eagerly (their collectives sit inside them).

    Attributes:
        last_tape_stats: The :class:`~gimli_bptt.reverse.meter.TapeStats` of the last meta step's tape
            (None before the first).

    Raises:
        TypeError: an unsupported optimizer, or arguments of the wrong type.
        ValueError: an option out of range, a hyperparameter that cannot be learned, loss
            parameters that are not leaves or live on another device or dtype.
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, train_loss: LossFn, val_loss: LossFn, *,
                 unroll: int = 1, learn: Mapping[str, str] | Sequence[str] | None = None,
                 loss_params: Mapping[str, Tensor] | None = None, learn_init: bool = False,
                 meta_opt: Optional[MetaOptFactory] = None, hvp: str = "rev", memory: int | str | Memory | None = "auto",
                 commit: bool = False, on_nonfinite: str = "raise", project: bool = True,
                 progress: Optional[bool] = None, lr_schedule: Optional[Callable[[int], float]] = None,
                 kernels: str = "auto", tasks: Optional[int] = None, first_order: bool = False,
                 truncate: Optional[int] = None, mode: str = "reverse", process_group: Any = None,
                 compile: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"opt must be a torch.optim.Optimizer, got {type(opt).__name__}")
        check_callables(train_loss, val_loss)
        self.impl = get_optimizer(opt)
        self.options = validate_options(
            self.impl, unroll=unroll, hvp=hvp, commit=commit, on_nonfinite=on_nonfinite, project=project,
            memory=memory, progress=progress, lr_schedule=lr_schedule, kernels=kernels, learn_init=learn_init,
            tasks=tasks, first_order=first_order, truncate=truncate, mode=mode, compile=compile)
        inner = inner_parameters(model, opt, self.impl)
        self.model, self.opt, self.train_loss, self.val_loss = model, opt, train_loss, val_loss
        self._names, self._params, self._frozen_names = inner.names, inner.params, inner.frozen_names
        self._ref = self._params[0]
        self._cuda_devices = sorted({p.device.index or 0 for p in self._params if p.device.type == "cuda"})
        self.learn = parse_learn(self.impl, learn)
        self.hyper = OptimizerHyperparameters(self.impl, opt.param_groups, self._params, self.learn)
        self.loss_params = check_loss_params(loss_params, self._ref)
        if not self.learn and not self.loss_params and not self.options.learn_init:
            raise ValueError("nothing to meta-learn: give learn={...}, loss_params={...} or learn_init=True")
        if self.options.mode == "forward":
            check_learnable(self.hyper, self.loss_params)
        self.phi = MetaParameters(self.hyper, self.loss_params, model, self._names, self._frozen_names,
                                  self.options.learn_init)
        self.meta_opt = build_meta_optimizer(meta_opt, self.phi.leaves())
        self.compiled = (CompiledSteps(model, self._names, train_loss, val_loss, self.impl, self.options.tasks)
                         if self.options.compile else None)
        self.meta_steps = 0
        self.skipped_steps = 0
        self._online: Optional[Tangents] = None  # the tangents train_step carries (mode="forward"; online.py)
        self._online_losses: list[Tensor] = []
        self.last_tape_stats: Optional[TapeStats] = None
        self._hvp_fallback = False
        self._safe_mode = SafeModeLatch()  # Note [Skipping the safe mode]
        self._sizes: dict[tuple, int] = {}
        self.process_group = resolve_process_group(process_group)
        self._reducer = Reducer(self.process_group, self._ref.device) if self.process_group is not None else None
        if self._reducer is not None:
            named: list[tuple[str, Tensor]] = [(f"parameter {n!r}", p) for n, p in model.named_parameters()]
            named += [(f"meta-parameter {n!r}", t) for n, t in self.phi.named() if not n.startswith("init.")]
            check_replicas(named, self.process_group)
            self._budget = resolve_budget(self.memory, self._ref.device, self._reducer)  # Note [Agreeing on a budget]

    # ----------------------------------------------------------------- what the updater holds
    @property
    def unroll(self) -> int:
        return self.options.unroll

    @property
    def hvp(self) -> str:
        return self.options.hvp

    @property
    def memory(self) -> Memory:
        return self.options.memory

    @property
    def learn_init(self) -> bool:
        return self.options.learn_init

    @property
    def world_size(self) -> int:
        """The number of ranks the meta-updates are averaged over (1 without communication)."""
        return 1 if self._reducer is None else self._reducer.world_size

    def named_meta_parameters(self) -> list[tuple[str, Tensor]]:
        """φ: every meta-parameter by name, in the order the meta optimizer holds them
        (learned hyperparameters, ``"loss.<name>"``, then ``"init.<parameter>"`` with ``learn_init``)."""
        return self.phi.named()

    def meta_parameters(self) -> list[Tensor]:
        """The tensors of :meth:`named_meta_parameters`."""
        return self.phi.leaves()

    @property
    def tasks(self) -> Optional[int]:
        return self.options.tasks

    def _problem(self, tasks: Optional[int] = None, safe_mode: Optional[SafeModeLatch] = None) -> InnerProblem:
        """[Alg.1 L2]: what this meta step holds fixed, with φ split into φ_opt (per tensor) and φ_loss.

        With tasks the inner loops of the ranks are independent: their collectives are the final
        average of the hypergradients (:meth:`_compute`), not the inner gradients'. Without
        ``safe_mode`` every second-order pass runs under the second-order-safe mode."""
        learned = set(self.phi.learned_frozen)  # the frozen parameters whose θ_0 is learned (learn_init)
        frozen = {n: (p if n in learned else p.detach()) for n, p in self.model.named_parameters()
                  if n in set(self._frozen_names)}
        leaves = list(self.loss_params.values()) + [frozen[n] for n in self.phi.learned_frozen]
        return InnerProblem(module=self.model, names=self._names, frozen=frozen, train_loss=self.train_loss,
                            impl=self.impl, hyper=self.hyper.per_param(), loss_leaves=leaves,
                            cuda_devices=self._cuda_devices, check_finite=self.options.check_finite,
                            kernels=self.options.kernels, hvp_fallback=self._hvp_fallback,
                            lr_schedule=self.options.lr_schedule, reducer=None if tasks else self._reducer,
                            tasks=tasks, safe_mode=safe_mode if safe_mode is not None else SafeModeLatch(learns=False),
                            compiled=self.compiled)

    def _initial_state(self, tasks: Optional[int] = None) -> tuple[list[Tensor], list[State], dict[str, Tensor]]:
        """[Alg.1 L3]: copies of θ_t, the optimizer state and the buffers (one per task with ``tasks``)."""
        state0 = [self.impl.import_state(self.opt.state.get(p, {}), p, h) for p, h in zip(self._params, self.hyper.fixed)]
        buffers = {n: b for n, b in self.model.named_buffers() if b is not None}
        if tasks is None:
            return [p.detach().clone() for p in self._params], state0, clone_buffers(buffers)
        return ([stack(p, tasks) for p in self._params], [stack_state(s, tasks) for s in state0],
                {n: stack(b, tasks) for n, b in buffers.items()})

    # ----------------------------------------------------------------- Algorithm 1
    def hypergradient(self, train_batches: Sequence[Any], val_batch: Any) -> MetaStepResult:
        """Computes L_val(θ'_J) and its gradient with respect to φ ([Alg.1 L2]-[Alg.1 L15]); changes nothing.

        The model, its buffers, the optimizer and φ are left exactly as they were (the global
        random number generators advance as the losses draw from them).
        """
        return self._compute(train_batches, val_batch)[0]

    def _compute(self, train_batches: Sequence[Any], val_batch: Any) -> tuple[MetaStepResult, TapeResult]:
        batches = check_batches(train_batches, self.unroll, self.tasks, val_batch)
        if self._reducer is not None:
            self._reducer.reset()
        if self.options.mode == "forward":
            return self._compute_forward(batches, val_batch)
        latch = self._safe_mode if self._reducer is None else None  # ranks never skip: Note [Skipping the safe mode]
        rng = capture_rng(self._cuda_devices) if latch is not None and latch.skipping else None
        problem = self._problem(self.tasks, latch)  # [Alg.1 L2]
        start = InnerState(*self._initial_state(self.tasks))  # [Alg.1 L3]
        budget = self._budget if self._reducer is not None else resolve_budget(self.memory, self._ref.device)
        try:
            swept, end, self.last_tape_stats = reverse_hypergradient(  # [Alg.1 L4]-[Alg.1 L15]
                problem, start, batches, self.hyper, self.val_loss, val_batch, memory=self.memory, budget=budget,
                state_bytes=lambda keep_G: self._state_bytes(start, problem, keep_G), hvp=self.hvp,
                first_order=self.options.first_order, window=self.options.window, progress=self.options.progress)
        except MissingDoubleBackwardError:
            if rng is None:
                raise
            self._safe_mode.needs()  # a registered function ran in a pass without the mode: again, with it
            restore_rng(rng)
            return self._compute(train_batches, val_batch)
        self._hvp_fallback = problem.hvp_fallback
        theta0_bar = swept.theta0_bar if self.tasks is None else [b.sum(0) for b in swept.theta0_bar]
        hypergrads = self.phi.hypergradients(swept.A_opt, swept.A_loss, theta0_bar)
        val_loss = swept.val_loss
        if self.tasks is not None and self._reducer is not None:  # tasks sharded over ranks: average at the end
            hypergrads, val_loss = self.phi.mean_over_ranks(self._reducer, hypergrads, val_loss)
        nonfinite = MetaParameters.nonfinite(hypergrads) if self.options.check_finite else []
        return MetaStepResult(val_loss, hypergrads, end.losses, nonfinite=nonfinite,
                              task_val_losses=swept.task_val_losses), end

    def _state_bytes(self, start: InnerState, problem: InnerProblem, keep_G: bool) -> int:
        """:func:`~gimli_bptt.reverse.plan.state_bytes`, computed once for the shapes, dtypes and buffers it sees
        (the fixed hyperparameters, which decide which state entries exist, do not change)."""
        key = (keep_G, tuple((t.shape, t.dtype, t.device) for t in start.theta),
               tuple((n, b.shape, b.dtype) for n, b in start.buffers.items()))
        if key not in self._sizes:
            self._sizes[key] = state_bytes(self.impl, start.theta, start.buffers, problem.hyper, keep_G)
        return self._sizes[key]

    def step(self, train_batches: Sequence[Any], val_batch: Any) -> MetaStepResult:
        """One meta update ([Alg.1 L2]-[Alg.1 L16]).

        Computes the hypergradients as :meth:`hypergradient` does, sets them as the ``.grad``
        of every meta-parameter and takes one step of the meta optimizer; learned group-level
        hyperparameters are then written into ``opt.param_groups``. If anything raises, the
        model, its buffers, the optimizer's state, φ and the meta optimizer's state are
        exactly as they were before the call.

        Raises:
            NonFiniteError: a non-finite loss or hypergradient (unless ``on_nonfinite="skip"``,
                which returns a result with ``skipped=True`` and changes nothing).
        """
        try:
            result, end = self._compute(train_batches, val_batch)
        except NonFiniteError as exc:
            if self.options.on_nonfinite != "skip":
                raise
            nan = torch.tensor(float("nan"))
            self.skipped_steps += 1
            return MetaStepResult(nan, {}, nan.expand(self.unroll), skipped=True, nonfinite=[str(exc)])
        if result.nonfinite:
            if self.options.on_nonfinite == "skip":
                result.skipped = True
                self.skipped_steps += 1
                return result
            raise NonFiniteError(
                f"non-finite hypergradient for {', '.join(result.nonfinite)}; nothing was updated "
                "(pass on_nonfinite='skip' to skip such meta steps)"
            )
        self._apply(result, end)
        self.meta_steps += 1
        return result

    def _transaction(self, model: Optional[nn.Module] = None, tell_peers: Optional[Callable[[], None]] = None
                     ) -> Transaction:
        return Transaction(self.phi.leaves(), self.meta_opt, self.opt, self.hyper, model, tell_peers)

    def _apply(self, result: MetaStepResult, end: Optional[TapeResult]) -> None:
        """[Alg.1 L16] as a transaction: on any exception everything is restored, then re-raised."""
        reducer = self._reducer
        agreeing = False

        def tell_peers() -> None:  # the peers wait in agree(): tell them this rank failed, so they roll back too
            if reducer is not None and not agreeing:
                try:
                    agree(reducer, False, self._ref)
                except DistributedError:
                    pass

        with self._transaction(self.model if self.options.commit else None, tell_peers):
            for t, g in zip(self.phi.leaves(), self.phi.grads_in_order(result.hypergrads)):
                t.grad = g.detach().to(t.dtype).clone()
            self.meta_opt.step()
            if self.options.project:
                self.hyper.project()
            self.hyper.write_back(self.opt.param_groups)
            if self.options.commit and end is not None:
                self._commit(end)
            agreeing = True
            if reducer is not None:
                agree(reducer, True, self._ref)

    @torch.no_grad()
    def _commit(self, end: TapeResult) -> None:
        """Writes θ'_J, the buffers and σ_J into the model and the optimizer."""
        for p, t in zip(self._params, end.theta):
            p.copy_(t)
        live = dict(self.model.named_buffers())
        for name, b in end.buffers.items():
            live[name].copy_(b)
        for p, s in zip(self._params, end.state):
            exported = self.impl.export_state(s, p)
            if exported:
                self.opt.state[p] = exported

    # ----------------------------------------------------------------- saving and resuming
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume meta-training: φ, the meta optimizer's state, counters, options.

        Save it beside the model's and the inner optimizer's own ``state_dict()`` (and the random
        generators' states, if the losses draw from them): :meth:`load_state_dict` on an updater
        built the same way then continues bit-identically. ``lr_schedule`` and the loss
        functions are code, not state: pass the same ones when rebuilding. Every value is a
        tensor or a plain Python value, so ``torch.load(..., weights_only=True)`` reads it.
        """
        return saving.state_dict(self)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores what :meth:`state_dict` saved into an updater built with the same options.

        The memory and kernel options may differ: they do not change the results, so a run can
        resume on a machine with another budget.

        Raises:
            ValueError: the saved options, or the names and shapes of φ, differ from this
                updater's (the message names each difference); nothing is changed then.
        """
        saving.load_state_dict(self, state_dict)

    # ----------------------------------------------------------------- real training
    def train_step(self, batch: Any) -> Tensor:
        """One real training step of the model with the learned hyperparameters.

        The update ``torch.optim`` would make with the current values of φ_opt at every
        granularity (for group-level values it equals ``opt.step()``, which also works since
        they are written into ``opt.param_groups``). Gradients come from ``train_loss`` on
        ``batch``; buffers update as in training. Writes the new parameters into the model
        and the new state into ``opt.state``. Returns the loss. With ``tasks``, ``batch`` is an
        ordinary single-task batch (the model trains as one).
        """
        if self._reducer is not None:
            self._reducer.reset()
        problem = self._problem()  # one ordinary batch; distributed: G averaged over the ranks, as DDP does
        problem.lr_schedule = None  # a schedule shapes the steps of an unroll, not real training
        buffers = {n: b for n, b in self.model.named_buffers() if b is not None}
        theta = [p.detach() for p in self._params]
        state = [self.impl.import_state(self.opt.state.get(p, {}), p, h) for p, h in zip(self._params, self.hyper.fixed)]
        G: list[Optional[Tensor]]
        if self.options.mode == "forward":  # carry the tangents along the real training steps (online.py)
            theta_next, state_next, loss, G = self._carry_tangents(problem, theta, state, buffers, batch)
        else:
            grad = problem.step_gradient(theta, buffers, batch, 0)
            with torch.no_grad():
                theta_next, state_next = step_all(self.impl, theta, grad.G, state, problem.hyper, self.options.kernels)
            loss, G = grad.loss, grad.G
        with torch.no_grad():
            for p, t, s, g in zip(self._params, theta_next, state_next, G):
                if g is None:
                    continue
                p.copy_(t)
                self.opt.state[p] = self.impl.export_state(s, p)
        return loss

    def __repr__(self) -> str:
        learned = ", ".join(f"{k}:{v}" for k, v in self.learn.items())
        return (f"GimliUpdater({self.impl.name}, unroll={self.unroll}, learn={{{learned}}}, "
                f"loss_params={list(self.loss_params)}, learn_init={self.learn_init}, hvp={self.hvp!r})")


__all__ = ["GimliUpdater", "MetaStepResult"]
