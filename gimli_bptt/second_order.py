# SPDX-License-Identifier: Apache-2.0
"""Second-order-safe passes: ops without a double backward run as exact equivalents that have one.

Note [Second-order-safe passes]: the Hessian-vector products of [Alg.1 L13]-[Alg.1 L14]
differentiate the user's ``train_loss`` twice. Some PyTorch ops have a first derivative but no
second: the fused attention kernels behind ``F.scaled_dot_product_attention`` (CPU flash,
CUDA flash, memory-efficient and cuDNN attention) and ``F.hardsigmoid`` (MobileNetV3's
squeeze-excitation). Each is the same mathematical function as a composition of ops that do
have a double backward: attention on PyTorch's math backend, and ``relu6(x + 3) / 6``. Every
pass in which gimli builds a graph that it differentiates again (``InnerProblem.step_gradient``
with ``keep_graph=True``: the kept graphs of the tape and the recomputation before a
Hessian-vector product; the forward-over-reverse pass of ``hvp="fwd"``; the reference unroll
of :mod:`gimli_bptt.testing`) runs the loss inside :func:`second_order_safe`, a
``TorchFunctionMode`` that replaces each function of the registry by its equivalent. Outside
those passes (the tape's plain forward pass, ``train_step``, the validation loss) nothing is
replaced and the fused kernels run. An updater whose first such pass replaced nothing runs the
later ones without the mode, which saves 5-9% on small models (:class:`SafeModeLatch`, Note
[Skipping the safe mode]).

The mode sees every call that goes through ``__torch_function__``: the functions of
``torch``, ``torch.nn.functional`` and the tensor methods, also where one of them calls another
in its Python body (``F.multi_head_attention_forward`` calling ``F.scaled_dot_product_attention``:
the mode re-enters itself through ``torch.overrides.redispatch_function``). An equivalent
itself runs with the mode off, so it may call the function it replaces. A function of the
registry that is called where the mode cannot see it (from C++, or inside an equivalent) runs
as it is; if its double backward is missing, the sweep raises :class:`MissingDoubleBackwardError`.

Where an op without a double backward is not in the registry, the second backward raises
PyTorch's ``derivative for aten::X is not implemented``. :class:`explain_missing_derivatives`
turns that into a :class:`MissingDoubleBackwardError` that names the op, the torch function that
called it, the module it ran in (its path in the model, e.g. ``features.1.block.2.scale_activation``)
and the fix: it runs the step's loss once more under forward hooks and a dispatch mode that
note which module runs which aten op (only then, so the normal path pays nothing).

Add an entry for your own op with :func:`register_equivalent`::

    def my_act_twice_differentiable(x):       # the same values, built from ops with a double backward
        return x * torch.sigmoid(1.702 * x)

    register_equivalent(my_fused_act, my_act_twice_differentiable,
                        how="x * sigmoid(1.702 x)", aten=("my_fused_act_backward",))

``my_fused_act`` must be a torch function (one that dispatches through ``__torch_function__``:
everything in ``torch``, ``torch.nn.functional`` and ``torch.Tensor``, or your own function
wrapped with ``torch.overrides.handle_torch_function``); the equivalent takes the same
arguments and must compute the same values and first derivatives.
"""
from __future__ import annotations

import re
import threading
import types
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.overrides import redispatch_function as _redispatch  # a function's body with the mode still on

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - torch without torch.nn.attention
    SDPBackend = sdpa_kernel = None  # type: ignore[assignment,misc]


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


# ---------------------------------------------------------------------------- built-in entries
_HARDSIGMOID_SLOPE: dict[tuple[torch.dtype, str], float] = {}


def _hardsigmoid_slope(dtype: torch.dtype, device: torch.device) -> float:
    """The slope PyTorch's own ``hardsigmoid_backward`` uses: 1/6 rounded to float32, in every dtype."""
    key = (dtype, device.type)
    slope = _HARDSIGMOID_SLOPE.get(key)
    if slope is None:
        one = torch.ones((), dtype=dtype, device=device)
        slope = _HARDSIGMOID_SLOPE[key] = float(torch.ops.aten.hardsigmoid_backward(one, torch.zeros_like(one)))
    return slope


def hardsigmoid_relu6(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``F.hardsigmoid`` with a double backward: the values ``relu6(x + 3) / 6``, the derivative
    ``where(-3 < x < 3, slope, 0)``.

    Both are PyTorch's to the bit: the values in every floating dtype (float16 and bfloat16 in
    float32, as PyTorch's kernel), and the first derivative with PyTorch's own slope, which is
    1/6 rounded to float32 even for float64 (so the gradient of a kept graph equals the one
    of the plain tape pass). The second derivative is zero almost everywhere, as it should be.
    """
    opmath = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    x = input.to(opmath)
    value = (F.relu6(x.detach() + 3.0) / 6.0).to(input.dtype)  # detach, not no_grad: no forward-mode tangent either
    slope = _hardsigmoid_slope(opmath, input.device)
    linear = torch.where((x > -3.0) & (x < 3.0), x, 0.0) * slope  # carries the derivative, not the value
    out = value + (linear - linear.detach()).to(input.dtype)  # value + 0, exactly
    return input.copy_(out) if inplace else out


def attention_math(*args: Any, **kwargs: Any) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on PyTorch's math backend (a composition of differentiable ops)."""
    if sdpa_kernel is None:  # pragma: no cover
        return F.scaled_dot_product_attention(*args, **kwargs)
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kwargs)


def embedding_bag_gathered(input: torch.Tensor, weight: torch.Tensor, offsets: Optional[torch.Tensor] = None,
                           max_norm: Optional[float] = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                           mode: str = "mean", sparse: bool = False, per_sample_weights: Optional[torch.Tensor] = None,
                           include_last_offset: bool = False, padding_idx: Optional[int] = None) -> torch.Tensor:
    """``F.embedding_bag`` as ``F.embedding`` followed by the bag's sum, mean or max over its rows.

    The same bags (fixed-length rows of a 2-D ``input``, or ``offsets`` into a 1-D one, empty bags
    giving zeros), ``padding_idx`` entries left out of the sum and the count, ``per_sample_weights``
    (sum mode) and ``max_norm`` (the same in-place renormalisation of ``weight``); the values and
    first derivatives agree with PyTorch's to rounding (the sums run in another order), and every
    op has a double backward. ``scale_grad_by_freq=True`` is refused (NotImplementedError).
    """
    if mode not in ("sum", "mean", "max"):
        raise ValueError(f"embedding_bag: mode must be 'sum', 'mean' or 'max', got {mode!r}")
    if scale_grad_by_freq:
        raise NotImplementedError(
            "embedding_bag(scale_grad_by_freq=True) has no twice-differentiable equivalent in gimli_bptt (PyTorch's "
            "first derivative with it does not scale by each index's frequency as F.embedding does); use "
            "nn.Embedding(scale_grad_by_freq=True) and reduce each bag yourself, or scale_grad_by_freq=False")
    if per_sample_weights is not None and mode != "sum":
        raise NotImplementedError("embedding_bag: per_sample_weights is only supported for mode='sum' "
                                  f"(got mode={mode!r})")
    rows = F.embedding(input, weight, None, max_norm, norm_type, scale_grad_by_freq, sparse)
    keep = None if padding_idx is None else (input != (padding_idx % weight.shape[0]))
    if input.dim() == 2:  # fixed-length bags, one per row
        if offsets is not None:
            raise ValueError("embedding_bag: offsets must be None when input is 2-D")
        w = None if per_sample_weights is None else per_sample_weights.unsqueeze(-1).to(rows.dtype)
        if keep is not None:
            mask = keep.unsqueeze(-1).to(rows.dtype)
            w = mask if w is None else w * mask
        if mode == "max":
            filled = rows if keep is None else rows.masked_fill(~keep.unsqueeze(-1), float("-inf"))
            out = filled.max(dim=1).values
            return out if keep is None else torch.where(keep.any(1, keepdim=True), out, torch.zeros_like(out))
        total = (rows if w is None else rows * w).sum(1)
        if mode == "sum":
            return total
        count = torch.full(total.shape[:1], float(input.shape[1]), dtype=rows.dtype, device=rows.device)
        if keep is not None:
            count = keep.sum(1).to(rows.dtype)
        return total / count.clamp_min(1.0).unsqueeze(-1)
    if input.dim() != 1 or offsets is None:
        raise ValueError("embedding_bag: a 1-D input needs offsets")
    bags = offsets.shape[0] - (1 if include_last_offset else 0)
    n = input.shape[0]
    bag = torch.searchsorted(offsets[:bags].contiguous(), torch.arange(n, device=input.device), right=True) - 1
    if keep is not None:  # the padding entries join no bag
        bag = bag[keep]
        rows = rows[keep]
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights[keep]
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.unsqueeze(-1).to(rows.dtype)
    dim = weight.shape[1]
    if mode == "max":
        count = torch.bincount(bag, minlength=bags)
        pos = torch.arange(bag.shape[0], device=input.device) - torch.cumsum(count, 0).sub(count)[bag]
        dense = rows.new_full((bags, max(int(count.max()) if count.numel() else 0, 1), dim), float("-inf"))
        dense = dense.index_put((bag, pos), rows)
        out = dense.max(dim=1).values
        return torch.where((count > 0).unsqueeze(-1), out, torch.zeros_like(out))
    total = rows.new_zeros(bags, dim).index_add(0, bag, rows)
    if mode == "sum":
        return total
    count = torch.bincount(bag, minlength=bags).to(rows.dtype)
    return total / count.clamp_min(1.0).unsqueeze(-1)


_register(
    F.scaled_dot_product_attention, attention_math, how="on PyTorch's math backend (torch.nn.attention.SDPBackend.MATH)",
    aten=("_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_flash_attention_backward",
          "_scaled_dot_product_efficient_attention_backward", "_scaled_dot_product_cudnn_attention_backward",
          "_scaled_dot_product_fused_attention_overrideable_backward", "_flash_attention_backward",
          "_efficient_attention_backward"),
)
_register(F.hardsigmoid, hardsigmoid_relu6, "as relu6(x + 3) / 6 (with PyTorch's own slope)", ("hardsigmoid_backward",))
_register(F.embedding_bag, embedding_bag_gathered, "as F.embedding and a sum, mean or max over each bag",
          ("_embedding_bag_backward", "_embedding_bag_dense_backward", "_embedding_bag_per_sample_weights_backward"))


# ---------------------------------------------------------------------------- the mode
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
                    return _redispatch(func, types_, args, kwargs)
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
        self._changes = _changes

    @property
    def skipping(self) -> bool:
        """Whether passes now run without the mode."""
        return self.needed is False and self._changes == _changes

    def needs(self) -> None:
        """From now on every pass runs under the mode."""
        self.needed, self._changes = True, _changes

    @contextmanager
    def second_order_pass(self) -> Iterator[None]:
        """The body (a pass whose graph is differentiated again) under the mode, unless :attr:`skipping`."""
        if self.skipping:
            yield
            return
        safe = second_order_safe()
        with safe:
            yield
        if safe.replaced is not None and (self.needed is None or self._changes != _changes):
            self.needed, self._changes = safe.replaced > 0, _changes


# ---------------------------------------------------------------------------- errors
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
    from torch.utils._python_dispatch import TorchDispatchMode

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

    def __exit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> bool:
        if exc is None or not self.enabled:
            return False
        op = missing_derivative(exc)
        if op is None:
            return False
        site = _locate(self.module, self.rerun, _forward_candidates(op))
        error = MissingDoubleBackwardError(
            _message(op, site, self.where), op, site.forward_op if site else None, site.module_path if site else None,
            site.module_type if site else None, site.target() if site else None)
        raise error from exc


__all__ = [
    "Equivalent",
    "MissingDoubleBackwardError",
    "SafeModeLatch",
    "SecondOrderSafeMode",
    "attention_math",
    "embedding_bag_gathered",
    "explain_missing_derivatives",
    "hardsigmoid_relu6",
    "missing_derivative",
    "register_equivalent",
    "registered_equivalents",
    "second_order_safe",
    "unregister_equivalent",
]
