# SPDX-License-Identifier: Apache-2.0
"""The type aliases the engine's modules share, defined once.

``Grads`` are the per-tensor gradients g_t of [Alg.1 L6] (``None`` for a tensor the loss does
not reach); ``State`` and ``Hyper`` are the optimizer state s_t and the hyperparameter values of
one parameter tensor, as the optimizer step Ξ of [Alg.1 L7] takes them. This module imports
nothing of the package, so every layer may import it.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from torch import Tensor

__all__ = ["Grads", "Hyper", "HyperValue", "State"]

#: The gradients of the inner loss, one per parameter tensor (``None`` where it does not reach).
Grads = Sequence[Optional[Tensor]]
#: A hyperparameter value for one parameter tensor: a Python float (fixed), a 0-d tensor
#: (learned per group or per tensor) or a tensor shaped like the parameter (learned per element).
HyperValue = Any
#: The hyperparameters of one parameter tensor: float values and flags by name.
Hyper = Mapping[str, Any]
#: The optimizer state of one parameter tensor, as a plain dict (``torch.optim`` naming).
State = dict[str, Any]
