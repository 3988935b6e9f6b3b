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

The package, by responsibility: :mod:`.registry` (the functions and their equivalents, `register_equivalent`),
:mod:`.equivalents` (the built-in entries), :mod:`.safe_mode` (the `TorchFunctionMode`, `second_order_safe`, the
latch that skips it) and :mod:`.diagnosis` (`MissingDoubleBackwardError`: which op, which module, which fix).
"""
from __future__ import annotations

from .registry import Equivalent, register_equivalent, registered_equivalents, unregister_equivalent
from .equivalents import attention_math, embedding_bag_gathered, hardsigmoid_relu6  # registers the built-in entries
from .safe_mode import SafeModeLatch, SecondOrderSafeMode, second_order_safe
from .diagnosis import MissingDoubleBackwardError, explain_missing_derivatives, missing_derivative

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
