# SPDX-License-Identifier: Apache-2.0
"""Fake (meta) kernels of the ``torch.ops.gimli`` ops: the shapes and dtypes of their outputs, for torch.compile.

Note [Fake kernels]: torch.compile, ``torch.export`` and FakeTensor run an op on tensors that
have shapes but no data; for a compiled op that takes a fake kernel, which returns empty outputs
of the right shape, dtype and device. One per op, registered with ``torch.library.register_fake``
by :func:`register` once the library is loaded (``torch.library`` needs the op to exist). The C++
schemas name this module (``m.set_python_module`` in ``csrc/gimli.cpp``), as torch requires of
ops defined in C++ whose fake kernel is registered from Python. Each output is as the CPU and
CUDA bindings and the pure twin (:mod:`._reference`) allocate it:

- the element-wise outputs (θ, G, each state entry and their cotangents) are like ``theta``;
- an output that does not exist (no momentum buffer, no amsgrad maximum) is empty, ``(0,)``;
- per hyperparameter slot of a VJP: empty when the slot is not in ``learned``, like ``theta``
  when it is element-wise, else one float64 sum per segment, ``(nseg,)``, ``nseg`` being
  ``offsets.numel() - 1``.

``tests/test_kernels.py`` runs ``torch.library.opcheck`` over every op, which holds these
against the compiled ops. This module imports nothing from the package.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

#: Hyperparameter slots per op family (``kSgdNumHyper``, ``kAdamNumHyper`` in optim_math.h).
SGD_SLOTS = 4
ADAM_SLOTS = 5

_lock = threading.Lock()
_registered = False


def _like(theta: Tensor) -> Tensor:
    return theta.new_empty(theta.shape)


def _none(theta: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return theta.new_empty((0,), dtype=theta.dtype if dtype is None else dtype)


def _hyper_bar(theta: Tensor, offsets: Tensor, slots: int, elementwise: int, learned: int) -> list[Tensor]:
    nseg = offsets.shape[0] - 1
    return [_none(theta, torch.float64) if not learned >> h & 1 else
            _like(theta) if elementwise >> h & 1 else theta.new_empty((nseg,), dtype=torch.float64)
            for h in range(slots)]


def sgd_step(theta: Tensor, G: Tensor, buf: Optional[Tensor], offsets: Tensor, hyper: Sequence[Tensor],
             elementwise: int, nesterov: bool, maximize: bool, use_momentum: bool,
             has_wd: bool) -> tuple[Tensor, Tensor]:
    """``(theta_next, buf_next)``: ``buf_next`` empty without momentum."""
    return _like(theta), _like(theta) if use_momentum else _none(theta)


def sgd_step_vjp(theta: Tensor, G: Tensor, buf: Optional[Tensor], theta_next_bar: Tensor,
                 buf_next_bar: Optional[Tensor], offsets: Tensor, hyper: Sequence[Tensor], elementwise: int,
                 learned: int, nesterov: bool, maximize: bool, use_momentum: bool,
                 has_wd: bool) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """``(theta_bar, G_bar, buf_bar, hyper_bar)``: ``buf_bar`` empty unless momentum and a buffer."""
    buf_bar = _like(theta) if use_momentum and buf is not None else _none(theta)
    return _like(theta), _like(theta), buf_bar, _hyper_bar(theta, offsets, SGD_SLOTS, elementwise, learned)


def adam_step(theta: Tensor, G: Tensor, m: Tensor, v: Tensor, vmax: Optional[Tensor], offsets: Tensor,
              hyper: Sequence[Tensor], elementwise: int, step: float, amsgrad: bool, maximize: bool,
              decoupled: bool, has_wd: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(theta_next, m_next, v_next, vmax_next)``: ``vmax_next`` empty without amsgrad."""
    return _like(theta), _like(theta), _like(theta), _like(theta) if amsgrad else _none(theta)


def adam_step_vjp(theta: Tensor, G: Tensor, m: Tensor, v: Tensor, vmax: Optional[Tensor], theta_next_bar: Tensor,
                  m_next_bar: Optional[Tensor], v_next_bar: Optional[Tensor], vmax_next_bar: Optional[Tensor],
                  offsets: Tensor, hyper: Sequence[Tensor], elementwise: int, learned: int, step: float,
                  amsgrad: bool, maximize: bool, decoupled: bool,
                  has_wd: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    """``(theta_bar, G_bar, m_bar, v_bar, vmax_bar, hyper_bar)``: ``vmax_bar`` empty without amsgrad."""
    vmax_bar = _like(theta) if amsgrad else _none(theta)
    return (_like(theta), _like(theta), _like(theta), _like(theta), vmax_bar,
            _hyper_bar(theta, offsets, ADAM_SLOTS, elementwise, learned))


FAKES: dict[str, Callable[..., Any]] = {"sgd_step": sgd_step, "sgd_step_vjp": sgd_step_vjp, "adam_step": adam_step, "adam_step_vjp": adam_step_vjp}


def register() -> None:
    """Registers the fake kernel of every op, once per process (the ops must be loaded)."""
    global _registered
    if _registered:
        return
    with _lock:
        if not _registered:
            for name, fake in FAKES.items():
                torch.library.register_fake(f"gimli::{name}", fake)
            _registered = True


__all__ = ["FAKES", "register"]
