# SPDX-License-Identifier: Apache-2.0
"""MetaStepResult: what one meta step computed, in reverse or forward mode."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor

from .metaparams import Hypergrad


@dataclass
class MetaStepResult:
    """What one meta step computed.

    Attributes:
        val_loss: L_val(θ'_J), detached.
        hypergrads: The gradient of ``val_loss`` with respect to every meta-parameter: the
            learned hyperparameter names (``"lr"``, ``"beta1"``, ...; a tensor of shape
            ``(num_groups,)`` for ``"group"``, ``(num_params,)`` for ``"tensor"``, a list of
            tensors shaped like the inner parameters for ``"element"``), ``"loss.<name>"`` for
            each loss parameter and ``"init.<parameter name>"`` with ``learn_init``.
        train_losses: ℓ_j(θ'_j) of the J inner steps, shape ``(J,)``.
        skipped: True when a non-finite value made ``step()`` skip the update (``on_nonfinite="skip"``).
        nonfinite: What was not finite (hypergradient names, or the error's message).
        task_val_losses: With ``tasks=T``, each task's L_val, shape ``(T,)`` (``val_loss`` is their
            mean, and ``train_losses`` has shape ``(J, T)``); else None.
    """

    val_loss: Tensor
    hypergrads: dict[str, Hypergrad]
    train_losses: Tensor
    skipped: bool = False
    nonfinite: list[str] = field(default_factory=list)
    task_val_losses: Optional[Tensor] = None


__all__ = ["MetaStepResult"]
