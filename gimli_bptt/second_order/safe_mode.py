# SPDX-License-Identifier: Apache-2.0
"""The second-order-safe mode: a ``TorchFunctionMode`` that runs the registered functions as their equivalents,
the context that enters it once, and the latch that skips it where it replaces nothing.

Note [Second-order-safe passes] is in :mod:`gimli_bptt.second_order`.
"""
from __future__ import annotations

import threading
import types
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

from torch.overrides import TorchFunctionMode, redispatch_function

from . import registry
from .registry import _REGISTRY


class SecondOrderSafeMode(TorchFunctionMode):
    """A ``TorchFunctionMode`` that calls each registered function's equivalent instead of it.

    Enter it with :func:`second_order_safe` (which does not stack a second one).
    """

    def __init__(self) -> None:
        super().__init__()
        self._inside: list[Any] = []  # Python-level torch functions whose body runs with the mode on
        self.replaced = 0  # calls that ran as their equivalent

    def __torch_function__(self, func: Any, types_: Any, args: Sequence[Any] = (), kwargs: Optional[dict] = None) -> Any:
        if kwargs is None:
            kwargs = {}
        entry = _REGISTRY.get(func)
        if entry is not None:
            self.replaced += 1
            return entry.replacement(*args, **kwargs)  # the mode is off inside
        if isinstance(func, types.FunctionType) and func not in self._inside:
            # A torch function written in Python (F.multi_head_attention_forward, Tensor.unflatten): run
            # its body with the mode on, so that the registered functions it calls are replaced too; a
            # second dispatch of the same function from its own body (Tensor.unflatten -> super()) is
            # called as it is.
            self._inside.append(func)
            try:
                with self:
                    return redispatch_function(func, types_, args, kwargs)
            finally:
                self._inside.pop()
        return func(*args, **kwargs)


_local = threading.local()


class second_order_safe:
    """Context manager: inside, the registered functions run as their twice-differentiable equivalents.

    Entering it where it is already active does nothing (one mode, not a stack of them).
    ``with second_order_safe(enabled=False)`` is a no-op, for code that decides at run time.

    Attributes:
        replaced: After the body, how many calls it ran as their equivalents; None where this
            context added no mode of its own (disabled, nested in another, or an empty registry).
    """

    __slots__ = ("_mode", "_enabled", "replaced")

    def __init__(self, enabled: bool = True) -> None:
        self._enabled = enabled
        self._mode: Optional[SecondOrderSafeMode] = None
        self.replaced: Optional[int] = None

    def __enter__(self) -> "second_order_safe":
        if not self._enabled:
            return self
        depth = getattr(_local, "depth", 0)
        if depth == 0 and _REGISTRY:
            self._mode = SecondOrderSafeMode()
            self._mode.__enter__()
        _local.depth = depth + 1
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._enabled:
            return
        _local.depth -= 1
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(*exc)
            self.replaced = mode.replaced


class SafeModeLatch:
    """Whether the second-order passes of one updater need :func:`second_order_safe`, learned by a first pass.

    Note [Skipping the safe mode]: the mode intercepts every torch call of a pass in Python, which
    costs 5-9% of a hypergradient on a small MLP whose loss calls nothing of the registry (measured by
    ``bench/ab_safe_mode.py``). So the first second-order pass runs under the mode and counts the
    calls it replaced; if there were none, the passes after it (this meta step's and the next
    ones') run without the mode. A registry edit makes the latch learn again. A model whose later
    passes take another branch and call a registered function without the mode fails its double
    backward with
    :class:`MissingDoubleBackwardError`; :meth:`GimliUpdater.hypergradient` then :meth:`needs` the
    mode and computes the meta step again from its start (same generator state), so the skip can
    cost a recomputation, never a result. Passes outside an updater's reverse sweep (forward mode,
    distributed runs, the reference unroll of :mod:`gimli_bptt.testing`) always run under the mode.

    Args:
        learns: False for a latch that keeps every pass under the mode.

    Attributes:
        needed: True (the mode replaced a call), False (it replaced none), None (not known yet).
    """

    __slots__ = ("needed", "_changes")

    def __init__(self, learns: bool = True) -> None:
        self.needed: Optional[bool] = None if learns else True
        self._changes = registry.edits()

    @property
    def skipping(self) -> bool:
        """Whether passes now run without the mode."""
        return self.needed is False and self._changes == registry.edits()

    def needs(self) -> None:
        """From now on every pass runs under the mode."""
        self.needed, self._changes = True, registry.edits()

    @contextmanager
    def second_order_pass(self) -> Iterator[None]:
        """The body (a pass whose graph is differentiated again) under the mode, unless :attr:`skipping`."""
        if self.skipping:
            yield
            return
        safe = second_order_safe()
        with safe:
            yield
        if safe.replaced is not None and (self.needed is None or self._changes != registry.edits()):
            self.needed, self._changes = safe.replaced > 0, registry.edits()


__all__ = ["SafeModeLatch", "SecondOrderSafeMode", "second_order_safe"]
