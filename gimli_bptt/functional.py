# SPDX-License-Identifier: Apache-2.0
"""A stateless view of a stock ``nn.Module``, bound to the inner parameters θ'_j."""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

from torch import Tensor, nn
from torch.func import functional_call


class FunctionalModel:
    """The module ``module`` called with parameters and buffers that are not its own.

    This is the ``model`` handed to ``train_loss(model, batch)`` and ``val_loss(model, batch)``:
    call it like the module; :meth:`parameters` and :meth:`named_parameters` give the inner
    parameters θ'_j it is bound to (so a regulariser written against them is differentiated),
    and :meth:`buffers` gives the buffers of this inner step. Calls go through
    ``torch.func.functional_call``: the module itself is never modified, and buffers that the
    forward pass updates in place (BatchNorm's running statistics) are updated in the tensors
    bound here, not in the module.

    Args:
        module: The stock module whose ``forward`` is used.
        params: Parameter tensors by the module's parameter names.
        buffers: Buffer tensors by the module's buffer names.
    """

    def __init__(self, module: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor]):
        self.module = module
        self._params = dict(params)
        self._buffers = dict(buffers)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.module, (self._params, self._buffers), args, kwargs, strict=True)

    forward = __call__

    @property
    def training(self) -> bool:
        """The module's own ``training`` flag (set it with ``module.train()``/``eval()``)."""
        return self.module.training

    def named_parameters(self) -> Iterator[tuple[str, Tensor]]:
        """``(name, θ'_j tensor)`` pairs in the module's parameter order."""
        return iter(self._params.items())

    def parameters(self) -> Iterator[Tensor]:
        """The θ'_j tensors in the module's parameter order."""
        return iter(self._params.values())

    def named_buffers(self) -> Iterator[tuple[str, Tensor]]:
        """``(name, buffer)`` pairs of this inner step."""
        return iter(self._buffers.items())

    def buffers(self) -> Iterator[Tensor]:
        """The buffers of this inner step."""
        return iter(self._buffers.values())

    def __repr__(self) -> str:
        return f"FunctionalModel({self.module.__class__.__name__}, {len(self._params)} parameters)"


def parameter_names(module: nn.Module) -> list[str]:
    """Names of the module's parameters, shared ones once, in ``named_parameters`` order."""
    return [name for name, _ in module.named_parameters()]


def buffer_names(module: nn.Module) -> list[str]:
    """Names of the module's buffers (``None`` buffers excluded), in ``named_buffers`` order."""
    return [name for name, b in module.named_buffers() if b is not None]


def clone_buffers(buffers: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached copies of buffers, so that an in-place update leaves the originals as they were."""
    return {k: v.detach().clone() for k, v in buffers.items()}


def bind(module: nn.Module, names: Sequence[str], theta: Sequence[Tensor],
         buffers: Mapping[str, Tensor]) -> FunctionalModel:
    """The view of ``module`` with parameters ``theta`` (in the order of ``names``)."""
    return FunctionalModel(module, dict(zip(names, theta)), buffers)


__all__ = ["FunctionalModel", "bind", "buffer_names", "clone_buffers", "parameter_names"]
