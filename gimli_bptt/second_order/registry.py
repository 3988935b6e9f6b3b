# SPDX-License-Identifier: Apache-2.0
"""The registry of second-order equivalents: which torch function is computed by which twice-differentiable stand-in.

Note [Second-order-safe passes] is in :mod:`gimli_bptt.second_order`.
"""
from __future__ import annotations

import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Equivalent:
    """One entry of the registry: a torch function and its twice-differentiable stand-in.

    Attributes:
        function: The torch function as ``__torch_function__`` receives it (e.g.
            ``torch.nn.functional.hardsigmoid``).
        replacement: Called with the same arguments in second-order passes; same values, same
            first derivatives, and a double backward.
        name: ``function``'s qualified name, for messages.
        how: One line saying how the replacement computes it (for the README and errors).
        aten: The aten ops (without ``aten::``) whose missing derivative the replacement avoids.
    """

    function: Callable[..., Any]
    replacement: Callable[..., Any]
    name: str
    how: str
    aten: tuple[str, ...]


_REGISTRY: dict[Any, Equivalent] = {}
_changes = 0  # edits of the registry, so that a SafeModeLatch learned before one is not trusted after it


def edits() -> int:
    """How many times the registry was changed so far (a latch learned before a change is not trusted after it)."""
    return _changes


def _qualified_name(function: Any) -> str:
    """The public name of a torch function (``torch.cdist``, ``torch.nn.functional.hardsigmoid``,
    ``torch.ops.torchvision.roi_align``), for messages."""
    if isinstance(function, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):
        return "torch.ops." + str(function).replace("::", ".")
    name = getattr(function, "__name__", None)
    if name:
        for prefix, namespace in (("torch.nn.functional", F), ("torch", torch), ("torch.Tensor", torch.Tensor)):
            if getattr(namespace, name, None) is function:
                return f"{prefix}.{name}"
    try:
        resolved = torch.overrides.resolve_name(function)
    except Exception:  # noqa: BLE001 - a name is only for messages
        resolved = None
    if resolved:
        return resolved
    module = getattr(function, "__module__", None) or ""
    qualname = getattr(function, "__qualname__", None) or name or repr(function)
    return f"{module}.{qualname}" if module else qualname


_OVERRIDABLE: Optional[set[Any]] = None


def _is_overridable(function: Any) -> bool:
    """Whether ``function`` is one of torch's own functions that dispatch through ``__torch_function__``."""
    global _OVERRIDABLE
    if _OVERRIDABLE is None:
        found: set[Any] = set()
        for funcs in torch.overrides.get_overridable_functions().values():
            found.update(f for f in funcs if getattr(f, "__hash__", None) is not None)
        _OVERRIDABLE = found
    try:
        return function in _OVERRIDABLE
    except TypeError:
        return False


def register_equivalent(function: Callable[..., Any], replacement: Callable[..., Any], *, how: str = "",
                        aten: Sequence[str] = (), replace: bool = False) -> None:
    """Computes ``function`` by ``replacement`` wherever gimli differentiates the loss twice.

    Args:
        function: A torch function whose double backward is missing: a function of ``torch``,
            ``torch.nn.functional`` or a ``torch.Tensor`` method (or your own function that
            dispatches through ``torch.overrides.handle_torch_function``).
        replacement: Takes ``function``'s arguments and returns the same values, computed by
            ops that have a double backward (it runs with the replacements off, so it may call
            ``function`` itself, e.g. under a context that picks another kernel).
        how: One line for messages: how ``replacement`` computes it.
        aten: Names of the aten ops whose missing derivative this avoids (e.g.
            ``("hardsigmoid_backward",)``), so an error about them can say the entry exists.
        replace: Replace an existing entry for ``function`` (else that is an error).

    Raises:
        TypeError: ``function`` or ``replacement`` is not callable.
        ValueError: ``function`` already has an entry and ``replace`` is False.
    """
    if not callable(function) or not callable(replacement):
        raise TypeError("register_equivalent(function, replacement): both must be callable, got "
                        f"{type(function).__name__} and {type(replacement).__name__}")
    if replacement is function:
        raise ValueError("register_equivalent: the replacement is the function itself")
    if function in _REGISTRY and not replace:
        raise ValueError(f"{_REGISTRY[function].name} already has a second-order equivalent "
                         f"({_REGISTRY[function].how}); pass replace=True to replace it")
    if not isinstance(function, types.FunctionType) and not _is_overridable(function):
        warnings.warn(f"register_equivalent: {_qualified_name(function)} is not among torch's overridable functions; "
                      "it is replaced only if its calls go through __torch_function__", UserWarning, stacklevel=2)
    _register(function, replacement, how, aten)


def _register(function: Callable[..., Any], replacement: Callable[..., Any], how: str, aten: Sequence[str]) -> None:
    global _changes
    _changes += 1
    _REGISTRY[function] = Equivalent(function, replacement, _qualified_name(function), how or "a registered equivalent",
                                     tuple(a.removeprefix("aten::") for a in aten))


def unregister_equivalent(function: Callable[..., Any]) -> None:
    """Removes ``function``'s entry: second-order passes then call it as it is.

    Raises:
        KeyError: ``function`` has no entry.
    """
    if function not in _REGISTRY:
        raise KeyError(f"{_qualified_name(function)} has no second-order equivalent to remove")
    global _changes
    _changes += 1
    del _REGISTRY[function]


def registered_equivalents() -> tuple[Equivalent, ...]:
    """The registry's entries, in the order they were registered."""
    return tuple(_REGISTRY.values())


__all__ = ["Equivalent", "edits", "register_equivalent", "registered_equivalents", "unregister_equivalent"]
