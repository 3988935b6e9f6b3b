# SPDX-License-Identifier: Apache-2.0
"""A stateless view of a stock ``nn.Module``, bound to the inner parameters θ'_j."""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional, Sequence

from torch import Tensor, nn
from torch.func import functional_call


class ModuleSlots:
    """Where each parameter and buffer of a module lives: Note [Binding by slots].

    For every name of ``named_parameters()`` / ``named_buffers()`` (shared tensors under the
    name those iterators report first), the ``(owner._parameters or owner._buffers, key)``
    slots of all its aliases. Built once per meta step (the module's structure is fixed while
    Algorithm 1 runs); :meth:`call` then swaps tensors in and out with plain dict stores.

    Note [Binding by slots]: ``torch.func.functional_call`` re-parametrises the module through
    ``setattr`` on every call and first walks the module tree to untie shared tensors, which
    costs about 10 µs per tensor per call (1 ms for a model of 122 tensors, called once or
    twice per inner step). Storing into the owners' ``_parameters`` / ``_buffers`` dicts is
    what that ``setattr`` ends up doing for a stock module, so the forward pass computes the
    same values. Modules whose class overrides ``__setattr__`` (e.g. ``nn.RNN``, which keeps
    its own list of flat weights in step) may rely on the ``setattr`` path, so for any such
    module ``usable`` is False and :class:`FunctionalModel` calls ``functional_call`` as before.
    """

    def __init__(self, module: nn.Module):
        self.params: dict[str, list[tuple[dict, str]]] = {}
        self.buffers: dict[str, list[tuple[dict, str]]] = {}
        self.usable = True
        for slots, named, kind in ((self.params, module.named_parameters(remove_duplicate=False), "_parameters"),
                                   (self.buffers, module.named_buffers(remove_duplicate=False), "_buffers")):
            first: dict[int, str] = {}
            for name, tensor in named:
                if tensor is None:
                    continue
                prefix, _, key = name.rpartition(".")
                owner = module.get_submodule(prefix) if prefix else module
                if type(owner).__setattr__ is not nn.Module.__setattr__:
                    self.usable = False
                slots.setdefault(first.setdefault(id(tensor), name), []).append((getattr(owner, kind), key))

    def covers(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor]) -> bool:
        """Whether ``params`` and ``buffers`` name exactly this module's tensors."""
        return self.usable and params.keys() == self.params.keys() and buffers.keys() == self.buffers.keys()

    def call(self, module: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
             args: tuple, kwargs: dict) -> Any:
        """``module(*args, **kwargs)`` with ``params`` and ``buffers`` in its slots, restored after."""
        saved: list[tuple[dict, str, Any]] = []
        try:
            for slots, values in ((self.params, params), (self.buffers, buffers)):
                for name, tensor in values.items():
                    for owner, key in slots[name]:
                        saved.append((owner, key, owner[key]))
                        owner[key] = tensor
            return module(*args, **kwargs)
        finally:
            for owner, key, old in reversed(saved):
                owner[key] = old


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
        slots: The module's :class:`ModuleSlots` (built once per meta step by the caller); with
            them, and when they cover ``params`` and ``buffers``, calls bind the tensors by
            dict stores (Note [Binding by slots]) instead of ``functional_call``.
        owned: ``params`` and ``buffers`` are dicts made for this view alone: keep them instead of copying.
    """

    def __init__(self, module: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
                 slots: Optional[ModuleSlots] = None, owned: bool = False):
        self.module = module
        self._params = params if owned and type(params) is dict else dict(params)
        self._buffers = buffers if owned and type(buffers) is dict else dict(buffers)
        self._slots = slots if slots is not None and slots.covers(self._params, self._buffers) else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._slots is not None:
            return self._slots.call(self.module, self._params, self._buffers, args, kwargs)
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


__all__ = ["FunctionalModel", "ModuleSlots", "bind", "buffer_names", "clone_buffers", "parameter_names"]
