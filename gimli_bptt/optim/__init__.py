# SPDX-License-Identifier: Apache-2.0
"""Differentiable optimizers, and the registry from ``torch.optim`` classes to them."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .adam import ADAM, ADAMW, adam_step, adam_step_vjp
from .base import DiffOptimizer, Hyper, State, StepFn, StepVjpFn, clone_state, hyper_writer, step_all, step_vjp_all
from .derived import derive_step_vjp
from .sgd import SGD, sgd_step, sgd_step_vjp

# --- Adagrad, RMSprop, Adadelta, Adamax (issue 3, part a) ---
from .adadelta import ADADELTA, adadelta_step, adadelta_step_vjp
from .adagrad import ADAGRAD, adagrad_step, adagrad_step_vjp
from .adamax import ADAMAX, adamax_step, adamax_step_vjp
from .rmsprop import RMSPROP, rmsprop_step, rmsprop_step_vjp

_BUILT_IN_A = (ADAGRAD, RMSPROP, ADADELTA, ADAMAX)
# --- end of issue 3, part a ---
# --- issue 3, part B: NAdam, RAdam, ASGD, Rprop ---
from .asgd import ASGD, asgd_step, asgd_step_vjp
from .nadam import NADAM, nadam_step, nadam_step_vjp
from .radam import RADAM, radam_step, radam_step_vjp
from .rprop import RPROP, rprop_step, rprop_step_vjp

_BUILT_IN_B = (NADAM, RADAM, ASGD, RPROP)
# --- end part B ---

_REGISTRY: dict[type, DiffOptimizer] = {}


def _register(impl: DiffOptimizer) -> None:
    _REGISTRY[impl.torch_cls] = impl


for _impl in (SGD, ADAM, ADAMW):
    _register(_impl)
for _impl in _BUILT_IN_A + _BUILT_IN_B:  # issue 3, parts a and B
    _register(_impl)


def supported_optimizers() -> list[str]:
    """Names of the optimizer classes that have a differentiable implementation."""
    return sorted(impl.name for impl in _REGISTRY.values())


def get_optimizer(opt: torch.optim.Optimizer | type) -> DiffOptimizer:
    """The differentiable implementation of an optimizer instance or class.

    Looks up the exact class first, then its bases (so a subclass that does not change the
    update is accepted).

    Raises:
        TypeError: if neither the class nor a base has an implementation.
    """
    cls = opt if isinstance(opt, type) else type(opt)
    for base in cls.__mro__:
        if base in _REGISTRY:
            return _REGISTRY[base]
    raise TypeError(
        f"gimli_bptt has no differentiable version of {cls.__module__}.{cls.__qualname__}; "
        f"supported optimizers: {', '.join(supported_optimizers())}. "
        "Use one of these as the inner optimizer, or add yours with gimli_bptt.register_optimizer"
    )


def register_optimizer(
    cls: type,
    step: StepFn,
    step_vjp: Optional[StepVjpFn] = None,
    *,
    hyper_names: Sequence[str],
    flag_names: Sequence[str] = (),
    init_state: Optional[Callable[[Tensor, Hyper], State]] = None,
    read_hyper: Optional[Callable[[Mapping[str, Any]], dict[str, Any]]] = None,
    write_hyper: Optional[Callable[[dict[str, Any], str, float], None]] = None,
    name: Optional[str] = None,
) -> DiffOptimizer:
    """Makes an optimizer class usable as the inner optimizer of ``GimliUpdater``.

    Args:
        cls: The optimizer class (a ``torch.optim.Optimizer`` subclass).
        step: ``step(theta, G, state, hyper) -> (theta_next, state_next)`` for one parameter
            tensor, out of place, with the same update as ``cls.step``. ``state`` is a dict
            in the class's own ``opt.state[p]`` naming; ``hyper`` maps each name of
            ``hyper_names`` (a float, or a tensor when learned) and ``flag_names`` to its value.
        step_vjp: Its vector-Jacobian product (see :class:`DiffOptimizer`). Without it, one is
            derived with ``torch.func.vjp`` of ``step``: exact, and slower.
        hyper_names: The float options of a param group that can be meta-learned.
        flag_names: Other options of a param group that ``step`` reads (booleans, ints).
        init_state: ``init_state(param, hyper) -> state`` for a parameter that has no state
            yet (default: an empty dict).
        read_hyper: Reads ``hyper`` from a param group (default: ``float(group[n])`` for each
            hyperparameter and ``group[n]`` for each flag).
        write_hyper: Writes a learned value back into a param group (default:
            ``group[name] = value``).
        name: Display name (default: the class name).

    Returns:
        The registered :class:`DiffOptimizer`.

    Example::

        def lion_step(theta, G, state, hyper):
            m = state["exp_avg"]
            update = torch.sign(torch.lerp(G, m, hyper["beta1"]))  # not differentiable in G
            ...
        register_optimizer(Lion, lion_step, hyper_names=("lr", "beta1", "beta2", "weight_decay"),
                           init_state=lambda p, h: {"exp_avg": torch.zeros_like(p)})
    """
    if not isinstance(cls, type):
        raise TypeError(f"register_optimizer needs the optimizer class, got {type(cls).__name__}")
    if not callable(step) or (step_vjp is not None and not callable(step_vjp)):
        raise TypeError("step and step_vjp must be callables")
    hyper_names = tuple(hyper_names)
    flag_names = tuple(flag_names)

    def default_read(group: Mapping[str, Any]) -> dict[str, Any]:
        missing = [n for n in hyper_names + flag_names if n not in group]
        if missing:
            raise KeyError(f"{cls.__name__} param groups lack {missing}; pass read_hyper= to register_optimizer")
        out: dict[str, Any] = {n: float(group[n]) for n in hyper_names}
        out.update({n: group[n] for n in flag_names})
        return out

    def import_state(torch_state: Mapping[str, Any], param: Tensor, hyper: Hyper) -> State:
        if len(torch_state) == 0:
            return dict(init_state(param, hyper)) if init_state is not None else {}
        return clone_state(torch_state)

    def export_state(state: State, param: Tensor) -> dict[str, Any]:
        return clone_state(state)

    impl = DiffOptimizer(
        name=name or cls.__name__,
        torch_cls=cls,
        hyper_names=hyper_names,
        flag_names=flag_names,
        state_keys=(),
        step=step,
        step_vjp=step_vjp if step_vjp is not None else derive_step_vjp(step),
        read_hyper=read_hyper or default_read,
        write_hyper=write_hyper or hyper_writer(),
        import_state=import_state,
        export_state=export_state,
        notes="registered" + ("" if step_vjp is not None else "; VJP derived with torch.func.vjp"),
    )
    _register(impl)
    return impl


def unregister_optimizer(cls: type) -> None:
    """Removes a registration made with :func:`register_optimizer` (built-ins cannot be removed)."""
    built_in = (SGD, ADAM, ADAMW) + _BUILT_IN_A + _BUILT_IN_B
    if cls in tuple(impl.torch_cls for impl in built_in):
        raise ValueError(f"{cls.__name__} is built in and cannot be unregistered")
    _REGISTRY.pop(cls, None)


__all__ = [
    "ADAM",
    "ADAMW",
    "SGD",
    # issue 3, part a
    "ADADELTA",
    "ADAGRAD",
    "ADAMAX",
    "RMSPROP",
    "adadelta_step",
    "adadelta_step_vjp",
    "adagrad_step",
    "adagrad_step_vjp",
    "adamax_step",
    "adamax_step_vjp",
    "rmsprop_step",
    "rmsprop_step_vjp",
    # end of issue 3, part a
    "DiffOptimizer",
    "Hyper",
    "State",
    "adam_step",
    "adam_step_vjp",
    # issue 3, part B
    "ASGD",
    "NADAM",
    "RADAM",
    "RPROP",
    "asgd_step",
    "asgd_step_vjp",
    "nadam_step",
    "nadam_step_vjp",
    "radam_step",
    "radam_step_vjp",
    "rprop_step",
    "rprop_step_vjp",
    "derive_step_vjp",
    "get_optimizer",
    "register_optimizer",
    "sgd_step",
    "sgd_step_vjp",
    "step_all",
    "step_vjp_all",
    "supported_optimizers",
    "unregister_optimizer",
]
