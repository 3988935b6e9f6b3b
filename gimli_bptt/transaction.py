# SPDX-License-Identifier: Apache-2.0
"""All-or-nothing updates of the meta-parameters, the meta optimizer and (optionally) the model and its optimizer.

A failed ``step()`` or ``load_state_dict()`` changes nothing: both run their writes inside one
:class:`Transaction`, which saves what they may write first and puts it back on any exception
(``KeyboardInterrupt`` included) before re-raising.
"""
from __future__ import annotations

import copy
from types import TracebackType
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .metaparams import OptimizerHyperparameters


class Transaction:
    """Saves φ (values and ``.grad``), the meta optimizer's state, the inner optimizer's param
    groups and φ_opt's fixed values, and with ``model`` also the model's and the inner
    optimizer's ``state_dict``; restores all of it if the body raises.

    Args:
        leaves: The meta-parameters.
        meta_opt: The meta optimizer.
        opt: The inner optimizer (its param groups hold the group-level learned values).
        phi_opt: The learned hyperparameters (their fixed per-tensor values are rewritten with the groups).
        model: Also save and restore the model and ``opt.state`` (``commit=True``).
        on_failure: Called with no argument after the restore, before the exception propagates
            (distributed: tell the other ranks).

    Example::

        with Transaction(leaves, meta_opt, opt, phi_opt):
            meta_opt.step()
            phi_opt.write_back(opt.param_groups)
    """

    def __init__(self, leaves: Sequence[Tensor], meta_opt: torch.optim.Optimizer, opt: torch.optim.Optimizer,
                 phi_opt: OptimizerHyperparameters, model: Optional[nn.Module] = None,
                 on_failure: Optional[Callable[[], None]] = None):
        self.leaves = list(leaves)
        self.meta_opt = meta_opt
        self.opt = opt
        self.phi_opt = phi_opt
        self.model = model
        self.on_failure = on_failure

    def __enter__(self) -> "Transaction":
        self._values = [t.detach().clone() for t in self.leaves]
        self._grads = [None if t.grad is None else t.grad.clone() for t in self.leaves]
        self._meta = copy.deepcopy(self.meta_opt.state_dict())
        self._groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
        self._fixed = copy.deepcopy(self.phi_opt.fixed)
        self._model: Any = None
        if self.model is not None:
            self._model = (copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.opt.state_dict()))
        return self

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        """Restores everything saved if the body raised; the exception propagates either way."""
        if exc_type is None:
            return
        with torch.no_grad():
            for t, v, g in zip(self.leaves, self._values, self._grads):
                t.copy_(v)
                t.grad = g
        self.meta_opt.load_state_dict(self._meta)
        for group, saved in zip(self.opt.param_groups, self._groups):
            group.update(saved)
        self.phi_opt.fixed = self._fixed
        if self._model is not None and self.model is not None:
            self.model.load_state_dict(self._model[0])
            self.opt.load_state_dict(self._model[1])
        if self.on_failure is not None:
            self.on_failure()


__all__ = ["Transaction"]
