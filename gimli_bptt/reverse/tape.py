# SPDX-License-Identifier: Apache-2.0
"""The forward tape ([Alg.1 L4]-[Alg.1 L7]) and the checkpoint-schedule executor that feeds the sweep.

A :class:`Tape` carries out a schedule of :mod:`gimli_bptt.reverse.schedules` operations literally:
the full tape is the schedule that stores every state, a checkpointed tape one that stores
a few and recomputes the others. The reverse sweep asks for the entries j = J-1 ... 0 and
never knows which schedule produced them.

Note [Bit-identical recomputation]: a recomputed step runs the same operations on the same
inputs as the first forward pass: the batch is the same object, the buffers are the stored
ones, and the generator state from before ℓ_j is replayed (when ℓ_j drew random numbers).
On the CPU this gives the same bits; ``verify=True`` checks it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor

from .._typing import Grads, State
from ..problem import InnerProblem, RngState, StepGradient, capture_rng, same_rng
from ..progress import Progress
from .meter import SavedGraphMeter, tensors_in
from .plan import TapePlan, graphs_that_fit

@dataclass
class InnerState:
    """s_j: the inner parameters, the optimizer state and the module's buffers before step j."""

    theta: list[Tensor]
    state: list[State]
    buffers: dict[str, Tensor]


@dataclass
class TapeEntry:
    """What the reverse sweep needs to reverse step j.

    Attributes:
        j: The inner step.
        theta: θ'_j, the inner parameters (immutable: steps are out of place).
        state: σ_j, the optimizer state of each inner parameter.
        buffers: The module's buffers before step j (BatchNorm statistics), or ``{}``.
        batch: A reference to the batch of step j (never copied).
        rng: The generator states before ℓ_j, or None if ℓ_j drew no random numbers.
        G: G_j (the mean over ranks when distributed) when the forward-over-reverse HVP
            needs it or a graph is kept, else None.
        kept: ℓ_j and G_j with this rank's autograd graph, kept from the forward pass (step j
            is at or after the tape's ``keep_graphs_from``), so the sweep need not recompute
            step j; else None.
    """

    j: int
    theta: list[Tensor]
    state: list[State]
    buffers: dict[str, Tensor]
    batch: Any
    rng: Optional[RngState]
    G: Optional[Grads]
    kept: Optional[StepGradient] = None


@dataclass
class TapeResult:
    """The end of the first forward sweep: s_J and the inner losses ℓ_0 ... ℓ_{J-1}."""

    theta: list[Tensor]
    state: list[State]
    buffers: dict[str, Tensor]
    losses: Tensor


def _fingerprint(s: InnerState) -> bytes:
    """A digest of every bit of a state (for ``verify``)."""
    h = hashlib.sha256()
    tensors = list(s.theta) + [v for st in s.state for v in st.values() if isinstance(v, Tensor)]
    tensors += list(s.buffers.values())
    for t in tensors:
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


class Tape:
    """Runs the inner loop under a memory plan and hands the sweep its entries.

    Args:
        problem: The inner problem.
        start: s_0 (copies: [Alg.1 L3]).
        batches: The J inner batches (referenced, never copied).
        plan: The memory plan (:func:`gimli_bptt.reverse.plan.plan_tape`): the checkpoint schedule of
            the states, and which steps' gradient graphs to keep from the first forward pass so
            that the sweep need not recompute them: from ``keep_graphs_from`` on (0: every
            step's, the memory of all J steps' activations, as an autograd unroll), or, with
            ``graph_bytes_left``, the last :func:`~gimli_bptt.reverse.plan.graphs_that_fit` steps'
            once step 0's graph has been measured under
            :class:`~gimli_bptt.reverse.meter.SavedGraphMeter` (step 0's own is dropped when it is not
            among them). The last steps' graphs are the ones kept since the sweep reaches them
            first and frees each after its HVP. Kept graphs need the store-all schedule.
            ``verify`` checks that every recomputed state equals, bit for bit, the state of the
            first forward pass (a digest of each is kept); ``RuntimeError`` if not.
        keep_G: Hand G_j to the sweep (the forward-over-reverse HVP, the first-order mode). G_j is
            kept beside each stored state and recomputed for the others.
        progress: A progress bar of the forward and reverse steps (its total: 2J plus the recomputed steps).
        offset: The inner step of ``batches[0]`` (a truncated tape starts at step J - K; the
            schedule counts from 0, the entries, the losses' checks and the hyperparameters of
            each step use the inner step itself).

    Attributes:
        graph_bytes: The measured bytes of one step's graph (with ``graph_bytes_left``, after
            step 0; the mean over the ranks when distributed), else None.
        keep_graphs_from: The first step whose graph is kept (J: none), once planned.
    """

    def __init__(self, problem: InnerProblem, start: InnerState, batches: Sequence[Any], plan: TapePlan,
                 keep_G: bool = False, progress: Optional[Progress] = None, offset: int = 0):
        self.problem = problem
        self.batches = batches
        self.J = len(batches)
        self.offset = offset
        self.ops = list(plan.schedule)
        self.keep_G = keep_G
        self.verify = plan.verify
        self.progress = progress
        self.keep_graphs_from = self.J if plan.keep_graphs_from is None else plan.keep_graphs_from
        self.graph_bytes_left = plan.graph_bytes_left
        self.graph_bytes: int | None = None
        self._graphs: dict[int, StepGradient] = {}
        self._pc = 0
        self._current: Optional[tuple[int, InnerState]] = (0, start)
        self._slots: dict[int, InnerState] = {}
        self._slot_G: dict[int, Grads] = {}
        self._rng: list[Optional[RngState]] = []
        self._rng_after: Optional[RngState] = None
        self._digests: list[bytes] = []
        self._losses: list[Tensor] = []
        self.forward_steps = 0
        self.max_slots_used = 0
        self._reversed = 0

    # ------------------------------------------------------------------ one step
    def _reversed_next(self, k: int) -> Optional[int]:
        """k - 1 if the schedule, right after this advance to s_k, reverses step k (unless k = J)
        and then restores s_{k-1} and reverses step k-1: Note [The last step of an advance]."""
        if self.keep_G or k < 1 or self.problem.compiled is not None:  # compiled steps keep no graph
            return None
        ops, p = self.ops, self._pc
        if k < self.J:
            if p >= len(ops) or ops[p].kind != "reverse" or ops[p].step != k:
                return None
            p += 1
        if (p + 1 < len(ops) and ops[p].kind == "restore" and ops[p].step == k - 1
                and ops[p + 1].kind == "reverse" and ops[p + 1].step == k - 1):
            return k - 1
        return None

    def _step(self, j: int, s: InnerState, keep_graph: bool = False) -> InnerState:
        """[Alg.1 L5]-[Alg.1 L6] for step j from s_j (:meth:`InnerProblem.advance`); the first time, records ℓ_j
        and the generator state.

        Note [The last step of an advance]: checkpoint schedules often advance from a stored
        s_{k-1} to s_k, reverse step k, restore s_{k-1} and reverse step k-1 (binomial and
        every-k schedules end most segments so, and with k = J the first pass does when s_{J-1}
        is stored). Step k-1's gradient is then computed while s_{k-1} is current, just before
        the sweep needs it with its graph: ``keep_graph`` keeps that graph for the reverse of
        step k-1 instead of recomputing it (for one step, two graphs are held at once).
        """
        problem = self.problem
        first = j == len(self._rng)
        step = self.offset + j  # the inner step
        buffers_next = problem.fresh_buffers(s.buffers)
        if first:
            # the generators after step j-1's loss are the ones before step j's (the optimizer
            # draws nothing): one capture per step
            before = self._rng_after if self._rng_after is not None else capture_rng(problem.cuda_devices)
            if j == 0 and self.graph_bytes_left is not None:
                grad = self._measured_gradient(s, buffers_next)
                with torch.no_grad():
                    theta, state = problem.step(s.theta, grad.G, s.state, problem.hyper_at(step))  # [Alg.1 L6]
            else:
                grad, theta, state = problem.advance(s.theta, buffers_next, self.batches[j], s.state, step,
                                                     keep_graph=keep_graph or j >= self.keep_graphs_from)
                if grad.graph is not None:
                    self._graphs[j] = grad
            self._rng_after = capture_rng(problem.cuda_devices)
            self._rng.append(None if same_rng(before, self._rng_after) else before)
            self._losses.append(grad.loss)
            if self.verify:
                self._digests.append(_fingerprint(s))
        else:
            grad, theta, state = problem.advance(s.theta, buffers_next, self.batches[j], s.state, step,
                                                 rng=self._rng[j], keep_graph=keep_graph)
            if grad.graph is not None:
                self._graphs[j] = grad
            if self.verify and _fingerprint(s) != self._digests[j]:
                raise RuntimeError(
                    f"checkpoint verify: the recomputed state before inner step {j} differs from the one of the "
                    "forward pass; train_loss is not deterministic (e.g. randomness outside torch's generators, "
                    "or a nondeterministic kernel), so a checkpointed tape cannot reproduce it"
                )
        if self.keep_G and j in self._slots and j not in self._slot_G:
            self._slot_G[j] = grad.G  # kept beside the stored s_j, freed with it
        self.forward_steps += 1
        self._tick()
        return InnerState(theta, state, buffers_next)

    def _measured_gradient(self, s: InnerState, buffers: dict[str, Tensor]) -> StepGradient:
        """[Alg.1 L5] of step 0 with its graph measured; plans ``keep_graphs_from`` from the bytes left."""
        problem = self.problem
        held = list(s.theta) + list(buffers.values()) + list(tensors_in(self.batches[0]))
        held += list(problem.loss_leaves) + list(problem.frozen.values())
        meter = SavedGraphMeter(held)
        with meter.hooks():
            grad = problem.step_gradient(s.theta, buffers, self.batches[0], self.offset, keep_graph=True)
        assert grad.graph is not None
        meter.count(grad.graph + grad.G)  # G_0 itself, and its mean over the ranks when distributed
        measured = torch.tensor(float(meter.nbytes), dtype=torch.float64, device=s.theta[0].device)
        # Every rank must keep the same steps' graphs (a kept step skips a collective in the sweep).
        (agreed,) = problem.all_reduce_mean([measured], [measured], "the bytes of one step's graph (memory budget)")
        assert agreed is not None and self.graph_bytes_left is not None
        self.graph_bytes = max(1, round(float(agreed)))
        self.keep_graphs_from = self.J - graphs_that_fit(self.graph_bytes_left, self.J, self.graph_bytes)
        if self.keep_graphs_from == 0:  # step 0 is among the kept steps
            self._graphs[0] = grad
        return grad

    def _tick(self) -> None:
        if self.progress is not None and self.progress.enabled:
            self.progress.update(1, f"forward {self.forward_steps}/{self.J} reverse {self._reversed}/{self.J}")

    @property
    def graphs_kept(self) -> int:
        """How many steps' graphs the tape keeps (the last ones)."""
        return self.J - self.keep_graphs_from

    # ------------------------------------------------------------------ the executor
    def _run(self, until_reverse: bool) -> Optional[TapeEntry]:
        """Executes operations; returns at the first ``reverse`` (as an entry) or after reaching s_J."""
        while self._pc < len(self.ops):
            op = self.ops[self._pc]
            self._pc += 1
            if op.kind == "advance":
                assert self._current is not None and self._current[0] == op.step, op
                i, s = self._current
                keep = self._reversed_next(op.to)
                for j in range(i, op.to):
                    s = self._step(j, s, keep_graph=j == keep)
                self._current = (op.to, s)
                if op.to == self.J and not until_reverse:
                    return None
            elif op.kind == "store":
                assert self._current is not None and self._current[0] == op.step, op
                self._slots[op.step] = self._current[1]
                self.max_slots_used = max(self.max_slots_used, len(self._slots))
            elif op.kind == "restore":
                self._current = (op.step, self._slots[op.step])
            elif op.kind == "free":
                del self._slots[op.step]
                self._slot_G.pop(op.step, None)
            elif op.kind == "reverse":
                assert self._current is not None and self._current[0] == op.step, op
                j, s = op.step, self._current[1]
                self._current = None
                kept = self._graphs.pop(j, None)
                G = kept.G if kept is not None else self._G_for(j, s)
                return TapeEntry(self.offset + j, s.theta, s.state, s.buffers, self.batches[j], self._rng[j], G, kept)
            else:  # pragma: no cover - schedules are validated by construction
                raise ValueError(f"unknown schedule operation {op!r}")
        return None

    def _G_for(self, j: int, s: InnerState) -> Optional[Grads]:
        if not self.keep_G:
            return None
        if j in self._slot_G:
            return self._slot_G[j]
        # through advance, so that compiled steps recompute the G_j of their first pass bit for bit
        return self.problem.advance(s.theta, self.problem.fresh_buffers(s.buffers), self.batches[j], s.state,
                                    self.offset + j, rng=self._rng[j])[0].G

    def forward(self) -> TapeResult:
        """The first forward sweep, [Alg.1 L4]-[Alg.1 L7]: runs the schedule until it reaches s_J."""
        self._run(until_reverse=False)
        assert self._current is not None and self._current[0] == self.J, "schedule never reached s_J"
        s = self._current[1]
        losses = torch.stack(self._losses)
        self.problem.check_losses(losses)  # on an accelerator: Note [Deferred finiteness check]
        return TapeResult(s.theta, s.state, s.buffers, losses)

    def entries_reversed(self) -> Iterator[TapeEntry]:
        """The entries for j = J-1 ... 0, recomputing from checkpoints as the schedule says."""
        while True:
            entry = self._run(until_reverse=True)
            if entry is None:
                return
            self._reversed += 1
            self._tick()
            yield entry


def advance_untaped(problem: InnerProblem, start: InnerState, batches: Sequence[Any]) -> tuple[InnerState, list[Tensor]]:
    """The first inner steps of a truncated unroll ([Alg.1 L5]-[Alg.1 L6] with no tape): nothing is
    kept but the current state; returns s_{J-K} and ℓ_0 ... ℓ_{J-K-1}."""
    s, losses = start, []
    for j, batch in enumerate(batches):
        buffers = problem.fresh_buffers(s.buffers)
        grad, theta, state = problem.advance(s.theta, buffers, batch, s.state, j)
        losses.append(grad.loss)
        s = InnerState(theta, state, buffers)
    return s, losses


__all__ = ["InnerState", "Tape", "TapeEntry", "TapeResult", "advance_untaped"]
