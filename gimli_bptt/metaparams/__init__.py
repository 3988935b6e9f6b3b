# SPDX-License-Identifier: Apache-2.0
"""φ, the meta-parameters, in one place: φ_opt (the inner optimizer's learned hyperparameters), φ_loss (the loss
parameters) and θ_0 (``learn_init``).

- :mod:`.declaration`: :class:`Hyperparameter`, how an optimizer declares one of its float options as learnable
  (where a param group holds it, its valid range); the optimizers only declare, everything else is here.
- :mod:`.phi_opt`: the ``learn=`` option (:func:`parse_learn`) and :class:`OptimizerHyperparameters`, the learned
  values at group, tensor or element granularity, the accumulation of their cotangents ([Alg.1 L12]), projection
  into each declared range and write-back into ``param_groups``.
- :mod:`.named`: :class:`MetaParameters`, every leaf of φ by name ([Alg.1 L2]'s split), and the hypergradient
  container (:data:`Hypergrad`, ``{name: hypergradient}``: [Alg.1 L16]'s join).
"""
from __future__ import annotations

from .declaration import Hyperparameter
from .phi_opt import GRANULARITIES, OptimizerHyperparameters, parse_learn
from .named import Hypergrad, MetaParameters, flat_list

__all__ = ["GRANULARITIES", "Hypergrad", "Hyperparameter", "MetaParameters", "OptimizerHyperparameters", "flat_list",
           "parse_learn"]
