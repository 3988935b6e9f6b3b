# SPDX-License-Identifier: Apache-2.0
"""The forward tape (Algorithm 1, lines 3-7) and the checkpoint-schedule executor that feeds the sweep.

A :class:`Tape` carries out a schedule of :mod:`gimli_bptt.checkpoint` operations literally:
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

from .budget import SavedGraphMeter, graphs_that_fit, tensors_in
from .checkpoint import Op
from .optim.base import State, step_all
from .problem import InnerProblem, RngState, capture_rng, replay_rng, same_rng
from .progress import Progress

Grads = list[Optional[Tensor]]


@dataclass
class InnerState:
    """s_j: the inner parameters, the optimizer state and the module's buffers before step j."""

    theta: list[Tensor]
    state: list[State]
    buffers: dict[str, Tensor]

    def nbytes(self) -> int:
        """Memory held by this state's tensors."""
        total = sum(t.numel() * t.element_size() for t in self.theta)
        total += sum(v.numel() * v.element_size() for s in self.state for v in s.values() if isinstance(v, Tensor))
        total += sum(b.numel() * b.element_size() for b in self.buffers.values())
        return total


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
        graph: ``(θ leaves, this rank's G_j with its autograd graph)`` kept from the forward
            pass (step j is at or after the tape's ``keep_graphs_from``), so the sweep need
            not recompute step j; else None.
    """

    j: int
    theta: list[Tensor]
    state: list[State]
    buffers: dict[str, Tensor]
    batch: Any
    rng: Optional[RngState]
    G: Optional[Grads]
    graph: Optional[tuple[list[Tensor], Grads]] = None


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
    """Runs the inner loop under a checkpoint schedule and hands the sweep its entries.

    Args:
        problem: The inner problem.
        start: s_0 (copies: line 3).
        batches: The J inner batches (referenced, never copied).
        schedule: Operations from :mod:`gimli_bptt.checkpoint` for J steps.
        keep_G: Hand G_j to the sweep (the forward-over-reverse HVP). G_j is kept beside each
            stored state and recomputed for the others.
        verify: Check that every recomputed state equals, bit for bit, the state of the first
            forward pass (a digest of each is kept); raises ``RuntimeError`` if not.
        progress: Draws a progress bar.
        keep_graphs_from: The first step whose gradient graph is kept from the first forward
            pass and handed to the sweep, which then need not recompute it: 0 keeps every
            step's (the memory of all J steps' activations, as an autograd unroll), J or None
            none. The last steps' graphs are the ones kept since the sweep reaches them first
            and frees each after its HVP. Needs the store-all schedule.
        graph_bytes_left: Plan the kept graphs from a memory budget instead of
            ``keep_graphs_from``: the bytes left once the states are counted. Step 0 runs with
            its graph under :class:`~gimli_bptt.budget.SavedGraphMeter`; the graphs of the last
            :func:`~gimli_bptt.budget.graphs_that_fit` steps are kept (step 0's own is dropped
            when it is not among them). Needs the store-all schedule.

    Attributes:
        graph_bytes: The measured bytes of one step's graph (with ``graph_bytes_left``, after
            step 0; the mean over the ranks when distributed), else None.
        keep_graphs_from: The first step whose graph is kept (J: none), once planned.
    """

    def __init__(self, problem: InnerProblem, start: InnerState, batches: Sequence[Any], schedule: Sequence[Op],
                 keep_G: bool = False, verify: bool = False, progress: Optional[Progress] = None,
                 keep_graphs_from: int | None = None, graph_bytes_left: int | None = None):
        assert keep_graphs_from is None or graph_bytes_left is None, "a fixed plan or a budget, not both"
        self.problem = problem
        self.batches = batches
        self.J = len(batches)
        self.ops = list(schedule)
        self.keep_G = keep_G
        self.verify = verify
        self.progress = progress
        self.keep_graphs_from = self.J if keep_graphs_from is None else keep_graphs_from
        self.graph_bytes_left = graph_bytes_left
        self.graph_bytes: int | None = None
        self._graphs: dict[int, tuple[list[Tensor], Grads]] = {}
        self._graph_G: dict[int, Grads] = {}
        self._pc = 0
        self._current: Optional[tuple[int, InnerState]] = (0, start)
        self._slots: dict[int, InnerState] = {}
        self._slot_G: dict[int, Grads] = {}
        self._rng: list[Optional[RngState]] = []
        self._digests: list[bytes] = []
        self._losses: list[Tensor] = []
        self.forward_steps = 0
        self.max_slots_used = 0

    # ------------------------------------------------------------------ one step
    def _step(self, j: int, s: InnerState) -> InnerState:
        """Lines 5-6 for step j from s_j; the first time, records ℓ_j and the generator state."""
        problem = self.problem
        first = j == len(self._rng)
        buffers_next = problem.fresh_buffers(s.buffers)
        if first:
            before = capture_rng(problem.cuda_devices)
            if j == 0 and self.graph_bytes_left is not None:
                loss, G = self._measured_gradient(s, buffers_next)
            elif j >= self.keep_graphs_from:
                loss, G = self._kept_gradient(j, s.theta, buffers_next)
            else:
                loss, G = problem.gradient(s.theta, buffers_next, self.batches[j], j)
            self._rng.append(None if same_rng(before, capture_rng(problem.cuda_devices)) else before)
            self._losses.append(loss)
            if self.verify:
                self._digests.append(_fingerprint(s))
        else:
            with replay_rng(self._rng[j], problem.cuda_devices):
                _, G = problem.gradient(s.theta, buffers_next, self.batches[j], j)
            if self.verify and _fingerprint(s) != self._digests[j]:
                raise RuntimeError(
                    f"checkpoint verify: the recomputed state before inner step {j} differs from the one of the "
                    "forward pass; train_loss is not deterministic (e.g. randomness outside torch's generators, "
                    "or a nondeterministic kernel), so a checkpointed tape cannot reproduce it"
                )
        if self.keep_G and j in self._slots and j not in self._slot_G:
            self._slot_G[j] = G  # kept beside the stored s_j, freed with it
        with torch.no_grad():
            theta, state = step_all(problem.impl, s.theta, G, s.state, problem.hyper_at(j))
        self.forward_steps += 1
        if self.progress is not None:
            self.progress.advance()
        return InnerState(theta, state, buffers_next)

    def _kept_gradient(self, j: int, theta: list[Tensor], buffers: dict[str, Tensor]) -> tuple[Tensor, Grads]:
        """[Alg.1 L5] keeping G_j's graph for the sweep: ``(ℓ_j, G_j)`` as :meth:`InnerProblem.gradient` gives them."""
        loss, leaves, G_graph = self.problem.gradient_with_graph(theta, buffers, self.batches[j], j)
        loss, G = self.problem.reduce_gradient(loss, G_graph, leaves, j)  # Ḡ over ranks; graph stays local
        self._graphs[j] = (leaves, G_graph)
        self._graph_G[j] = G
        return loss, G

    def _measured_gradient(self, s: InnerState, buffers: dict[str, Tensor]) -> tuple[Tensor, Grads]:
        """[Alg.1 L5] of step 0 with its graph measured; plans ``keep_graphs_from`` from the bytes left."""
        problem = self.problem
        held = list(s.theta) + list(buffers.values()) + list(tensors_in(self.batches[0]))
        held += list(problem.loss_leaves) + list(problem.frozen.values())
        meter = SavedGraphMeter(held)
        with meter.hooks():
            loss, G = self._kept_gradient(0, s.theta, buffers)
        meter.count(self._graphs[0][1] + G)  # G_0 itself, and its mean over the ranks when distributed
        measured = torch.tensor(float(meter.nbytes), dtype=torch.float64, device=s.theta[0].device)
        # Every rank must keep the same steps' graphs (a kept step skips a collective in the sweep).
        (agreed,) = problem.all_reduce_mean([measured], [measured], "the bytes of one step's graph (memory budget)")
        assert agreed is not None and self.graph_bytes_left is not None
        self.graph_bytes = max(1, round(float(agreed)))
        self.keep_graphs_from = self.J - graphs_that_fit(self.graph_bytes_left, self.J, self.graph_bytes)
        if self.keep_graphs_from > 0:  # step 0 is not among the kept steps
            del self._graphs[0], self._graph_G[0]
        return loss, G

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
                for j in range(i, op.to):
                    s = self._step(j, s)
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
                graph = self._graphs.pop(j, None)
                G = self._graph_G.pop(j) if graph is not None else self._G_for(j, s)
                return TapeEntry(j, s.theta, s.state, s.buffers, self.batches[j], self._rng[j], G, graph)
            else:  # pragma: no cover - schedules are validated by construction
                raise ValueError(f"unknown schedule operation {op!r}")
        return None

    def _G_for(self, j: int, s: InnerState) -> Optional[Grads]:
        if not self.keep_G:
            return None
        if j in self._slot_G:
            return self._slot_G[j]
        with replay_rng(self._rng[j], self.problem.cuda_devices):
            _, G = self.problem.gradient(s.theta, self.problem.fresh_buffers(s.buffers), self.batches[j], j)
        return G

    def forward(self) -> TapeResult:
        """The first forward sweep, lines 4-7: runs the schedule until it reaches s_J."""
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
            if self.progress is not None:
                self.progress.reversed()
            yield entry


__all__ = ["InnerState", "Tape", "TapeEntry", "TapeResult"]
