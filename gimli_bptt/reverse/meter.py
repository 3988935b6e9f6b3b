# SPDX-License-Identifier: Apache-2.0
"""What the tape holds and did: the bytes of one step's gradient graph (:class:`SavedGraphMeter`), and
:class:`TapeStats`, the report of the last meta step's tape (``GimliUpdater.last_tape_stats``)."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class TapeStats:
    """What the tape of the last meta step did: ``GimliUpdater.last_tape_stats``.

    Attributes:
        schedule: ``"graphs"`` (the graphs of ``graphs_kept`` ≥ 1 steps were kept), ``"full"``
            (every state, no graph) or ``"checkpointed"`` (states were recomputed).
        forward_steps: Forward steps run: the first sweep's J plus the recomputed ones.
        max_slots_used: The most states held at once.
        graphs_kept: k, the last steps' graphs kept from the forward pass.
        graph_bytes: The measured bytes of one step's graph (with a budget and ``hvp="rev"``
            when the states fit), else None.
        state_bytes: The bytes of one inner state as the plan counts them, else None.
        budget: The budget planned in, else None. The plan keeps
            ``J * state_bytes + graphs_kept * graph_bytes`` within it.
        budget_source: Where the budget came from (``"given"``, or the fraction of the memory
            available and what was read, with ``memory="auto"``), else None.
        compile_seconds: With ``compile=True``, the seconds this meta step spent compiling step
            functions (0.0 once they are compiled for its shapes), else None.
    """

    schedule: str
    forward_steps: int
    max_slots_used: int
    graphs_kept: int
    graph_bytes: Optional[int]
    state_bytes: Optional[int]
    budget: Optional[int]
    budget_source: Optional[str] = None
    compile_seconds: Optional[float] = None


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


def _storage(t: Tensor) -> Optional[tuple[int, int]]:
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

    def count(self, tensors: Iterable[Optional[Tensor]]) -> None:
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


__all__ = ["SavedGraphMeter", "TapeStats", "tensors_in"]
