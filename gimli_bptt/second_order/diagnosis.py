# SPDX-License-Identifier: Apache-2.0
"""The diagnosis of a missing double backward: PyTorch's ``derivative for aten::X is not implemented`` becomes a
:class:`MissingDoubleBackwardError` naming the op, the torch function that called it, the module and the fix.

Note [Second-order-safe passes] is in :mod:`gimli_bptt.second_order`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .registry import _REGISTRY, _qualified_name
from .safe_mode import SecondOrderSafeMode, _local


class MissingDoubleBackwardError(RuntimeError):
    """The loss uses an op that PyTorch cannot differentiate as often as gimli must.

    Raised where gimli differentiates ``train_loss`` a second time (the Hessian-vector products)
    and PyTorch has no derivative for an op's backward. The message names the op, the torch
    function that called it, the module it ran in and the fix.

    Attributes:
        op: The aten op PyTorch has no derivative for (e.g. ``hardsigmoid_backward``).
        forward_op: The aten op of the forward pass behind it (e.g. ``hardsigmoid``), if found.
        module_path: The path of the module it ran in (``""`` for the model itself), if found.
        module_type: That module's class name, if found.
        function: The torch function that called it (e.g. ``torch.nn.functional.hardsigmoid``), if found.
    """

    def __init__(self, message: str, op: str, forward_op: Optional[str] = None, module_path: Optional[str] = None,
                 module_type: Optional[str] = None, function: Optional[str] = None):
        super().__init__(message)
        self.op = op
        self.forward_op = forward_op
        self.module_path = module_path
        self.module_type = module_type
        self.function = function


_MISSING = re.compile(r"derivative for '?(?:aten::)?([\w.]+?)'? is not implemented")
# torchvision's own ops (roi_align, deform_conv2d, ...): their backward op torchvision::_X_backward says this
_NO_DOUBLE_BACKWARD = re.compile(r"double backwards? on '?(?:\w+::)?(\w+?)'? (?:is )?not supported")


def missing_derivative(exc: BaseException) -> Optional[str]:
    """The op PyTorch has no derivative for, from its error, else None.

    PyTorch's ``derivative for aten::X is not implemented`` gives ``X``; torchvision's ``double
    backwards on X not supported`` (its ops ``roi_align``, ``deform_conv2d``, ...) gives the
    backward op ``_X_backward`` that has no derivative.
    """
    if not isinstance(exc, RuntimeError) or isinstance(exc, MissingDoubleBackwardError):
        return None
    m = _MISSING.search(str(exc))
    if m:
        return m.group(1)
    m = _NO_DOUBLE_BACKWARD.search(str(exc))
    return f"_{m.group(1)}_backward" if m else None


def _forward_candidates(op: str) -> list[str]:
    """The forward ops whose backward ``op`` may be (``hardsigmoid_backward`` -> ``hardsigmoid``,
    torchvision's ``_roi_align_backward`` -> ``roi_align``)."""
    out = [op]
    if op.endswith("_backward"):
        stem = op[: -len("_backward")]
        out += [stem, stem + "_forward"]
        if stem.startswith("_"):
            out.append(stem.lstrip("_"))
    return out


@dataclass
class _Site:
    """Where a forward aten op ran: the module, and the torch functions running then (outermost first)."""

    forward_op: str
    module_path: Optional[str]
    module_type: Optional[str]
    functions: list[Any]
    namespace: str = "aten"  # the op's library: aten, or another (torchvision)

    def names(self) -> list[str]:
        """The functions' public names, without repeats (``torch.cdist`` calls a builtin of that name)."""
        out: list[str] = []
        for k, f in enumerate(self.functions):
            if k and getattr(f, "__name__", None) == getattr(self.functions[k - 1], "__name__", ""):
                continue  # the builtin behind a Python wrapper of the same name
            q = _qualified_name(f)
            if q not in out:
                out.append(q)
        return out

    def target(self) -> Optional[str]:
        """The function to register an equivalent for: the innermost one, or the Python wrapper of that name."""
        if not self.functions:
            return None
        k = len(self.functions) - 1
        while k > 0 and getattr(self.functions[k - 1], "__name__", None) == getattr(self.functions[k], "__name__", ""):
            k -= 1
        return _qualified_name(self.functions[k])


class _RecordingMode(SecondOrderSafeMode):
    """The safe mode that also notes which torch functions are running (outermost first)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[Any] = []

    def __torch_function__(self, func: Any, types_: Any, args: Sequence[Any] = (), kwargs: Optional[dict] = None) -> Any:
        self.stack.append(func)
        try:
            return super().__torch_function__(func, types_, args, kwargs)
        finally:
            self.stack.pop()


def _locate(module: nn.Module, rerun: Callable[[], Any], ops: Sequence[str]) -> Optional[_Site]:
    """Runs ``rerun`` (the loss again) and finds the first module and torch function that run one of ``ops``."""
    names = {id(m): name for name, m in module.named_modules()}
    path: list[str] = []
    functions = _RecordingMode()  # the same replacements as the pass that failed
    found: list[_Site] = []
    wanted = set(ops)

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types_: Any, args: Sequence[Any] = (), kwargs: Optional[dict] = None
                               ) -> Any:
            if not found:
                namespace, _, name = func._schema.name.partition("::")
                if name in wanted:
                    owner = path[-1] if path else None
                    mtype = type(module.get_submodule(owner)).__name__ if owner is not None else None
                    found.append(_Site(name, owner, mtype, list(functions.stack), namespace or "aten"))
            return func(*args, **(kwargs or {}))

    def pre(m: nn.Module, *_: Any) -> None:
        path.append(names[id(m)])

    def post(m: nn.Module, *_: Any) -> None:
        if path:
            path.pop()

    handles = []
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    _local.depth = getattr(_local, "depth", 0) + 1  # a second_order_safe() inside adds no mode
    try:
        for m in module.modules():
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post, always_call=True))
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), Ops(), functions:
            rerun()
    except Exception:  # noqa: BLE001 - locating is best effort; the error is raised either way
        pass
    finally:
        _local.depth -= 1
        for h in handles:
            h.remove()
    return found[0] if found else None


def _message(op: str, site: Optional[_Site], where: str) -> str:
    covered = next((e for e in _REGISTRY.values() if op in e.aten), None)
    if site is not None:
        called = f" (called by {' -> '.join(site.names())})" if site.functions else ""
        if site.module_path is None:
            place = ""
        elif site.module_path == "":
            place = f" in the model itself ({site.module_type})"
        else:
            place = f" in module `{site.module_path}` ({site.module_type})"
        what = f"train_loss runs {site.namespace}::{site.forward_op}{called}{place}"
        target = site.target()
    else:
        what, target = "train_loss runs an op", None
    namespace = site.namespace if site is not None else "aten"
    first_order = site is not None and site.forward_op == op
    if first_order:
        head = (f"{what}, and PyTorch has no derivative for {namespace}::{op} at all: {where} cannot differentiate "
                "train_loss even once")
    else:
        head = (f"{what}, whose backward {namespace}::{op} PyTorch cannot differentiate: {where} needs the second "
                "derivative of train_loss")
    if covered is not None:
        fix = (f"gimli computes {covered.name} {covered.how} in its second-order passes, but this call did not go "
               "through torch's __torch_function__ there (called from C++, from inside another registered "
               "equivalent, or under a kernel choice forced inside train_loss, e.g. torch.nn.attention.sdpa_kernel "
               "with a fused backend); call it from Python without forcing a fused kernel")
    else:
        fn = target or "the torch function that calls it"
        fix = (f"register an exact twice-differentiable equivalent, gimli_bptt.second_order.register_equivalent({fn}, "
               "fn), which gimli then uses wherever it differentiates the loss twice (README, \"Models\"); or build that "
               "part of the model from ops that have a double backward")
        if not first_order:
            fix += "; or pass first_order=True, which drops the second-order terms (an approximation)"
    if site is None:
        fix += ("; to find where the op runs, call the loss under torch.autograd.set_detect_anomaly(True) or "
                "torch.profiler")
    return f"{head}. Fix: {fix}."


class explain_missing_derivatives:
    """Context manager around a second backward: PyTorch's missing-derivative error becomes a
    :class:`MissingDoubleBackwardError` naming the op, the torch function, the module and the fix.

    Args:
        module: The user's module (its ``named_modules`` give the paths).
        rerun: Runs the step's loss once more (forward only), to find where the op runs; called
            only on such an error, with the caller's generators forked and the equivalents on.
        where: What was being computed, for the message (e.g. "the Hessian-vector product of inner step 3").
        enabled: False: a no-op (for a caller that differentiates only once on some paths).
    """

    __slots__ = ("module", "rerun", "where", "enabled")

    def __init__(self, module: nn.Module, rerun: Callable[[], Any], where: str, enabled: bool = True) -> None:
        self.module = module
        self.rerun = rerun
        self.where = where
        self.enabled = enabled

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> None:
        if exc is None or not self.enabled:
            return
        op = missing_derivative(exc)
        if op is None:
            return
        site = _locate(self.module, self.rerun, _forward_candidates(op))
        error = MissingDoubleBackwardError(
            _message(op, site, self.where), op, site.forward_op if site else None, site.module_path if site else None,
            site.module_type if site else None, site.target() if site else None)
        raise error from exc


__all__ = ["MissingDoubleBackwardError", "explain_missing_derivatives", "missing_derivative"]
