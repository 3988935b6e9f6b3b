# SPDX-License-Identifier: Apache-2.0
"""Data-parallel meta-updates: the one all-reduce that Algorithm 1's per-rank quantities go through.

Under ``torch.distributed`` every rank holds its shard of each inner batch and of the
validation batch. Every quantity of Algorithm 1 that depends on a batch is linear in the
per-example losses, so the mean over ranks of the per-rank quantity is the full-batch one
(when each rank's loss is the mean over an equal-sized shard):

- G_j (line 5) and ℓ_j: averaged before the optimizer step, so θ'_{j+1} is identical on
  every rank, in the tape and in every recomputation;
- B_J = ∇_θ L_val and the direct term ∂L_val/∂φ_loss (line 9), and L_val;
- H_j·Ḡ_j and (∂G_j/∂φ_loss)ᵀ·Ḡ_j (lines 13, 14): Ḡ_j is identical on every rank, each rank
  multiplies it by the Hessian of its own loss, and the mean of those products is the
  Hessian of the mean loss times Ḡ_j.

Each call is one ``all_reduce`` (SUM, then a division by the world size) of a flat buffer per
dtype, with a presence flag per tensor (a gradient that is None on every rank stays None) and
a sequence tag that detects ranks that are out of step (one rank failed, was caught and
called again). A failed collective raises :class:`~gimli_bptt.errors.DistributedError`.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .errors import DistributedError

_TAG_PERIOD = 64  # (t, t²) with t ≤ 64 sum exactly in float32 over up to 4096 ranks


def resolve_process_group(process_group: Any) -> Optional[Any]:
    """The process group a :class:`~gimli_bptt.GimliUpdater` communicates over, or None.

    ``None``: the default group when ``torch.distributed`` is initialised with more than one
    rank, else no communication. ``False``: no communication. A ``ProcessGroup``: that group
    (no communication if it has a single rank).
    """
    if process_group is False:
        return None
    if process_group is True:
        raise TypeError("process_group must be None (the default group if initialised), False or a ProcessGroup")
    if not torch.distributed.is_available():
        if process_group is None:
            return None
        raise ValueError("process_group was given but this build of PyTorch has no torch.distributed")
    dist = torch.distributed
    if process_group is None:
        if not dist.is_initialized() or dist.get_world_size() <= 1:
            return None
        return dist.group.WORLD
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be None, False or a torch.distributed.ProcessGroup, got {type(process_group).__name__}"
        )
    if not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialised (call init_process_group)")
    return process_group if dist.get_world_size(process_group) > 1 else None


class Reducer:
    """All-reduces (mean) lists of tensors over a process group, one collective per call.

    Args:
        group: The process group (more than one rank).
        device: Where the collectives' buffers live when there is no tensor to take it from
            (the model's device: NCCL reduces CUDA tensors only).
    """

    def __init__(self, group: Any, device: torch.device | str = "cpu"):
        dist = torch.distributed
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.device = torch.device(device)
        self.calls = 0  # collectives in the current meta step (reset by :meth:`reset`)

    def reset(self) -> None:
        """Starts a new meta step: every rank's sequence tag restarts at 0."""
        self.calls = 0

    def _all_reduce(self, buf: Tensor, what: str, op: Any = None) -> None:
        dist = torch.distributed
        try:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM if op is None else op, group=self.group)
        except (RuntimeError, getattr(dist, "DistError", RuntimeError)) as exc:
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise DistributedError(
                f"all-reduce of {what} failed on rank {self.rank} of {self.world_size}: a peer rank raised, "
                "exited, or did not reach the same collective within the process group's timeout "
                "(init_process_group(timeout=...)); see the other ranks' errors for the cause. Nothing was "
                f"updated on this rank. ({type(exc).__name__}: {first})"
            ) from exc

    def minimum(self, value: int, what: str) -> int:
        """The smallest of the ranks' ``value`` (one MIN all-reduce), e.g. the memory every rank can spend.

        Raises:
            DistributedError: the collective failed or timed out.
        """
        self.calls += 1
        buf = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        self._all_reduce(buf, what, torch.distributed.ReduceOp.MIN)
        return int(buf.item())

    def mean(self, tensors: Sequence[Optional[Tensor]], like: Sequence[Tensor], what: str) -> list[Optional[Tensor]]:
        """The mean over ranks of each tensor; ``None`` counts as zeros shaped like ``like[i]``.

        An entry is None in the result only when it is None on every rank.

        Raises:
            DistributedError: the collective failed or timed out, or the ranks are out of step.
        """
        self.calls += 1
        tag = float(self.calls % _TAG_PERIOD + 1)
        present = [t is not None for t in tensors]
        values = [t if t is not None else torch.zeros_like(ref) for t, ref in zip(tensors, like)]
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, v in enumerate(values):
            by_dtype.setdefault(v.dtype, []).append(i)
        out: list[Optional[Tensor]] = [None] * len(values)
        flags: Optional[Tensor] = None
        for k, (dtype, idx) in enumerate(by_dtype.items()):
            device = values[idx[0]].device
            parts = [values[i].detach().reshape(-1) for i in idx]
            if k == 0:  # the header rides in the first buffer: presence flags and the tag
                header = [float(p) for p in present] + [tag, tag * tag]
                parts.append(torch.tensor(header, dtype=dtype, device=device))
            buf = torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device)
            self._all_reduce(buf, what)
            if k == 0:
                flags = buf[buf.numel() - len(header):]
            offset = 0
            for i in idx:
                n = values[i].numel()
                out[i] = (buf[offset:offset + n] / self.world_size).view_as(values[i])
                offset += n
        if flags is None:  # no tensors at all: still one collective for the tag
            flags = torch.tensor([tag, tag * tag], dtype=torch.float64, device=self.device)
            self._all_reduce(flags, what)
        reduced = flags.double().tolist()
        w = self.world_size
        if dtype_exact(flags.dtype) and (reduced[-2] != w * tag or reduced[-1] != w * tag * tag):
            raise DistributedError(
                f"ranks are out of step at the all-reduce of {what} (rank {self.rank} of {w}): another rank is at "
                "a different collective, usually because it raised earlier in this or the previous meta step and "
                "its caller went on; nothing was updated on this rank. Let every rank fail together (or rebuild "
                "the process group) instead of catching an error on one rank only"
            )
        return [None if not any_present else v for v, any_present in zip(out, (c > 0 for c in reduced[:-2]))]


def dtype_exact(dtype: torch.dtype) -> bool:
    """Whether small-integer sums are exact in ``dtype`` (the tag check needs float32 or wider)."""
    return dtype in (torch.float32, torch.float64)


def all_equal_across_ranks(tensors: Sequence[Tensor], group: Any) -> list[bool]:
    """For each tensor, whether it has the same value on every rank (one MAX all-reduce of ``[x, -x]``)."""
    if not tensors:
        return []
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
    buf = torch.cat([flat, -flat])
    dist = torch.distributed
    try:
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
    except RuntimeError as exc:
        raise DistributedError(
            f"checking that the replicas agree failed on rank {dist.get_rank(group)}: a peer rank raised, exited or "
            f"timed out ({str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__})"
        ) from exc
    n = flat.numel()
    hi, lo = buf[:n], -buf[n:]
    out, offset = [], 0
    for t in tensors:
        k = t.numel()
        out.append(bool(torch.equal(hi[offset:offset + k], lo[offset:offset + k])))
        offset += k
    return out


def agree(reducer: Reducer, ok: bool, like: Tensor) -> None:
    """Distributed [Alg.1 L16]: every rank commits its meta update only if every rank succeeded.

    One collective of a success flag (in ``like``'s dtype and device). Call it with ``ok=True``
    as the last act of a successful update, inside its transaction, or with ``ok=False`` from a
    rank that failed (its peers wait for it).

    Raises:
        DistributedError: ``ok`` and some other rank failed (so this rank rolls back too).
    """
    flag = torch.tensor(1.0 if ok else 0.0, dtype=like.dtype, device=like.device)
    (mean,) = reducer.mean([flag], [flag], "the success flags of the meta update (line 16)")
    assert mean is not None
    if ok and float(mean) != 1.0:
        raise DistributedError(
            f"another rank failed while applying the meta update (rank {reducer.rank} of "
            f"{reducer.world_size} succeeded); every rank rolled back: φ, the meta optimizer, the model "
            "and the optimizer are as before this step"
        )


def check_replicas(named: Sequence[tuple[str, Tensor]], group: Any) -> None:
    """Every rank must start from the same θ_0 and φ (as DDP makes sure at construction).

    Raises:
        ValueError: naming the tensors that differ, and how to make them agree.
    """
    same = all_equal_across_ranks([t for _, t in named], group)
    differ = [what for (what, _), ok in zip(named, same) if not ok]
    if differ:
        raise ValueError(
            f"the ranks hold different values of {', '.join(differ[:3])}{' and others' if len(differ) > 3 else ''}: "
            "every rank must start from the same model and meta-parameters; seed every rank alike or load "
            "rank 0's state_dict on every rank (e.g. torch.distributed.broadcast each tensor from rank 0) "
            "before building GimliUpdater"
        )


__all__ = ["Reducer", "agree", "all_equal_across_ranks", "check_replicas", "resolve_process_group"]
