# SPDX-License-Identifier: Apache-2.0
"""φ, the meta-parameters, by name: φ_opt (learned hyperparameters), φ_loss (loss parameters) and θ_0 with ``learn_init``.

[Alg.1 L2] splits φ into φ_opt and φ_loss; this module is that split and its inverse: it
names every leaf the meta optimizer holds, and turns the sweep's accumulators A_opt, A_loss
and B_0 into one ``{name: hypergradient}`` dict ([Alg.1 L16] joins them back).
"""
from __future__ import annotations

from typing import Any, Sequence, Union

import torch
from torch import Tensor, nn

from .phi_opt import OptimizerHyperparameters

Hypergrad = Union[Tensor, list[Tensor]]


def flat_list(value: Hypergrad) -> list[Tensor]:
    """A hypergradient's tensors: itself, or the per-parameter list of an element-wise one."""
    return value if isinstance(value, list) else [value]


class MetaParameters:
    """Every meta-parameter by name, in the order the meta optimizer holds them.

    Names: the learned hyperparameters (``"lr"``, or ``"lr.<parameter name>"`` per element),
    then ``"loss.<name>"`` for each loss parameter, then ``"init.<parameter name>"`` with
    ``learn_init``: for the inner parameters, and for each parameter outside the optimizer that
    requires grad when the updater is built. A parameter with ``requires_grad=False`` outside the
    optimizer (a frozen backbone, the base weights under LoRA adapters) is a constant of the
    unroll either way, as it is of the user's own training.

    Args:
        phi_opt: The learned hyperparameters.
        loss_params: The user's loss parameters.
        model: The user's module (its parameters are θ_0 with ``learn_init``).
        inner_names: The names of the parameters the inner optimizer updates.
        frozen_names: The names of the module's other parameters.
        learn_init: Whether θ_0 is learned.
    """

    def __init__(self, phi_opt: OptimizerHyperparameters, loss_params: dict[str, Tensor], model: nn.Module,
                 inner_names: Sequence[str], frozen_names: Sequence[str], learn_init: bool):
        self.phi_opt = phi_opt
        self.loss_params = loss_params
        self.model = model
        self.inner_names = list(inner_names)
        self.frozen_names = list(frozen_names)
        self.learn_init = learn_init
        params = dict(model.named_parameters())
        #: The parameters outside the optimizer whose θ_0 is learned (``learn_init``: those that require grad).
        self.learned_frozen = [n for n in self.frozen_names if learn_init and params[n].requires_grad]
        learned = set(self.inner_names) | set(self.learned_frozen)
        #: The names of θ_0's learned tensors, in the model's order (empty without ``learn_init``).
        self.init_names = [n for n in params if learn_init and n in learned]

    def named(self) -> list[tuple[str, Tensor]]:
        """``(name, leaf)`` for every meta-parameter."""
        out = list(self.phi_opt.named_leaves(self.inner_names))
        out += [(f"loss.{n}", t) for n, t in self.loss_params.items()]
        if self.learn_init:
            params = dict(self.model.named_parameters())
            out += [(f"init.{n}", params[n]) for n in self.init_names]
        return out

    def leaves(self) -> list[Tensor]:
        return [t for _, t in self.named()]

    def hypergradients(self, A_opt: dict[str, Hypergrad], A_loss: Sequence[Tensor],
                       theta0_bar: Sequence[Tensor]) -> dict[str, Hypergrad]:
        """[Alg.1 L16]'s join: ``{name: hypergradient}`` from A_opt, A_loss (loss parameters, then
        the learned frozen parameters with ``learn_init``) and B_0 (the inner parameters' θ_0)."""
        out: dict[str, Hypergrad] = dict(A_opt)
        n_loss = len(self.loss_params)
        for name, a in zip(self.loss_params, A_loss[:n_loss]):
            out[f"loss.{name}"] = a
        if self.learn_init:
            init = dict(zip(self.inner_names, theta0_bar))
            init.update(zip(self.learned_frozen, A_loss[n_loss:]))
            for name in self.init_names:
                out[f"init.{name}"] = init[name]
        return out

    def grads_in_order(self, hypergrads: dict[str, Hypergrad]) -> list[Tensor]:
        """The hypergradients in the order of :meth:`named`."""
        out: list[Tensor] = []
        for name in self.phi_opt.values:
            out.extend(flat_list(hypergrads[name]))
        for n in self.loss_params:
            out.extend(flat_list(hypergrads[f"loss.{n}"]))
        if self.learn_init:
            for n in self.init_names:
                out.extend(flat_list(hypergrads[f"init.{n}"]))
        return out

    def mean_over_ranks(self, reducer: Any, hypergrads: dict[str, Hypergrad], val_loss: Tensor
                        ) -> tuple[dict[str, Hypergrad], Tensor]:
        """The hypergradients and L_val averaged over the ranks in one collective (distributed tasks:
        each rank's hypergradient is the mean over its own tasks)."""
        names = [n for n, _ in self.named()]
        flat = self.grads_in_order(hypergrads)
        out = reducer.mean([val_loss] + flat, [val_loss] + flat, "the hypergradients of the ranks' tasks")
        mean_val, by_leaf = out[0], dict(zip(names, out[1:]))
        result: dict[str, Hypergrad] = {}
        for name, value in hypergrads.items():
            result[name] = ([by_leaf[n] for n in names if n.startswith(name + ".")] if isinstance(value, list)
                            else by_leaf[name])
        assert mean_val is not None
        return result, mean_val

    @staticmethod
    def nonfinite(hypergrads: dict[str, Hypergrad]) -> list[str]:
        """The names whose hypergradient holds a NaN or an infinity.

        The common case, everything finite, is one batched check: the 2-norm of every tensor
        (one ``torch._foreach_norm``; a NaN or an infinity makes the norm non-finite) and one
        read of the result, instead of one ``isfinite`` and one host read per tensor. A norm can
        also overflow for finite values, so a non-finite norm only sends the check to the exact
        one below, which finds the names one tensor at a time.
        """
        tensors = [t for v in hypergrads.values() for t in flat_list(v) if t.numel()]
        if tensors:
            try:
                norms = torch._foreach_norm(tensors)
                if bool(torch.isfinite(torch.stack(norms)).all()):
                    return []
            except (RuntimeError, TypeError):  # mixed devices or layouts: the per-tensor check below
                pass
        else:
            return []
        return [name for name, v in hypergrads.items() if not all(bool(torch.isfinite(t).all()) for t in flat_list(v))]


__all__ = ["Hypergrad", "MetaParameters", "flat_list"]
