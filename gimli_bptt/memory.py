# SPDX-License-Identifier: Apache-2.0
"""The one memory option: from ``memory=`` to the tape's schedule and the graphs it keeps ([Alg.1 L4]-[Alg.1 L7]).

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

The hypergradient is bit-identical whatever the plan (Note [Bit-identical recomputation] in
``tape.py``). The bytes of one state are known before the tape runs (:func:`state_bytes`);
those of one step's graph are not: the tape measures step 0's with :class:`SavedGraphMeter`
and asks :func:`graphs_that_fit` how many steps' graphs to keep.

Note [The automatic budget]: at the start of each meta step, ``memory="auto"`` asks how much
memory is available now (:func:`available_memory`): on CUDA the driver's free memory plus what
PyTorch's caching allocator holds but does not use, for the parameters' device; on the CPU the
kernel's ``MemAvailable``, or less when a cgroup (a container's limit) leaves less. It plans in
``AUTO_FRACTION`` of that (half: the rest is left for the batches, the activations of the step
being computed, the allocator's slack and everything else the process does); ``GIMLI_MEMORY_FRACTION``
or ``Memory(fraction=f)`` change the fraction. The plan then keeps the graphs of as many steps
as fit (the fastest), else every state, else binomial checkpointing, and never more than the
budget; a machine short of memory gets a checkpointed plan where an autograd unroll would run
out of memory. Distributed, every rank plans in the smallest budget of all ranks, agreed once
when the updater is built (Note [Agreeing on a budget] in :func:`resolve_budget`), so that every
rank keeps the same steps' graphs. ``last_tape_stats`` reports the budget and where it came from.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from .checkpoint import Op, _check_int, binomial_schedule, every_k_schedule, slots_for_budget, store_all_schedule

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
                _check_int(name, getattr(self, name), 1)
        for name in ("keep_graphs", "verify"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Memory({name}=...) must be True or False, got {type(getattr(self, name)).__name__}")
        return self

    def schedule(self, num_steps: int, state_bytes: int, budget: Optional[int] = None) -> list[Op]:
        """The checkpoint schedule of the states for ``num_steps`` inner steps of ``state_bytes`` each
        (``budget``: the resolved budget of a ``fraction``; default ``self.budget``)."""
        budget = self.budget if budget is None else budget
        if self.every is not None:
            return every_k_schedule(num_steps, self.every)
        if budget is not None:
            slots = slots_for_budget(budget, max(state_bytes, 1))
        elif self.slots is not None:
            slots = self.slots
        else:
            return store_all_schedule(num_steps)
        return store_all_schedule(num_steps) if slots >= num_steps else binomial_schedule(num_steps, slots)

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


# ---------------------------------------------------------------------------- planning
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
        hvp: ``"rev"``, ``"fwd"`` or ``"none"`` (first order): graphs are kept only for the
            reverse-over-reverse HVP.
        state_bytes: The bytes of one inner state (:func:`state_bytes`), needed when
            ``memory.needs_state_bytes``.
        budget: The budget of a ``Memory(fraction=...)`` policy, resolved for this meta step
            (:func:`resolve_budget`); default ``memory.budget``.

    Raises:
        ValueError: a budget below one state.
    """
    memory.validate()
    _check_int("num_steps", num_steps, 1)
    budget = memory.budget if budget is None else budget
    if memory.fraction is not None and budget is None:
        raise ValueError("Memory(fraction=...) plans in a budget resolved per meta step: pass budget=")
    if memory.keep_graphs:
        return TapePlan(store_all_schedule(num_steps), 0, None, None, memory.verify)
    if not memory.needs_state_bytes:
        return TapePlan(store_all_schedule(num_steps), None, None, None, memory.verify)
    assert state_bytes is not None, "a budget or a recomputing schedule needs the bytes of one state"
    _check_int("state_bytes", state_bytes, 1)
    schedule = memory.schedule(num_steps, state_bytes, budget)
    left = None
    if budget is not None and hvp == "rev":
        left = budget - num_steps * state_bytes
        left = left if left >= 0 else None
    return TapePlan(schedule, None, left, state_bytes, memory.verify, budget)


# Note [Reading the available memory cheaply]: memory="auto" reads /proc/meminfo and the
# cgroup's limit and usage at the start of every meta step. Opening three files costs about
# 0.3 ms on a 2-core machine, a tenth of a small problem's meta step, so each file is opened once
# per process and re-read in place with ``os.pread`` at offset 0 (procfs and cgroupfs files
# regenerate their contents on every read from the start, so the numbers are current). A file
# there that cannot be opened is remembered as absent; after a ``fork`` the child shares the
# descriptors, which ``pread`` (no shared file offset) reads safely. Paths elsewhere (tests'
# stand-ins) are opened and read at every call.
_FDS: dict[str, Optional[int]] = {}


def _read_text(path: str) -> Optional[str]:
    """The current contents of a small procfs/sysfs file (Note [Reading the available memory cheaply])."""
    if not path.startswith(("/proc/", "/sys/")):  # an ordinary file (tests): read it afresh
        try:
            with open(path) as fh:
                return fh.read()
        except OSError:
            return None
    fd = _FDS.get(path, -1)
    if fd == -1:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            fd = None
        _FDS[path] = fd
    if fd is None:
        return None
    try:
        chunks, offset = [], 0
        while True:
            chunk = os.pread(fd, 65536, offset)
            chunks.append(chunk)
            offset += len(chunk)
            if len(chunk) < 65536:
                break
        return b"".join(chunks).decode("ascii", "replace")
    except OSError:  # the file went away (or never allowed pread): read it the ordinary way
        _FDS.pop(path, None)
        try:
            os.close(fd)
        except OSError:
            pass
        try:
            with open(path) as fh:
                return fh.read()
        except OSError:
            return None


def _read_int(path: str) -> Optional[int]:
    text = _read_text(path)
    if text is None:
        return None
    text = text.strip()
    return int(text) if text.isdigit() else None


#: Where the CPU's available memory is read: the kernel's estimate, then cgroup v2 and v1 limits.
MEMINFO = "/proc/meminfo"
CGROUP_LIMITS = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def _cpu_available(meminfo: str = MEMINFO, cgroups: Sequence[tuple[str, str]] = CGROUP_LIMITS) -> tuple[int, str]:
    """The bytes this process may still allocate on the CPU, and where the number comes from."""
    available, source = None, ""
    text = _read_text(meminfo)
    if text is not None:
        at = text.find("MemAvailable:")
        if at >= 0:
            fields = text[at:].split(None, 2)
            if len(fields) >= 2 and fields[1].isdigit():
                available, source = int(fields[1]) * 1024, "MemAvailable"
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            source = "free pages"
        except (ValueError, OSError, AttributeError):
            available, source = 0, "unknown"
    for limit_path, usage_path in cgroups:
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and usage is not None and limit - usage < available:
            available, source = max(limit - usage, 0), "the cgroup's memory limit"
    return available, source


def available_memory(device: torch.device) -> tuple[int, str]:
    """``(bytes available now on device, what was read)`` (Note [The automatic budget])."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0)), f"cuda:{device.index or 0} free + cached"
    if device.type == "mps" and hasattr(torch, "mps"):
        total = int(torch.mps.recommended_max_memory())
        return max(total - int(torch.mps.driver_allocated_memory()), 0), "mps recommended maximum"
    return _cpu_available()


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
    """

    schedule: str
    forward_steps: int
    max_slots_used: int
    graphs_kept: int
    graph_bytes: Optional[int]
    state_bytes: Optional[int]
    budget: Optional[int]
    budget_source: Optional[str] = None


# ---------------------------------------------------------------------------- measuring a graph
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


__all__ = [
    "Memory",
    "SavedGraphMeter",
    "TapePlan",
    "AUTO_FRACTION",
    "TapeStats",
    "as_memory",
    "available_memory",
    "graphs_that_fit",
    "plan_tape",
    "resolve_budget",
    "state_bytes",
    "tensors_in",
]
