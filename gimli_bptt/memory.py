# SPDX-License-Identifier: Apache-2.0
"""The one memory option, ``memory=``: how much of the tape a hypergradient may keep ([Alg.1 L4]-[Alg.1 L7]).

For each inner step j the reverse sweep needs the state s_j (parameters, optimizer state,
buffers) and the gradient graph of G_j ([Alg.1 L5]) for its Hessian-vector product. How much
of that the tape keeps is one decision, ``GimliUpdater(memory=...)``:

- ``"auto"`` (the default, ``Memory(fraction=AUTO_FRACTION)``): a budget of a fraction of the
  memory available when each meta step starts (Note [The automatic budget]), planned as below;
- a number of bytes (or ``Memory(budget=B)``): the fastest plan that fits, per meta step:

  - ``"graphs"``: all J states, and the graphs of the last k ≥ 1 steps kept from the tape
    pass (as many as fit); the sweep reaches those first and frees each after its HVP, then
    recomputes ℓ_j and G_j of the others;
  - ``"full"``: all J states and no graph;
  - ``"checkpointed"``: ``B // state_bytes`` states and the optimal binomial schedule;

- ``None`` (or ``Memory()``): every state, no graph (the full tape): each step's ℓ_j and G_j
  are recomputed once, before its HVP;
- ``Memory(...)`` by hand: ``slots=`` (binomial checkpointing), ``every=`` (every k-th state),
  ``keep_graphs=True`` (every graph: the fastest, the memory of an autograd unroll's
  activations), and ``verify=True`` (check that recomputation reproduces the tape bit for bit).

This module holds the option only; the reverse machinery plans with it
(:mod:`gimli_bptt.reverse.plan`). The hypergradient is bit-identical whatever the plan (Note
[Bit-identical recomputation] in :mod:`gimli_bptt.reverse.tape`). The bytes of one state are
known before the tape runs (:func:`~gimli_bptt.reverse.plan.state_bytes`); those of one step's
graph are not: the tape measures step 0's with :class:`~gimli_bptt.reverse.meter.SavedGraphMeter`
and asks :func:`~gimli_bptt.reverse.plan.graphs_that_fit` how many steps' graphs to keep.

Note [The automatic budget]: at the start of each meta step, ``memory="auto"`` asks how much
memory is available now (:func:`gimli_bptt.memory_probe.available_memory`): on CUDA the
driver's free memory plus what PyTorch's caching allocator holds but does not use, for the
parameters' device; on the CPU the
kernel's ``MemAvailable``, or less when a cgroup (a container's limit) leaves less. It plans in
``AUTO_FRACTION`` of that (half: the rest is left for the batches, the activations of the step
being computed, the allocator's slack and everything else the process does); ``GIMLI_MEMORY_FRACTION``
or ``Memory(fraction=f)`` change the fraction. The plan then keeps the graphs of as many steps
as fit (the fastest), else every state, else binomial checkpointing, and never more than the
budget; a machine short of memory gets a checkpointed plan where an autograd unroll would run
out of memory. Distributed, every rank plans in the smallest budget of all ranks, agreed once
when the updater is built (Note [Agreeing on a budget] in
:func:`~gimli_bptt.reverse.plan.resolve_budget`), so that every rank keeps the same steps' graphs.
``last_tape_stats`` reports the budget and where it came from.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

#: The fraction of the available memory that ``memory="auto"`` plans in (Note [The automatic budget]).
AUTO_FRACTION = 0.5


@dataclass(frozen=True)
class Memory:
    """How much memory a hypergradient may use: the ``memory`` option of ``GimliUpdater``.

    Give at most one of ``budget``, ``fraction``, ``slots`` and ``every``; none keeps every state.

    Attributes:
        budget: Bytes the tape may hold: the J states (and, with ``hvp="fwd"``, G_j) and the
            gradient graphs kept from the forward pass (see the module docstring for the plans).
            It does not count the model, the optimizer, the batches, s_J, the working memory of
            the step being computed or the allocator's overhead: leave some room.
        fraction: A budget of this fraction (0 < f ≤ 1) of the memory available when each meta
            step starts (Note [The automatic budget]); ``memory="auto"`` is ``fraction=AUTO_FRACTION``.
        slots: Keep at most this many inner states; recompute the others with the optimal
            binomial schedule (Griewank & Walther's revolve). ``slots >= J`` stores everything.
        every: Keep every k-th state and recompute each segment from its start.
        keep_graphs: Keep every step's gradient graph from the forward pass, so the sweep runs
            only the HVPs (needs ``hvp="rev"``; not with a budget, slots or every).
        verify: Check that every recomputed state equals, bit for bit, the first forward pass's
            (a debug option: it hashes every state).
    """

    budget: Optional[int] = None
    slots: Optional[int] = None
    every: Optional[int] = None
    keep_graphs: bool = False
    verify: bool = False
    fraction: Optional[float] = None

    @classmethod
    def auto(cls, fraction: Optional[float] = None) -> "Memory":
        """``memory="auto"``: a budget of ``fraction`` (default: ``GIMLI_MEMORY_FRACTION`` or
        :data:`AUTO_FRACTION`) of the memory available at each meta step."""
        if fraction is None:
            env = os.environ.get("GIMLI_MEMORY_FRACTION", "").strip()
            try:
                fraction = float(env) if env else AUTO_FRACTION
            except ValueError:
                raise ValueError(f"GIMLI_MEMORY_FRACTION must be a number in (0, 1], got {env!r}") from None
        return cls(fraction=fraction).validate()

    def validate(self) -> "Memory":
        """Checks the fields; returns ``self``.

        Raises:
            TypeError: a field of the wrong type.
            ValueError: more than one of ``budget``, ``slots``, ``every``; ``keep_graphs`` with one
                of them; a value below 1.
        """
        given = [name for name in ("budget", "fraction", "slots", "every") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"Memory takes at most one of budget=, fraction=, slots= or every=, got {', '.join(given)}")
        if self.keep_graphs and given:
            raise ValueError(
                f"Memory(keep_graphs=True) keeps every step's graph and every state: it cannot be combined "
                f"with {given[0]}= (a budget keeps as many graphs as fit)"
            )
        for name in given:
            if name == "fraction":
                f = self.fraction
                if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < float(f) <= 1.0:
                    raise ValueError(f"Memory(fraction=...) must be a number in (0, 1], got {f!r}")
            else:
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, int):
                    raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
                if value < 1:
                    raise ValueError(f"{name} must be >= 1, got {value!r}")
        for name in ("keep_graphs", "verify"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Memory({name}=...) must be True or False, got {type(getattr(self, name)).__name__}")
        return self

    @property
    def needs_state_bytes(self) -> bool:
        """Whether planning needs the bytes of one state (a budget, or a recomputing schedule to report)."""
        return (self.budget is not None or self.fraction is not None or self.slots is not None
                or self.every is not None)

    @property
    def planned(self) -> bool:
        """Whether the plan is made from a budget (given, or a fraction of what is available)."""
        return self.budget is not None or self.fraction is not None


def as_memory(memory: Union[int, str, Memory, None]) -> Memory:
    """The :class:`Memory` policy of a ``memory=`` value (``"auto"``, bytes, a policy, or None for the full tape).

    Raises:
        TypeError: ``memory`` is not an int, ``"auto"``, a :class:`Memory` or None.
        ValueError: a value out of range.
    """
    if memory is None:
        return Memory()
    if isinstance(memory, str):
        if memory == "auto":
            return Memory.auto()
        raise ValueError(f"memory must be 'auto', a number of bytes, gimli_bptt.Memory(...) or None, got {memory!r}")
    if isinstance(memory, Memory):
        return memory.validate()
    if isinstance(memory, bool) or not isinstance(memory, int):
        raise TypeError(
            "memory must be 'auto', a number of bytes (an int), gimli_bptt.Memory(...) or None, "
            f"got {type(memory).__name__}"
        )
    if memory < 1:
        raise ValueError(f"memory must be at least 1 byte, got {memory}")
    return Memory(budget=memory)


__all__ = ["AUTO_FRACTION", "Memory", "as_memory"]
