# SPDX-License-Identifier: Apache-2.0
"""gimli_bptt: exact hypergradients through unrolled PyTorch training loops.

Algorithm 1 of "Generalized Inner Loop Meta-Learning" (Grefenstette et al., 2019, arXiv:1910.01727),
with a forward tape and a hand-written reverse sweep. Start with :class:`GimliUpdater`.

Algorithm 1, the GIMLI update loop, as the paper states it (⟦x⟧ is the stop-gradient of x).
Require: current model parameters θ_t, meta-parameters φ_τ; the number of meta-parameter
updates I and the length of the unrolled inner loop J::

     1: for i = 0 to I - 1 do
     2:   Segment meta-parameters φ_i^opt, φ_i^loss <- split(φ_{τ+i})
     3:   Copy model state θ'_0 <- θ_t, optimizer state opt'_0 <- opt_t
     4:   for j = 0 to J - 1 do
     5:     Compute inner gradient G_j <- ∇_{θ'_j} ℓ^train_{t+j}(θ'_j, φ_i^loss) and retain gradient graph state
     6:     Update inner model θ'_{j+1} <- opt'_j(θ'_j, φ_i^opt, G_j)
     7:   end for
     8:   Initialize accumulators: A_i^opt <- zerosLike(φ_i^opt); A_i^loss <- zerosLike(φ_i^loss)
     9:   Compute B_J <- ∇_{θ'_j} L^val(θ'_j)
    10:   for j' = J - 1 to 0 do
    11:     Compute optimizer-gradient derivative O_{j'} <- ∇_{G_{j'}} opt'_{j'}(θ'_{j'}, φ_i^opt, G_{j'})
    12:     Update A_i^opt <- A_i^opt + B_{j'+1} · ∇_{φ_i^opt} opt'_{j'}(⟦θ'_{j'}⟧, φ_i^opt, ⟦G_{j'}⟧)
    13:            A_i^loss <- A_i^loss + B_{j'+1} · O_{j'} · ∇_{φ_i^loss} ∇_{θ'_{j'}} ℓ^train_{t+j'}(⟦θ'_{j'}⟧, φ_i^loss)
    14:            B_{j'} <- B_{j'+1} · ((∇_{θ_{j'}} opt'_{j'}(θ'_{j'}, φ_i^opt, ⟦G_{j'}⟧))
                                     + O_{j'} · (∇²_{θ'_{j'}} ℓ^train_{t+j'}(θ'_{j'}, φ_i^loss)))
    15:   end for
    16:   Update meta-parameters φ_{τ+i+1} <- metaopt(φ_{τ+i}, join(A_i^opt, A_i^loss))
    17: end for
    18: return Updated meta-parameters φ_{τ+I}

Line 9's gradient is taken at the end of the unroll, θ'_J (the paper's subscript j there is
the loop variable of lines 4-7 after its last step). With a stateful optimizer (momentum,
Adam's moments) opt'_j also carries its state σ_j, so lines 11-14 also propagate σ's
cotangent from step j'+1 to j' (:mod:`gimli_bptt.reverse.sweep`). Code cites these lines as
``[Alg.1 L<n>]``:

- L1, L17, L18: the user's loop of ``GimliUpdater.step`` calls (``updater.py``);
- L2: ``GimliUpdater._problem`` and :mod:`gimli_bptt.metaparams` (the split of φ);
- L3: ``GimliUpdater._initial_state`` (copies of θ, ``opt.state`` and the buffers);
- L4-L15 in reverse mode, put together: :func:`gimli_bptt.reverse.hypergradient.reverse_hypergradient`
  (the memory plan of :mod:`gimli_bptt.reverse.plan`, the tape, the sweep); in forward mode,
  :mod:`gimli_bptt.online` (the updater's forward/online half) with the math of :mod:`gimli_bptt.forward`;
- L4-L7: :mod:`gimli_bptt.reverse.tape` (L5: ``InnerProblem.step_gradient``; L6:
  ``InnerProblem.step``, that is ``stepping.step_all``); "retain gradient graph state" is what
  :mod:`gimli_bptt.reverse.plan` decides;
- L8-L15: :mod:`gimli_bptt.reverse.sweep` (L11-L12: ``InnerProblem.step_vjp``, the optimizer's
  hand-written VJP, which also gives the first term of L14 and, for stateful optimizers, the
  state's cotangent; L13 and the second term of L14: :mod:`gimli_bptt.hvp`);
- L16: ``GimliUpdater._apply``, a transaction (:mod:`gimli_bptt.transaction`).
"""
from __future__ import annotations

from .errors import DistributedError, NonFiniteError
from .functional import FunctionalModel
from .memory import Memory
from .metaparams import Hyperparameter
from .optim import get_optimizer, register_optimizer, supported_optimizers, unregister_optimizer
from .optim.declarations import Flag, StateEntry
from .result import MetaStepResult
from .reverse.meter import TapeStats
from .updater import GimliUpdater

__version__ = "0.1.0"

__all__ = [
    "DistributedError",
    "Flag",
    "FunctionalModel",
    "GimliUpdater",
    "Hyperparameter",
    "Memory",
    "MetaStepResult",
    "NonFiniteError",
    "StateEntry",
    "TapeStats",
    "get_optimizer",
    "register_optimizer",
    "supported_optimizers",
    "unregister_optimizer",
]
