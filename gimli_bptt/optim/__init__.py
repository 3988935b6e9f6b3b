# SPDX-License-Identifier: Apache-2.0
"""Differentiable optimizers, and the registry from ``torch.optim`` classes to them."""
from __future__ import annotations

import torch

from .adam import ADAM, ADAMW, adam_step, adam_step_vjp
from .base import DiffOptimizer, Hyper, State, step_all
from .sgd import SGD, sgd_step, sgd_step_vjp

_REGISTRY: dict[type, DiffOptimizer] = {}


def _register(impl: DiffOptimizer) -> None:
    _REGISTRY[impl.torch_cls] = impl


for _impl in (SGD, ADAM, ADAMW):
    _register(_impl)


def supported_optimizers() -> list[str]:
    """Names of the ``torch.optim`` classes that have a differentiable implementation."""
    return sorted(impl.name for impl in _REGISTRY.values())


def get_optimizer(opt: torch.optim.Optimizer | type) -> DiffOptimizer:
    """The differentiable implementation of an optimizer instance or class.

    Looks up the exact class first, then its bases (so a subclass that does not change the
    update is accepted).

    Raises:
        TypeError: if neither the class nor a base has an implementation.
    """
    cls = opt if isinstance(opt, type) else type(opt)
    for base in cls.__mro__:
        if base in _REGISTRY:
            return _REGISTRY[base]
    raise TypeError(
        f"gimli_bptt has no differentiable version of {cls.__module__}.{cls.__qualname__}; "
        f"supported optimizers: {', '.join(supported_optimizers())}. "
        "Use one of these as the inner optimizer."
    )


__all__ = [
    "ADAM",
    "ADAMW",
    "SGD",
    "DiffOptimizer",
    "Hyper",
    "State",
    "adam_step",
    "adam_step_vjp",
    "get_optimizer",
    "sgd_step",
    "sgd_step_vjp",
    "step_all",
    "supported_optimizers",
]
