# SPDX-License-Identifier: Apache-2.0
"""The first use of the fused ops on a device runs each op once against its pure twin; a mismatch warns and falls back.

Note [Kernel self-check]: a compiled kernel that is wrong on some machine (a launch or indexing
bug on a GPU CI never ran, a miscompile) would give users a wrong hypergradient without a
sound. So the first time a process asks for the fused ops on a device (``cpu``, ``cuda:0``, ...;
:func:`gimli_bptt.kernels.is_available`, which every dispatch goes through), each op runs once
on a small input and is compared with its pure-PyTorch twin (:mod:`._reference`, the spec):

- the inputs: 7 segments of 1 to 4099 elements (4278 in all: odd sizes and offsets for the
  vector loads' tails, a sum across the 4096-element reduction chunk), in float32 and float64,
  each op under two sets of flags: per-segment hyperparameters, all learned, every state and
  cotangent present (the static loops), and one hyperparameter element-wise with a missing
  cotangent and the other flags flipped (the generic loops). They come from a private
  generator: the global RNG is left alone.
- the tolerance (:func:`_tolerance`): each output may differ from the twin's by
  ``64 eps`` (``eps`` of the element dtype) of its scale, the scale being ``|twin| + max|twin|``
  for an element-wise output and, for a per-segment hyperparameter sum, the sum of the
  magnitudes of its terms (the twin's element-wise partials). An element-wise output is a chain
  of at most ~20 roundings whose coefficients are formed in double (Note [One source of truth]),
  and a sum differs only in its order, so a correct kernel stays orders of magnitude inside
  this on any CPU or GPU (on the CPU they agree to the bit element-wise), while an indexing or
  launch bug is off by the scale itself.
- on a mismatch (or an error raised by the op) it warns once, a ``RuntimeWarning`` naming the
  ops, the device and the largest error against its tolerance, and from then on
  ``is_available`` says no for that device, so ``kernels="auto"`` runs the pure twin there and
  ``kernels="fused"`` raises, saying why.
- ``GIMLI_KERNEL_SELFCHECK=0`` skips it.

Cost, once per process and device, measured on the CPU (torch 2.13.0, a 2-core machine shared
with other jobs; ``selfcheck.reset()`` then ``passed(cpu)``, 10 times in one process): 27 ms
median at a load average of 1.2, about 50 ms at 3-9; the 16 fused calls are ~3 ms of it, the
rest is the twin and the comparison.
The check runs outside ``torch.compile`` (``torch.compiler.disable``) and without autograd.
"""
from __future__ import annotations

import itertools
import os
import threading
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from . import _reference

#: Segment sizes of the check's input (Note [Kernel self-check]).
SIZES = (1, 3, 7, 33, 130, 4099, 5)
#: The tolerance in units of the element dtype's eps, of each output's scale.
TOLERANCE_EPS = 64.0

_lock = threading.Lock()
#: Per device (``(type, index)``): None when the check passed or was skipped, else why it failed.
_results: dict[tuple[str, Optional[int]], Optional[str]] = {}


def enabled() -> bool:
    """Whether the self-check runs (``GIMLI_KERNEL_SELFCHECK=0`` skips it)."""
    return os.environ.get("GIMLI_KERNEL_SELFCHECK", "").strip() not in ("0", "false", "False")


def _key(device: torch.device) -> tuple[str, Optional[int]]:
    if device.type == "cuda" and device.index is None:
        return ("cuda", torch.cuda.current_device())
    return (device.type, device.index)


def passed(device: torch.device) -> bool:
    """Whether the fused ops may run on ``device``: the self-check ran there once and passed (or is skipped)."""
    key = _key(device)
    try:
        return _results[key] is None
    except KeyError:
        pass
    with _lock:
        if key not in _results:
            where = torch.device(key[0]) if key[1] is None else torch.device(key[0], key[1])
            _results[key] = _check(where) if enabled() else None
    return _results[key] is None


def failure(device: torch.device) -> Optional[str]:
    """Why the self-check failed on ``device``, or None (passed, skipped or not run)."""
    return _results.get(_key(device))


def reset() -> None:
    """Forgets every result: the next use checks again (for tests)."""
    with _lock:
        _results.clear()


# ------------------------------------------------------------------------------- inputs
def _offsets(device: torch.device) -> Tensor:
    return torch.tensor([0, *itertools.accumulate(SIZES)], dtype=torch.int64, device=device)


def _cases(dtype: torch.dtype, device: torch.device) -> list[tuple[str, list[Any], int, int]]:
    """``(op, args, index of hyper, learned)`` for every op under both sets of flags (Note [Kernel self-check])."""
    gen = torch.Generator().manual_seed(20240607)
    n, nseg = sum(SIZES), len(SIZES)
    offsets = _offsets(device)

    def rand(scale: float = 1.0, positive: bool = False) -> Tensor:
        x = scale * torch.randn(n, generator=gen, dtype=torch.float64)
        return (x.abs() if positive else x).to(dtype).to(device)

    def hyper(ranges: Sequence[tuple[float, float]], elementwise: int) -> list[Tensor]:
        return [(lo + (hi - lo) * torch.rand(n if elementwise >> h & 1 else nseg, generator=gen,
                                             dtype=torch.float64)).to(device) for h, (lo, hi) in enumerate(ranges)]

    sgd_ranges = [(0.01, 0.2), (0.5, 0.95), (0.0, 0.5), (0.0, 0.1)]
    adam_ranges = [(1e-3, 1e-2), (0.8, 0.95), (0.9, 0.999), (1e-8, 1e-3), (0.0, 0.1)]
    cases: list[tuple[str, list[Any], int, int]] = []
    # (elementwise, learned, first flag set?): the static loops, then the generic ones
    for elementwise, learned, static in ((0, 0b1111, True), (0b1, 0b1011, False)):
        theta, G, buf, tb, bb = rand(), rand(), rand(), rand(), rand()
        h = hyper(sgd_ranges, elementwise)
        flags = [False, False, True, True] if static else [True, True, True, True]  # nesterov, maximize, momentum, wd
        cases.append(("sgd_step", [theta, G, buf, offsets, h, elementwise, *flags], 4, 0))
        cases.append(("sgd_step_vjp", [theta, G, buf, tb, bb if static else None, offsets, h, elementwise, learned,
                                       *flags], 6, learned))
    for elementwise, learned, static in ((0, 0b11111, True), (0b1, 0b10111, False)):
        theta, G, m, tb, cm, cv, cx = rand(), rand(), rand(), rand(), rand(), rand(), rand()
        v, vmax = rand(0.5, positive=True), rand(0.5, positive=True)
        h = hyper(adam_ranges, elementwise)
        # amsgrad, maximize, decoupled, has_wd
        flags = [False, False, False, True] if static else [True, True, True, True]
        step = 3.0
        cases.append(("adam_step", [theta, G, m, v, vmax if flags[0] else None, offsets, h, elementwise, step, *flags],
                      6, 0))
        cases.append(("adam_step_vjp", [theta, G, m, v, vmax if flags[0] else None, tb, cm, cv,
                                        cx if static else None, offsets, h, elementwise, learned, step, *flags],
                      10, learned))
    return cases


# ---------------------------------------------------------------------------- comparison
def _tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE_EPS * torch.finfo(dtype).eps


def _term_scales(op: str, args: list[Any], hyper_index: int, learned: int) -> list[Optional[Tensor]]:
    """Per learned per-segment slot: the sum over each segment of the magnitudes of its terms
    (the twin run with every slot element-wise gives the terms)."""
    args = list(args)
    elementwise = args[hyper_index + 1]
    counts = _offsets(args[0].device).diff()
    args[hyper_index] = [h if elementwise >> k & 1 else torch.repeat_interleave(h, counts)
                         for k, h in enumerate(args[hyper_index])]
    args[hyper_index + 1] = (1 << len(args[hyper_index])) - 1
    parts = getattr(_reference, op)(*args)[-1]
    offsets = _offsets(args[0].device)
    return [_reference._segment_sum(p.abs(), offsets) if learned >> k & 1 and not elementwise >> k & 1 else None
            for k, p in enumerate(parts)]


def _worst(fused: Tensor, twin: Tensor, scale: Tensor, tol: float) -> tuple[float, float]:
    """The largest error and its ratio to the tolerance (inf where shapes, dtypes or NaNs differ)."""
    if fused.shape != twin.shape or fused.dtype != twin.dtype:
        return float("inf"), float("inf")
    if fused.numel() == 0:
        return 0.0, 0.0
    a, b = fused.double(), twin.double()
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return float("nan"), float("inf")
    err = (torch.nan_to_num(a) - torch.nan_to_num(b)).abs()
    bound = tol * scale.double() + torch.finfo(torch.float64).tiny
    return float(err.max()), float((err / bound).max())


def _compare(op: str, args: list[Any], hyper_index: int, learned: int,
             run: Callable[..., Any]) -> tuple[float, float]:
    """Runs the fused op and its twin on ``args``; the largest error over all outputs and its ratio to the tolerance."""
    fused, twin = run(*args), getattr(_reference, op)(*args)
    tol = _tolerance(args[0].dtype)
    worst = (0.0, 0.0)
    sums: Optional[list[Optional[Tensor]]] = None
    for a, b in zip(fused, twin):
        if not isinstance(b, (list, tuple)):
            worst = max(worst, _worst(a, b, b.abs() + (b.abs().max() if b.numel() else 0.0), tol), key=lambda w: w[1])
            continue
        if len(a) != len(b):  # hyper_bar (the last output)
            return float("inf"), float("inf")
        for h, (x, y) in enumerate(zip(a, b)):
            if not (learned >> h & 1 and not args[hyper_index + 1] >> h & 1):
                worst = max(worst, _worst(x, y, y.abs() + (y.abs().max() if y.numel() else 0.0), tol),
                            key=lambda w: w[1])
                continue
            # a per-segment sum: within tol of |sum| passes (|sum| <= the sum of the magnitudes of its
            # terms); else the terms, from the twin run element-wise (a few ms), give the scale
            found = _worst(x, y, y.abs(), tol)
            if found[1] > 1.0 and x.shape == y.shape:
                sums = _term_scales(op, args, hyper_index, learned) if sums is None else sums
                found = _worst(x, y, sums[h], tol)  # type: ignore[arg-type]
            worst = max(worst, found, key=lambda w: w[1])
    return worst


@torch.compiler.disable
def _check(device: torch.device) -> Optional[str]:
    """Every op against its twin on ``device``; warns once and returns why on a mismatch, else None."""
    bad: list[str] = []
    with torch.no_grad():
        for dtype in (torch.float64, torch.float32):
            for op, args, hyper_index, learned in _cases(dtype, device):
                try:
                    err, ratio = _compare(op, args, hyper_index, learned, getattr(torch.ops.gimli, op))
                except Exception as e:  # noqa: BLE001 - an op that raises on valid input is as wrong as one that errs
                    bad.append(f"{op} ({dtype}) raised {type(e).__name__}: {str(e).strip().splitlines()[0]}")
                    continue
                if not ratio <= 1.0:
                    bad.append(f"{op} ({dtype}) is off by {err:.3g}, {ratio:.3g} times the tolerance of "
                               f"{TOLERANCE_EPS:g} eps of the output's scale")
    if not bad:
        return None
    why = f"the self-check of the fused kernels failed on {device}: " + "; ".join(bad)
    warnings.warn(f"gimli_bptt: {why}. The pure-PyTorch path runs on {device} from now on; please report this "
                  "(GIMLI_KERNEL_SELFCHECK=0 skips the check).", RuntimeWarning, stacklevel=2)
    return why


__all__ = ["SIZES", "TOLERANCE_EPS", "enabled", "failure", "passed", "reset"]
