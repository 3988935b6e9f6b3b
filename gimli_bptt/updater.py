# SPDX-License-Identifier: Apache-2.0
"""GimliUpdater: the outer loop of Algorithm 1 (lines 1-3 and 16) around a stock module and optimizer."""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .distributed import Reducer, all_equal_across_ranks, resolve_process_group
from .errors import DistributedError, NonFiniteError
from .functional import clone_buffers
from .hvp import HVP_MODES
from .hyper import OptimizerHyperparameters, parse_learn
from .optim import get_optimizer
from .optim.base import KERNEL_MODES, State, step_all
from .problem import InnerProblem, LossFn, check_scalar_loss
from .sweep import reverse_sweep
from .budget import plan_states
from .checkpoint import Checkpointing, store_all_schedule
from .progress import Progress
from .tape import InnerState, Tape, TapeResult

#: Options that trade memory for time and never change the results (free to differ on resume).
_MEMORY_OPTIONS = ("checkpoint", "memory_budget", "keep_graphs")

MetaOptFactory = Union[type, Callable[[list[Tensor]], torch.optim.Optimizer]]
Hypergrad = Union[Tensor, list[Tensor]]


@dataclass
class MetaStepResult:
    """What one meta step computed.

    Attributes:
        val_loss: L_val(θ'_J), detached.
        hypergrads: The gradient of ``val_loss`` with respect to every meta-parameter: the
            learned hyperparameter names (``"lr"``, ``"beta1"``, ...; a tensor of shape
            ``(num_groups,)`` for ``"group"``, ``(num_params,)`` for ``"tensor"``, a list of
            tensors shaped like the inner parameters for ``"element"``), ``"loss.<name>"`` for
            each loss parameter and ``"init.<parameter name>"`` with ``learn_init``.
        train_losses: ℓ_j(θ'_j) of the J inner steps, shape ``(J,)``.
        skipped: True when a non-finite hypergradient made ``step()`` skip the update
            (``on_nonfinite="skip"``).
    """

    val_loss: Tensor
    hypergrads: dict[str, Hypergrad]
    train_losses: Tensor
    skipped: bool = False
    nonfinite: list[str] = field(default_factory=list)


def _flat(value: Hypergrad) -> list[Tensor]:
    return value if isinstance(value, list) else [value]


class GimliUpdater:
    """Exact hypergradients through J unrolled steps of a stock module and ``torch.optim`` optimizer.

    One call of :meth:`step` is one iteration of Algorithm 1 (Grefenstette et al., 2019): copy
    the model and optimizer state (line 3), run J inner steps keeping a tape of θ'_j, σ_j and
    the batches but no autograd graph (lines 4-7), sweep backwards with the optimizer's
    hand-written VJP and one Hessian-vector product per step (lines 8-15), and update the
    meta-parameters φ with the meta optimizer (line 16).

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
            ``"group"``). Names are the float options of the optimizer (``lr``,
            ``momentum``, ``dampening``, ``weight_decay``, ``eps``, and Adam's betas as
            ``beta1``/``beta2``).
        loss_params: ``{name: leaf tensor}`` used inside ``train_loss`` (φ_loss), e.g. loss
            weights or the parameters of a learned loss. Leaves that require grad, on the
            model's device and in its dtype.
        learn_init: Learn the initial weights θ_0 (MAML): the meta optimizer updates the
            model's parameters. Parameters outside ``opt`` are learned too (they enter every
            inner loss), as in ANIL.
        meta_opt: The meta optimizer: a ``torch.optim`` class or a factory taking the list of
            meta-parameters (default ``torch.optim.Adam`` with its default settings).
        hvp: ``"rev"`` (reverse-over-reverse, default) or ``"fwd"`` (forward-over-reverse;
            needs forward-mode AD support of every op in ``train_loss``).
        commit: After a meta step, write θ'_J, the buffers and the inner optimizer state into
            the model and ``opt`` (continue training from the unrolled state). By default
            ``step()`` leaves them as they were.
        on_nonfinite: ``"raise"`` (default) raises :class:`~gimli_bptt.errors.NonFiniteError`
            on a non-finite hypergradient; ``"skip"`` returns a result with ``skipped=True``.
            Either way φ is left untouched.
        project: Clamp learned hyperparameters into their valid range after each meta step.
        check_finite: Check every inner loss for NaN/Inf and raise :class:`NonFiniteError`
            naming the first bad step. On the CPU at each step; on an accelerator once per meta
            step, after the tape's first pass (one host sync instead of J; Note [Deferred
            finiteness check] in ``problem.py``).
        checkpoint: Memory for the tape by hand. ``None`` (default) keeps every inner state;
            an int keeps at most that many and recomputes the rest with the optimal binomial
            schedule; a :class:`~gimli_bptt.checkpoint.Checkpointing` also takes an every-k-th
            schedule and ``verify``, and ``Checkpointing(budget_bytes=B)`` is
            ``memory_budget=B``. The hypergradients are bit-identical either way (on the CPU).
        memory_budget: Bytes the tape may hold (Algorithm 1, lines 4-7), planned per meta step
            for the fastest computation that fits (:mod:`gimli_bptt.budget`). It counts the J
            stored inner states (θ'_j, σ_j and the buffers, plus G_j with ``hvp="fwd"``; each
            as large as after the first step) and the gradient graphs kept from the forward
            pass, whose size is measured on step 0: every storage autograd saves for ℓ_0 and
            G_0 that is not held anyway (θ, buffers, batch), and G_0. It does not count the
            model, the optimizer, the batches, s_J, the working memory of the step being
            computed (its temporaries, and the one graph recomputed before an HVP) or the
            allocator's overhead. Regimes, fastest first: if the budget holds the J states and
            the graphs of k ≥ 1 steps, the graphs of the last k steps are kept (k as large as
            fits, at most J; the sweep reaches them first and frees them first) and the other
            steps are recomputed before their HVP; if it holds the J states but no graph, the
            full tape; if not even that, binomial checkpointing with ``memory_budget //
            (bytes of one state)`` slots (below one state, the meta step raises ``ValueError``).
            Graphs are kept only with ``hvp="rev"``. ``last_tape_stats`` reports the plan.
            The hypergradients do not depend on it: they are bit-identical whatever the budget
            (on the CPU). ``Checkpointing(budget_bytes=B)`` is the same budget. ``None``
            (default): as ``checkpoint`` and ``keep_graphs`` say; it cannot be combined with
            either.
        lr_schedule: ``lr_schedule(j) -> factor``: the learning rate of inner step j is the
            (learned) lr times this factor, e.g. a warm-up ``lambda j: min(1, (j + 1) / 5)``;
            the hypergradient of lr accounts for it.
        keep_graphs: Keep every inner step's gradient graph from the forward pass, so the
            reverse sweep runs only the Hessian-vector products (the fastest mode; memory of
            all J steps' activations, like an autograd unroll, but no optimizer graph): the
            shorthand for a ``memory_budget`` that holds them all. Uses the reverse-over-reverse
            HVP and the full tape.
        progress: Draw a progress bar of the forward and reverse steps on stderr. ``None``
            (default): when stderr is a terminal and J ≥ 100.
        kernels: How the inner optimizer's step and VJP run over the parameter tensors:
            ``"auto"`` (fused flat-buffer kernels where available, else their pure-PyTorch
            twin), ``"fused"`` (raise if the kernels cannot run), ``"reference"`` (the twin) or
            ``"loop"`` (one tensor at a time). All give the same hypergradients; see
            ``docs/KERNELS.md``.
        process_group: Data-parallel meta-updates (``docs/DISTRIBUTED.md``). ``None``
            (default): the default group when ``torch.distributed`` is initialised with more
            than one rank, else none. ``False``: no communication. A ``ProcessGroup``: that
            group. Each rank passes its shard of every batch; G_j, ℓ_j, the validation
            gradient and every second-order term are averaged over the ranks, so every rank
            computes the hypergradient of the mean of the per-rank losses (the full-batch one
            for equal-sized shards and mean losses) and holds the same φ. Every rank must
            build its updater from identical parameters and φ (checked here, one collective).

    Attributes:
        last_tape_stats: The tape of the last meta step: ``forward_steps`` (the first sweep's J
            plus the recomputed steps), ``max_slots_used`` (states held at once),
            ``schedule`` (``"graphs"``: the graphs of ``graphs_kept`` ≥ 1 steps were kept;
            ``"full"``: every state, no graph; ``"checkpointed"``: states were recomputed),
            ``graphs_kept`` (k, the last steps' graphs kept from the forward pass),
            ``graph_bytes`` (the measured bytes of one step's graph with ``memory_budget`` and
            ``hvp="rev"`` when the states fit, else None) and ``state_bytes`` (the bytes of one
            inner state as the budget counts it, with ``memory_budget`` or ``checkpoint``, else
            None): the plan keeps ``J * state_bytes + graphs_kept * graph_bytes`` within the budget.

    Raises:
        TypeError: an unsupported optimizer, or arguments of the wrong type.
        ValueError: an option out of range, a hyperparameter that cannot be learned, loss
            parameters that are not leaves or live on another device or dtype.
    """

    def __init__(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        train_loss: LossFn,
        val_loss: LossFn,
        *,
        unroll: int = 1,
        learn: Mapping[str, str] | Sequence[str] | None = None,
        loss_params: Mapping[str, Tensor] | None = None,
        learn_init: bool = False,
        meta_opt: Optional[MetaOptFactory] = None,
        hvp: str = "rev",
        commit: bool = False,
        on_nonfinite: str = "raise",
        project: bool = True,
        check_finite: bool = True,
        checkpoint: Checkpointing | int | None = None,
        memory_budget: int | None = None,
        progress: Optional[bool] = None,
        lr_schedule: Optional[Callable[[int], float]] = None,
        keep_graphs: bool = False,
        kernels: str = "auto",
        process_group: Any = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"opt must be a torch.optim.Optimizer, got {type(opt).__name__}")
        for what, fn in (("train_loss", train_loss), ("val_loss", val_loss)):
            if not callable(fn):
                raise TypeError(f"{what} must be callable as {what}(model, batch), got {type(fn).__name__}")
        if isinstance(unroll, bool) or not isinstance(unroll, int):
            raise TypeError(f"unroll must be an int, got {type(unroll).__name__}")
        if unroll < 1:
            raise ValueError(f"unroll must be at least 1 (the number of inner steps J), got {unroll}")
        if hvp not in HVP_MODES:
            raise ValueError(f"hvp must be one of {HVP_MODES}, got {hvp!r}")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        if commit and learn_init:
            raise ValueError(
                "commit=True and learn_init=True contradict each other: with learn_init the model's "
                "parameters are θ_0, updated by the meta optimizer; drop one of them"
            )
        self.model = model
        self.opt = opt
        self.train_loss = train_loss
        self.val_loss = val_loss
        self.unroll = unroll
        self.hvp = hvp
        self.commit = commit
        self.on_nonfinite = on_nonfinite
        self.project = project
        self.check_finite = check_finite
        self.learn_init = bool(learn_init)
        if kernels not in KERNEL_MODES:
            raise ValueError(f"kernels must be one of {KERNEL_MODES}, got {kernels!r}")
        self.impl = dataclasses.replace(get_optimizer(opt), kernels=kernels)
        self._hvp_fallback = False
        if isinstance(checkpoint, bool) or not (checkpoint is None or isinstance(checkpoint, (int, Checkpointing))):
            raise TypeError(
                "checkpoint must be None, a number of slots, or gimli_bptt.Checkpointing(...), "
                f"got {type(checkpoint).__name__}"
            )
        if isinstance(checkpoint, int):
            checkpoint = Checkpointing(slots=checkpoint)
        self.checkpoint = checkpoint.validate() if checkpoint is not None else None
        self.progress = progress
        if lr_schedule is not None and not callable(lr_schedule):
            raise TypeError(f"lr_schedule must be a function of the inner step, got {type(lr_schedule).__name__}")
        if lr_schedule is not None and "lr" not in self.impl.hyper_names:
            raise ValueError(f"lr_schedule needs an optimizer with a learning rate; {self.impl.name} has none")
        self.lr_schedule = lr_schedule
        self.meta_steps = 0
        self.skipped_steps = 0
        if keep_graphs and self.checkpoint is not None:
            raise ValueError("keep_graphs=True keeps every step's graph: it cannot be combined with checkpoint=")
        if keep_graphs and hvp == "fwd":
            raise ValueError("keep_graphs=True reuses the forward pass's graph, a reverse-over-reverse HVP: use hvp='rev'")
        self.keep_graphs = bool(keep_graphs)
        if memory_budget is not None:
            if isinstance(memory_budget, bool) or not isinstance(memory_budget, int):
                raise TypeError(f"memory_budget must be a number of bytes (an int), got {type(memory_budget).__name__}")
            if memory_budget < 1:
                raise ValueError(f"memory_budget must be at least 1 byte, got {memory_budget}")
            if self.checkpoint is not None:
                raise ValueError(
                    "memory_budget= and checkpoint= both set what the tape keeps: give one of them "
                    "(Checkpointing(budget_bytes=B) is the same as memory_budget=B)"
                )
            if self.keep_graphs:
                raise ValueError(
                    "memory_budget= and keep_graphs=True both set which graphs the tape keeps: give one of them "
                    "(keep_graphs=True keeps every graph whatever the budget)"
                )
        self.memory_budget = memory_budget
        # One budget mechanism: Checkpointing(budget_bytes=B) is planned as memory_budget=B.
        self._budget = memory_budget if self.checkpoint is None else self.checkpoint.budget_bytes

        named = list(model.named_parameters())
        in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
        model_ids = {id(p) for _, p in named}
        stray = [i for i, group in enumerate(opt.param_groups) for p in group["params"] if id(p) not in model_ids]
        if stray:
            raise ValueError(
                f"the optimizer holds tensors that are not parameters of the model (param groups {sorted(set(stray))}); "
                "build it over model.parameters()"
            )
        self._names = [n for n, p in named if id(p) in in_opt]
        self._params = [p for _, p in named if id(p) in in_opt]
        self._frozen_names = [n for n, p in named if id(p) not in in_opt]
        if not self._params:
            raise ValueError("the optimizer holds no parameters of the model")
        for name, p in zip(self._names, self._params):
            if not p.is_floating_point() or p.is_complex():
                raise TypeError(f"parameter {name!r} is {p.dtype}; only real floating-point parameters are supported")
            if p.is_sparse:
                raise TypeError(f"parameter {name!r} is sparse; sparse parameters are not supported")
        self._ref = self._params[0]
        self._cuda_devices = sorted({p.device.index or 0 for p in self._params if p.device.type == "cuda"})

        self.learn = parse_learn(self.impl, learn)
        self.hyper = OptimizerHyperparameters(self.impl, opt.param_groups, self._params, self.learn)
        self.loss_params = self._check_loss_params(loss_params or {})
        if not self.learn and not self.loss_params and not self.learn_init:
            raise ValueError(
                "nothing to meta-learn: give learn={...}, loss_params={...} or learn_init=True"
            )
        leaves = [t for _, t in self.named_meta_parameters()]
        if meta_opt is None:
            meta_opt = torch.optim.Adam
        if not callable(meta_opt):
            raise TypeError("meta_opt must be a torch.optim class or a factory taking the list of meta-parameters")
        self.meta_opt = meta_opt(leaves)
        if not isinstance(self.meta_opt, torch.optim.Optimizer):
            raise TypeError(f"meta_opt must build a torch.optim.Optimizer, got {type(self.meta_opt).__name__}")
        self.process_group = resolve_process_group(process_group)
        self._reducer = Reducer(self.process_group, self._ref.device) if self.process_group is not None else None
        if self._reducer is not None:
            self._check_replicas()

    @property
    def world_size(self) -> int:
        """The number of ranks the meta-updates are averaged over (1 without communication)."""
        return 1 if self._reducer is None else self._reducer.world_size

    def _check_replicas(self) -> None:
        """Every rank must start from the same θ_0 and φ (as DDP makes sure at construction)."""
        named = [(f"parameter {n!r}", p) for n, p in self.model.named_parameters()]
        named += [(f"meta-parameter {n!r}", t) for n, t in self.named_meta_parameters() if not n.startswith("init.")]
        same = all_equal_across_ranks([t for _, t in named], self.process_group)
        differ = [what for (what, _), ok in zip(named, same) if not ok]
        if differ:
            raise ValueError(
                f"the ranks hold different values of {', '.join(differ[:3])}{' and others' if len(differ) > 3 else ''}: "
                "every rank must start from the same model and meta-parameters; seed every rank alike or load "
                "rank 0's state_dict on every rank (e.g. torch.distributed.broadcast each tensor from rank 0) "
                "before building GimliUpdater"
            )

    # ----------------------------------------------------------------- set-up helpers
    def _check_loss_params(self, loss_params: Mapping[str, Tensor]) -> dict[str, Tensor]:
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
            if t.device != self._ref.device:
                raise ValueError(f"loss_params[{name!r}] is on {t.device} but the model is on {self._ref.device}; move it with .to()")
            if t.dtype != self._ref.dtype:
                raise ValueError(f"loss_params[{name!r}] is {t.dtype} but the model is {self._ref.dtype}; convert it with .to()")
            out[name] = t
        return out

    def named_meta_parameters(self) -> list[tuple[str, Tensor]]:
        """φ: every meta-parameter by name, in the order the meta optimizer holds them.

        Learned hyperparameters (``"lr"``, or ``"lr.<parameter name>"`` per element), then
        ``"loss.<name>"``, then ``"init.<parameter name>"`` (the model's own parameters) with
        ``learn_init``.
        """
        out = list(self.hyper.named_leaves(self._names))
        out += [(f"loss.{n}", t) for n, t in self.loss_params.items()]
        if self.learn_init:
            out += [(f"init.{n}", p) for n, p in self.model.named_parameters()]
        return out

    def meta_parameters(self) -> list[Tensor]:
        """The tensors of :meth:`named_meta_parameters`."""
        return [t for _, t in self.named_meta_parameters()]

    def _problem(self) -> InnerProblem:
        frozen_live = self.learn_init
        frozen = {n: (p if frozen_live else p.detach()) for n, p in self.model.named_parameters()
                  if n in set(self._frozen_names)}
        leaves = list(self.loss_params.values()) + (list(frozen.values()) if frozen_live else [])
        return InnerProblem(
            module=self.model,
            names=self._names,
            frozen=frozen,
            train_loss=self.train_loss,
            impl=self.impl,
            hyper=self.hyper.per_param(),
            loss_leaves=leaves,
            cuda_devices=self._cuda_devices,
            check_finite=self.check_finite,
            hvp_fallback=self._hvp_fallback,
            lr_schedule=self.lr_schedule,
            reducer=self._reducer,
        )

    def _initial_state(self) -> tuple[list[Tensor], list[State], dict[str, Tensor]]:
        """Line 3: copies of θ_t, the optimizer state and the buffers."""
        theta0 = [p.detach().clone() for p in self._params]
        hyper = self.hyper.fixed
        state0 = [self.impl.import_state(self.opt.state.get(p, {}), p, h) for p, h in zip(self._params, hyper)]
        buffers = {n: b for n, b in self.model.named_buffers() if b is not None}
        return theta0, state0, clone_buffers(buffers)

    def _check_batches(self, train_batches: Iterable[Any]) -> list[Any]:
        if isinstance(train_batches, (Tensor, str, bytes)) or not isinstance(train_batches, Iterable):
            raise TypeError(
                "train_batches must be a sequence of the J inner batches (a list or tuple), "
                f"got {type(train_batches).__name__}"
            )
        batches = list(train_batches)
        if len(batches) != self.unroll:
            raise ValueError(
                f"got {len(batches)} train batches but unroll={self.unroll}: give exactly one batch per inner step"
            )
        return batches

    # ----------------------------------------------------------------- Algorithm 1
    def hypergradient(self, train_batches: Sequence[Any], val_batch: Any) -> MetaStepResult:
        """Computes L_val(θ'_J) and its gradient with respect to φ (lines 2-15); changes nothing.

        The model, its buffers, the optimizer and φ are left exactly as they were (the global
        random number generators advance as the losses draw from them).
        """
        return self._compute(train_batches, val_batch)[0]

    def _compute(self, train_batches: Sequence[Any], val_batch: Any) -> tuple[MetaStepResult, TapeResult]:
        batches = self._check_batches(train_batches)
        if self._reducer is not None:
            self._reducer.reset()
        problem = self._problem()
        start = InnerState(*self._initial_state())
        keep_G = self.hvp == "fwd"
        state_bytes: int | None = None
        graph_bytes_left: int | None = None
        if self._budget is not None:  # [Alg.1 L4-7] planned: graphs of the last k steps, full tape or checkpoints
            state_bytes = self._state_bytes(start, problem, keep_G)
            plan = plan_states(self._budget, self.unroll, state_bytes)
            schedule = plan.schedule
            if self.hvp == "rev":
                graph_bytes_left = plan.graph_bytes_left
        elif self.checkpoint is not None:
            state_bytes = self._state_bytes(start, problem, keep_G)
            schedule = self.checkpoint.schedule(self.unroll, state_bytes)
        else:
            schedule = store_all_schedule(self.unroll)
        show = self.progress if self.progress is not None else self.unroll >= 100
        bar = Progress(self.unroll, self.unroll, enabled=show)
        runner = Tape(problem, start, batches, schedule, keep_G=keep_G,
                      verify=bool(self.checkpoint and self.checkpoint.verify), progress=bar,
                      keep_graphs_from=0 if self.keep_graphs else None, graph_bytes_left=graph_bytes_left)
        try:
            tape = runner.forward()  # [Alg.1 L3-7]
            result = self._sweep(problem, runner, tape, val_batch)
        finally:
            bar.close()
        recomputed = runner.forward_steps > self.unroll
        self.last_tape_stats = {
            "forward_steps": runner.forward_steps,
            "max_slots_used": runner.max_slots_used,
            "schedule": "checkpointed" if recomputed else "graphs" if runner.graphs_kept else "full",
            "graphs_kept": runner.graphs_kept,
            "graph_bytes": runner.graph_bytes,
            "state_bytes": state_bytes,
        }
        return result, tape

    def _state_bytes(self, start: InnerState, problem: InnerProblem, keep_G: bool) -> int:
        """Bytes of one inner state once the optimizer state exists (after the first step).

        s_0 may lack state (a fresh SGD has no momentum buffer yet), so each parameter counts
        as many copies as a trial step on a one-element tensor leaves state tensors, plus one
        for θ and one for G when it is kept.
        """
        total = sum(b.numel() * b.element_size() for b in start.buffers.values())
        for p, h in zip(start.theta, problem.hyper):
            probe = torch.zeros(1, dtype=p.dtype, device=p.device)
            trial = {k: (v.reshape(-1)[:1] if isinstance(v, Tensor) and v.dim() else v) for k, v in h.items()}
            _, st = self.impl.step(probe, probe, self.impl.import_state({}, probe, trial), trial)
            copies = 1 + sum(isinstance(v, Tensor) for v in st.values()) + (1 if keep_G else 0)
            total += copies * p.numel() * p.element_size()
        return total

    def _sweep(self, problem: InnerProblem, runner: Tape, tape: TapeResult, val_batch: Any) -> MetaStepResult:

        theta_J = [t.detach().requires_grad_(True) for t in tape.theta]  # [Alg.1 L9]
        with torch.enable_grad():
            val_view = problem.view(theta_J, problem.fresh_buffers(tape.buffers))
            L = check_scalar_loss(self.val_loss(val_view, val_batch), "val_loss")
            if problem.reducer is None and self.check_finite and not math.isfinite(L.item()):
                raise NonFiniteError(f"val_loss is {L.item()} after {self.unroll} inner steps")
            if not L.requires_grad:
                raise ValueError("val_loss does not depend on the model's parameters")
            grads: Sequence[Optional[Tensor]] = torch.autograd.grad(L, theta_J + problem.loss_leaves, allow_unused=True)
        if problem.reducer is not None:  # [Alg.1 L9] across ranks: L_val, B_J and ∂L_val/∂φ_loss, one collective
            out = problem.all_reduce_mean([L.detach()] + list(grads), [L] + theta_J + problem.loss_leaves,
                                          "L_val, B_J and the direct term ∂L_val/∂φ_loss (validation)")
            L, grads = out[0], out[1:]  # type: ignore[assignment]
            if self.check_finite and not math.isfinite(L.item()):
                raise NonFiniteError(f"val_loss (the mean over the ranks) is {L.item()} after {self.unroll} inner steps")
        n = len(theta_J)
        B_J = [torch.zeros_like(t) if g is None else g for t, g in zip(theta_J, grads[:n])]
        theta0_bar, A_opt, A_loss = reverse_sweep(
            problem, self.hyper, runner.entries_reversed(), B_J, list(grads[n:]), self.hvp
        )  # [Alg.1 L8-15]
        self._hvp_fallback = problem.hvp_fallback
        hypergrads: dict[str, Hypergrad] = dict(A_opt)
        n_loss = len(self.loss_params)
        for (name, _), a in zip(self.loss_params.items(), A_loss[:n_loss]):
            hypergrads[f"loss.{name}"] = a
        if self.learn_init:
            init = dict(zip(self._names, theta0_bar))
            init.update(zip([n for n in self._frozen_names], A_loss[n_loss:]))
            for name, _ in self.model.named_parameters():
                hypergrads[f"init.{name}"] = init[name]
        nonfinite = [name for name, v in hypergrads.items() if not all(bool(torch.isfinite(t).all()) for t in _flat(v))]
        return MetaStepResult(L.detach(), hypergrads, tape.losses, nonfinite=nonfinite)

    def step(self, train_batches: Sequence[Any], val_batch: Any) -> MetaStepResult:
        """One meta update (Algorithm 1, lines 2-16).

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
            result, tape = self._compute(train_batches, val_batch)
        except NonFiniteError as exc:
            if self.on_nonfinite != "skip":
                raise
            nan = torch.tensor(float("nan"))
            self.skipped_steps += 1
            return MetaStepResult(nan, {}, nan.expand(self.unroll), skipped=True, nonfinite=[str(exc)])
        if result.nonfinite:
            if self.on_nonfinite == "skip":
                result.skipped = True
                self.skipped_steps += 1
                return result
            raise NonFiniteError(
                f"non-finite hypergradient for {', '.join(result.nonfinite)}; nothing was updated "
                "(pass on_nonfinite='skip' to skip such meta steps)"
            )
        self._apply(result, tape)
        self.meta_steps += 1
        return result

    # ----------------------------------------------------------------- saving and resuming
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume meta-training: φ, the meta optimizer's state, counters, options.

        Save it beside the model's and the inner optimizer's own ``state_dict()`` (and the random
        generators' states, if the losses draw from them): :meth:`load_state_dict` on an updater
        built the same way then continues bit-identically. ``lr_schedule`` and the loss
        functions are code, not state: pass the same ones when rebuilding.
        """
        return {
            "phi": {name: t.detach().clone() for name, t in self.named_meta_parameters()},
            "meta_opt": copy.deepcopy(self.meta_opt.state_dict()),
            "counters": {"meta_steps": self.meta_steps, "skipped_steps": self.skipped_steps},
            "options": self._options(),
            "hvp_fallback": self._hvp_fallback,
        }

    def _options(self) -> dict[str, Any]:
        return {
            "optimizer": self.impl.name,
            "unroll": self.unroll,
            "learn": dict(self.learn),
            "loss_params": sorted(self.loss_params),
            "learn_init": self.learn_init,
            "hvp": self.hvp,
            "commit": self.commit,
            "on_nonfinite": self.on_nonfinite,
            "project": self.project,
            "checkpoint": None if self.checkpoint is None else tuple(self.checkpoint),
            "keep_graphs": self.keep_graphs,
            "memory_budget": self.memory_budget,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores what :meth:`state_dict` saved into an updater built with the same options.

        The memory options (``checkpoint``, ``memory_budget``, ``keep_graphs``) may differ: they
        do not change the results, so a run can resume on a machine with another budget.

        Raises:
            ValueError: the saved options, or the names and shapes of φ, differ from this
                updater's (the message names each difference); nothing is changed then.
        """
        for key in ("phi", "meta_opt", "counters", "options"):
            if key not in state_dict:
                raise ValueError(f"not a GimliUpdater state_dict: missing {key!r}")
        saved, ours = state_dict["options"], self._options()
        diffs = [f"{k}: saved {saved.get(k)!r}, here {ours[k]!r}" for k in ours
                 if k not in _MEMORY_OPTIONS and saved.get(k) != ours[k]]
        phi = dict(self.named_meta_parameters())
        if set(state_dict["phi"]) != set(phi):
            diffs.append(f"meta-parameters: saved {sorted(state_dict['phi'])}, here {sorted(phi)}")
        else:
            diffs += [f"{n}: saved shape {tuple(v.shape)}, here {tuple(phi[n].shape)}"
                      for n, v in state_dict["phi"].items() if v.shape != phi[n].shape]
        if diffs:
            raise ValueError("cannot load this state_dict into this updater: " + "; ".join(diffs))
        saved_values = {n: t.detach().clone() for n, t in phi.items()}
        saved_meta = copy.deepcopy(self.meta_opt.state_dict())
        try:
            with torch.no_grad():
                for name, t in phi.items():
                    t.copy_(state_dict["phi"][name])
            self.meta_opt.load_state_dict(state_dict["meta_opt"])
            self.hyper.write_back(self.opt.param_groups)
        except BaseException:
            with torch.no_grad():
                for name, t in phi.items():
                    t.copy_(saved_values[name])
            self.meta_opt.load_state_dict(saved_meta)
            raise
        self.meta_steps = int(state_dict["counters"]["meta_steps"])
        self.skipped_steps = int(state_dict["counters"]["skipped_steps"])
        self._hvp_fallback = bool(state_dict.get("hvp_fallback", False))

    def _apply(self, result: MetaStepResult, tape: TapeResult) -> None:
        """Line 16, as a transaction: on any exception everything is restored, then re-raised."""
        leaves = self.named_meta_parameters()
        saved_values = [t.detach().clone() for _, t in leaves]
        saved_grads = [None if t.grad is None else t.grad.clone() for _, t in leaves]
        saved_meta = copy.deepcopy(self.meta_opt.state_dict())
        saved_groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
        saved_fixed = copy.deepcopy(self.hyper.fixed)
        saved_model = None
        if self.commit:
            saved_model = (copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.opt.state_dict()))
        agreeing = False
        try:
            grads = self._grads_by_leaf(result.hypergrads)
            for (_, t), g in zip(leaves, grads):
                t.grad = g.detach().to(t.dtype).clone()
            self.meta_opt.step()
            if self.project:
                self.hyper.project()
            self.hyper.write_back(self.opt.param_groups)
            if self.commit:
                self._commit(tape)
            agreeing = True
            self._agree(True)
        except BaseException:
            if self._reducer is not None and not agreeing:
                try:  # tell the peers, waiting in _agree, that this rank failed: they roll back too
                    self._agree(False)
                except DistributedError:
                    pass
            with torch.no_grad():
                for (_, t), v, g in zip(leaves, saved_values, saved_grads):
                    t.copy_(v)
                    t.grad = g
            self.meta_opt.load_state_dict(saved_meta)
            for g, saved in zip(self.opt.param_groups, saved_groups):
                g.update(saved)
            self.hyper.fixed = saved_fixed
            if saved_model is not None:
                self.model.load_state_dict(saved_model[0])
                self.opt.load_state_dict(saved_model[1])
            raise

    def _agree(self, ok: bool) -> None:
        """Distributed line 16: every rank commits its meta update only if every rank succeeded.

        One collective of a success flag; if any rank failed, raises :class:`DistributedError`
        (inside :meth:`_apply`'s transaction, so this rank rolls back as the failed one does).
        """
        if self._reducer is None:
            return
        flag = torch.tensor(1.0 if ok else 0.0, dtype=self._ref.dtype, device=self._ref.device)
        (mean,) = self._reducer.mean([flag], [flag], "the success flags of the meta update (line 16)")
        assert mean is not None
        if ok and float(mean) != 1.0:
            raise DistributedError(
                f"another rank failed while applying the meta update (rank {self._reducer.rank} of "
                f"{self._reducer.world_size} succeeded); every rank rolled back: φ, the meta optimizer, the model "
                "and the optimizer are as before this step"
            )

    def _grads_by_leaf(self, hypergrads: Mapping[str, Hypergrad]) -> list[Tensor]:
        """The hypergradients in the order of :meth:`named_meta_parameters`."""
        out: list[Tensor] = []
        for name in self.hyper.values:
            out.extend(_flat(hypergrads[name]))
        out += [hypergrads[f"loss.{n}"] for n in self.loss_params]  # type: ignore[misc]
        if self.learn_init:
            out += [hypergrads[f"init.{n}"] for n, _ in self.model.named_parameters()]  # type: ignore[misc]
        return out

    @torch.no_grad()
    def _commit(self, tape: TapeResult) -> None:
        """Writes θ'_J, the buffers and σ_J into the model and the optimizer."""
        for p, t in zip(self._params, tape.theta):
            p.copy_(t)
        live = dict(self.model.named_buffers())
        for name, b in tape.buffers.items():
            live[name].copy_(b)
        for p, s in zip(self._params, tape.state):
            exported = self.impl.export_state(s, p)
            if exported:
                self.opt.state[p] = exported

    # ----------------------------------------------------------------- real training
    def train_step(self, batch: Any) -> Tensor:
        """One real training step of the model with the learned hyperparameters.

        The update ``torch.optim`` would make with the current values of φ_opt at every
        granularity (for group-level values it equals ``opt.step()``, which also works since
        they are written into ``opt.param_groups``). Gradients come from ``train_loss`` on
        ``batch``; buffers update as in training. Writes the new parameters into the model
        and the new state into ``opt.state``. Returns the loss.
        """
        if self._reducer is not None:
            self._reducer.reset()
        problem = self._problem()  # distributed: G is averaged over the ranks, as DDP's backward does
        buffers = {n: b for n, b in self.model.named_buffers() if b is not None}
        theta = [p.detach() for p in self._params]
        state = [self.impl.import_state(self.opt.state.get(p, {}), p, h) for p, h in zip(self._params, self.hyper.fixed)]
        loss, G = problem.gradient(theta, buffers, batch, 0)
        with torch.no_grad():
            theta_next, state_next = step_all(self.impl, theta, G, state, problem.hyper)
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
