# SPDX-License-Identifier: Apache-2.0
"""The memory plan of one meta step's tape ([Alg.1 L4]-[Alg.1 L7]): the budget, the sizes, the schedule.

From the ``memory=`` option (:class:`~gimli_bptt.memory.Memory`) and this meta step's budget
(:func:`resolve_budget`: given, or a fraction of what :mod:`gimli_bptt.memory_probe` reads),
:func:`plan_tape` tells the tape, before it runs, which checkpoint schedule of the states to
execute (:mod:`gimli_bptt.reverse.schedules`) and how many bytes are left for gradient graphs;
the tape measures step 0's graph (:mod:`gimli_bptt.reverse.meter`) and asks
:func:`graphs_that_fit` how many to keep. The sizes: :func:`state_bytes` (one inner state) and
:func:`slots_for_budget` (the states a budget holds). The plan never runs a step: the tape
executes it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ..memory import Memory
from ..memory_probe import available_memory
from .schedules import Op, binomial_schedule, check_int, every_k_schedule, store_all_schedule


@dataclass(frozen=True)
class TapePlan:
    """What the tape of one meta step is told before it runs.

    Attributes:
        schedule: The checkpoint schedule of the states.
        keep_graphs_from: The first step whose graph is kept (0: every one), or None: none, or
            decided by ``graph_bytes_left``.
        graph_bytes_left: The budget left for graphs once the J states are counted: the tape
            measures step 0's graph and keeps the last steps' graphs that fit; None: no budget
            for graphs.
        state_bytes: The bytes of one inner state as the plan counts them (None when not needed).
        verify: Check recomputed states bit for bit.
        budget: The budget planned in, or None.
    """

    schedule: list[Op]
    keep_graphs_from: Optional[int]
    graph_bytes_left: Optional[int]
    state_bytes: Optional[int]
    verify: bool
    budget: Optional[int] = None

    @property
    def recomputed_steps(self) -> int:
        """The forward steps the schedule runs beyond the first pass's J."""
        advanced = sum(op.to - op.step for op in self.schedule if op.kind == "advance")
        return advanced - max((op.to for op in self.schedule if op.kind == "advance"), default=0)


def plan_tape(memory: Memory, num_steps: int, hvp: str, state_bytes: Optional[int],
              budget: Optional[int] = None) -> TapePlan:
    """Plans the tape of ``num_steps`` inner steps under ``memory`` ([Alg.1 L4]-[Alg.1 L7]).

    Args:
        memory: The policy.
        num_steps: J.
        hvp: ``"rev"``, ``"fwd"`` or ``"none"`` (first order, or compiled steps, which recompute
            every step's graph inside the compiled reverse step): graphs are kept only for the
            eager reverse-over-reverse HVP.
        state_bytes: The bytes of one inner state (:func:`state_bytes`), needed when
            ``memory.needs_state_bytes``.
        budget: The budget of a ``Memory(fraction=...)`` policy, resolved for this meta step
            (:func:`resolve_budget`); default ``memory.budget``.

    Raises:
        ValueError: a budget below one state.
    """
    memory.validate()
    check_int("num_steps", num_steps, 1)
    budget = memory.budget if budget is None else budget
    if memory.fraction is not None and budget is None:
        raise ValueError("Memory(fraction=...) plans in a budget resolved per meta step: pass budget=")
    if memory.keep_graphs:
        return TapePlan(store_all_schedule(num_steps), 0, None, None, memory.verify)
    if not memory.needs_state_bytes:
        return TapePlan(store_all_schedule(num_steps), None, None, None, memory.verify)
    assert state_bytes is not None, "a budget or a recomputing schedule needs the bytes of one state"
    check_int("state_bytes", state_bytes, 1)
    schedule = state_schedule(memory, num_steps, state_bytes, budget)
    left = None
    if budget is not None and hvp == "rev":
        left = budget - num_steps * state_bytes
        left = left if left >= 0 else None
    return TapePlan(schedule, None, left, state_bytes, memory.verify, budget)


def state_schedule(memory: Memory, num_steps: int, state_bytes: int, budget: Optional[int] = None) -> list[Op]:
    """The checkpoint schedule of the states for ``num_steps`` inner steps of ``state_bytes`` each
    under ``memory`` (``budget``: the resolved budget of a ``fraction``; default ``memory.budget``)."""
    budget = memory.budget if budget is None else budget
    if memory.every is not None:
        return every_k_schedule(num_steps, memory.every)
    if budget is not None:
        slots = slots_for_budget(budget, max(state_bytes, 1))
    elif memory.slots is not None:
        slots = memory.slots
    else:
        return store_all_schedule(num_steps)
    return store_all_schedule(num_steps) if slots >= num_steps else binomial_schedule(num_steps, slots)


def slots_for_budget(budget_bytes: int, state_bytes: int) -> int:
    """Returns how many checkpoint slots a memory budget allows: ``budget_bytes // state_bytes``.

    Args:
        budget_bytes: Memory available for checkpoints, in bytes (``>= 0``).
        state_bytes: Size of one inner state, in bytes (``>= 1``).

    Returns:
        The number of slots (``>= 1``).

    Raises:
        TypeError: If an argument is not an ``int``.
        ValueError: If an argument is out of range or the budget allows no slot at all.
    """
    check_int("budget_bytes", budget_bytes, 0)
    check_int("state_bytes", state_bytes, 1)
    slots = budget_bytes // state_bytes
    if slots < 1:
        raise ValueError(
            f"budget_bytes={budget_bytes} allows no checkpoint slot for state_bytes={state_bytes}; "
            f"at least {state_bytes} bytes are needed (s_0 alone takes one slot)"
        )
    return slots


def resolve_budget(memory: Memory, device: torch.device, reducer: Any = None) -> tuple[Optional[int], Optional[str]]:
    """The budget and where it came from: ``memory.budget``, or ``memory.fraction`` of
    :func:`available_memory` (with a ``reducer``: the smallest over the ranks, one collective).

    Note [Agreeing on a budget]: every rank must plan the same tape (a kept graph skips a
    collective, a checkpointed schedule adds some), so distributed the budget is the smallest of
    the ranks'. That agreement is one collective, and it is made once, when the updater is built
    (as the replica check): a collective of another size at the start of every meta step would
    meet a peer's pending gradient collective when a rank fails mid-step and its caller goes on,
    which the process group cannot survive (gloo aborts on mismatched sizes), whereas the
    gradient collectives' own tags detect that case.
    """
    if memory.fraction is None:
        return memory.budget, None if memory.budget is None else "given"
    available, source = available_memory(device)
    budget = max(int(memory.fraction * available), 1)
    if reducer is not None:
        budget = reducer.minimum(budget, "the memory budget (memory='auto')")
        source += ", the smallest over the ranks, when the updater was built"
    return budget, f"{memory.fraction:g} of {available / 2**20:,.0f} MiB available ({source})"


def state_bytes(impl: Any, theta: Sequence[Tensor], buffers: Mapping[str, Tensor], hyper: Sequence[Mapping[str, Any]],
                keep_G: bool) -> int:
    """Bytes of one inner state once the optimizer state exists (after the first step).

    s_0 may lack state (a fresh SGD has no momentum buffer yet), so each parameter counts as
    many copies as a trial step of ``impl`` on a one-element tensor leaves state tensors (an
    upper bound for state that is smaller than the parameter, such as Adafactor's factored
    moments), plus one for θ and one for G_j when it is kept (``keep_G``, the
    forward-over-reverse HVP). The trial runs once per distinct set of options.

    Args:
        impl: The inner optimizer's :class:`~gimli_bptt.optim.base.DiffOptimizer`.
        theta: The inner parameters.
        buffers: The module's buffers (stored with every state).
        hyper: Per inner parameter, its hyperparameters.
        keep_G: G_j is stored with each state.
    """
    total = sum(b.numel() * b.element_size() for b in buffers.values())
    trials: dict[tuple, int] = {}
    for p, h in zip(theta, hyper):
        key = (p.dtype, p.device, p.dim() >= 2, tuple(sorted((k, repr(v)) for k, v in h.items() if not isinstance(v, Tensor))))
        if key not in trials:
            probe = torch.zeros((1, 1) if p.dim() >= 2 else (1,), dtype=p.dtype, device=p.device)
            trial = {k: (v.reshape(-1)[:1].reshape(()) if isinstance(v, Tensor) and v.dim() else v) for k, v in h.items()}
            _, st = impl.step(probe, probe, impl.import_state({}, probe, trial), trial)
            trials[key] = sum(isinstance(v, Tensor) for v in st.values())
        total += (1 + trials[key] + (1 if keep_G else 0)) * p.numel() * p.element_size()
    return total


def graphs_that_fit(bytes_left: int, num_steps: int, graph_bytes: int) -> int:
    """Returns k, the number of steps whose graphs of G_j [Alg.1 L5] fit: ``min(J, bytes_left // graph_bytes)``.

    Args:
        bytes_left: The budget left once the J states are counted (``>= 0``).
        num_steps: Number of inner steps ``J`` (``>= 1``).
        graph_bytes: Bytes of one step's graph, as
            :class:`~gimli_bptt.reverse.meter.SavedGraphMeter` measured them (``>= 1``).

    Returns:
        ``k`` with ``0 <= k <= J``; the tape keeps the graphs of steps ``J - k .. J - 1``.

    Raises:
        TypeError: If an argument is not an ``int``.
        ValueError: If an argument is out of range.
    """
    check_int("bytes_left", bytes_left, 0)
    check_int("num_steps", num_steps, 1)
    check_int("graph_bytes", graph_bytes, 1)
    return min(num_steps, bytes_left // graph_bytes)


__all__ = ["TapePlan", "graphs_that_fit", "plan_tape", "resolve_budget", "slots_for_budget", "state_bytes",
           "state_schedule"]
