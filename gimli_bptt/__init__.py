# SPDX-License-Identifier: Apache-2.0
"""gimli_bptt: exact hypergradients through unrolled PyTorch training loops.

Algorithm 1 of "Generalized Inner Loop Meta-Learning" (Grefenstette et al., 2019) with a
forward tape and a hand-written reverse sweep. Start with :class:`GimliUpdater`.
"""
from __future__ import annotations

from .errors import DistributedError, NonFiniteError
from .functional import FunctionalModel
from .optim import get_optimizer, register_optimizer, supported_optimizers, unregister_optimizer
from .checkpoint import Checkpointing
from .updater import GimliUpdater, MetaStepResult

__version__ = "0.1.0"

__all__ = [
    "Checkpointing",
    "DistributedError",
    "FunctionalModel",
    "GimliUpdater",
    "MetaStepResult",
    "NonFiniteError",
    "get_optimizer",
    "register_optimizer",
    "supported_optimizers",
    "unregister_optimizer",
]
