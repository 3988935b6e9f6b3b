# SPDX-License-Identifier: Apache-2.0
"""One memory budget for the tape (Algorithm 1, lines 4-7): which schedule fits, and how many graphs.

The reverse sweep needs, for step j, the state s_j and the gradient graph of G_j (line 5)
for its Hessian-vector product. A budget in bytes (``GimliUpdater(memory_budget=B)``, or
``Checkpointing(budget_bytes=B)``: the same thing) picks the fastest way that fits:

- ``"graphs"``: all J states, and the graphs of the last k steps kept from the tape pass
  (k ≥ 1, as many as fit); the sweep reaches those first and frees each after its HVP,
  then recomputes ℓ_j and G_j of the others.
- ``"full"``: all J states and no graph: every step is recomputed before its HVP.
- ``"checkpointed"``: ``B // state_bytes`` states (the binomial schedule); the others are
  recomputed from them.

The bytes of one state are known before the tape runs (:func:`plan_states`); those of one
step's graph are not: the tape measures step 0's with :class:`SavedGraphMeter` and asks
:func:`graphs_that_fit` how many steps' graphs to keep.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .checkpoint import Checkpointing, Op, _check_int


@dataclass(frozen=True)
class StatePlan:
    """The part of a memory plan that is known before the tape runs.

    Attributes:
        schedule: The checkpoint schedule of the states: store-all when the budget holds all
            J of them, else binomial with ``budget // state_bytes`` slots.
        graph_bytes_left: The bytes left for kept graphs once the J states are counted, or
            None when the schedule checkpoints (no graph is kept then).
    """

    schedule: list[Op]
    graph_bytes_left: int | None


def plan_states(budget_bytes: int, num_steps: int, state_bytes: int) -> StatePlan:
    """Plans the states of ``num_steps`` inner steps in ``budget_bytes`` (the tape of [Alg.1 L4-7]).

    The schedule is :meth:`Checkpointing.schedule` of ``Checkpointing(budget_bytes=...)``
    (one mechanism for both spellings of a budget).

    Args:
        budget_bytes: The memory budget, in bytes (``>= 1``).
        num_steps: Number of inner steps ``J`` (``>= 1``).
        state_bytes: Bytes of one inner state (``>= 1``).

    Returns:
        The schedule and the bytes left for graphs.

    Raises:
        TypeError: If an argument is not an ``int``.
        ValueError: If an argument is out of range, or the budget holds less than one state.
    """
    _check_int("num_steps", num_steps, 1)
    _check_int("state_bytes", state_bytes, 1)
    schedule = Checkpointing(budget_bytes=budget_bytes).validate().schedule(num_steps, state_bytes)
    left = budget_bytes - num_steps * state_bytes
    return StatePlan(schedule, left if left >= 0 else None)


def graphs_that_fit(bytes_left: int, num_steps: int, graph_bytes: int) -> int:
    """Returns k, the number of steps whose graphs of G_j [Alg.1 L5] fit: ``min(J, bytes_left // graph_bytes)``.

    Args:
        bytes_left: The budget left once the J states are counted (``>= 0``).
        num_steps: Number of inner steps ``J`` (``>= 1``).
        graph_bytes: Bytes of one step's graph, as :class:`SavedGraphMeter` measured them (``>= 1``).

    Returns:
        ``k`` with ``0 <= k <= J``; the tape keeps the graphs of steps ``J - k .. J - 1``.

    Raises:
        TypeError: If an argument is not an ``int``.
        ValueError: If an argument is out of range.
    """
    _check_int("bytes_left", bytes_left, 0)
    _check_int("num_steps", num_steps, 1)
    _check_int("graph_bytes", graph_bytes, 1)
    return min(num_steps, bytes_left // graph_bytes)


def tensors_in(obj: Any) -> Iterator[Tensor]:
    """The tensors inside nested lists, tuples and mappings (a batch), in order."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)


def _storage(t: Tensor) -> tuple[int, int] | None:
    """``(data_ptr, nbytes)`` of the storage under ``t``, or None if it has none (sparse, nested)."""
    if t.layout != torch.strided:
        return None
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


class SavedGraphMeter:
    """Measures the memory an autograd graph holds: the bytes of one step's graph of G_j [Alg.1 L5].

    Run the forward pass of ℓ_j and the ``create_graph`` backward pass that forms G_j under
    :meth:`hooks`, then :meth:`count` G_j itself::

        meter = SavedGraphMeter(held=theta + list(tensors_in(batch)))
        with meter.hooks():
            G = torch.autograd.grad(loss_fn(theta, batch), theta, create_graph=True)
        meter.count(G)
        meter.nbytes

    Counted: each distinct storage that autograd saves for backward under :meth:`hooks` (seen
    through ``torch.autograd.graph.saved_tensors_hooks``, keyed by
    ``untyped_storage().data_ptr()``), once, with its whole ``nbytes()`` (a saved view keeps
    its base alive), and the storages given to :meth:`count`.

    Not counted: storages of ``held`` (memory that is held anyway: the step's parameters, the
    buffers of the state, the batch, the user's loss parameters); temporaries freed during the
    step (intermediates that no backward function saves); autograd's node objects and tensor
    metadata; tensors without a strided storage (sparse); the allocator's rounding, caching
    and fragmentation. So ``nbytes`` is what keeping the graph costs beyond the states, up to
    that overhead.

    The hooks hand autograd a detached alias of each saved tensor (the same storage and bits,
    without a reference cycle through its ``grad_fn``), so the graph computes exactly what it
    would without the meter.

    Args:
        held: Tensors whose storages are held anyway and not counted.
    """

    def __init__(self, held: Iterable[Tensor] = ()):
        self._held = {s[0] for s in map(_storage, held) if s is not None}
        self._counted: dict[int, int] = {}

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """The context in which every tensor autograd saves for backward is counted."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, t: Tensor) -> Tensor:
        self.count([t])
        return t.detach()

    def count(self, tensors: Iterable[Tensor | None]) -> None:
        """Counts the storages of ``tensors`` (None entries are skipped), each at most once."""
        for t in tensors:
            s = None if t is None else _storage(t)
            if s is not None and s[0] not in self._held:
                self._counted[s[0]] = s[1]

    @property
    def nbytes(self) -> int:
        """The bytes counted so far."""
        return sum(self._counted.values())


def _unpack(t: Tensor) -> Tensor:
    return t


__all__ = ["SavedGraphMeter", "StatePlan", "graphs_that_fit", "plan_states", "tensors_in"]
