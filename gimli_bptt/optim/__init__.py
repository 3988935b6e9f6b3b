# SPDX-License-Identifier: Apache-2.0
"""Differentiable optimizers: one module per ``torch.optim`` optimizer, and the registry of their declarations.

Adding an optimizer is one module here (its ``step``, ``step_vjp``, ``step_jvp`` and
:class:`DiffOptimizer` row) and one entry of :data:`BUILT_IN`; ``tests/optim_table.py`` then
tests it with every oracle once it has a row there (CONTRIBUTING.md).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .._typing import Hyper, State
from ..metaparams.declaration import Hyperparameter
from .adadelta import ADADELTA
from .adafactor import ADAFACTOR
from .adagrad import ADAGRAD
from .adam import ADAM, ADAMW
from .adamax import ADAMAX
from .asgd import ASGD
from .base import DiffOptimizer, StepFn, StepJvpFn, StepVjpFn
from .declarations import Flag, FlatLayout, StateEntry, declared
from .derived import derive_step_jvp, derive_step_vjp
from .muon import MUON
from .nadam import NADAM
from .radam import RADAM
from .rmsprop import RMSPROP
from .rprop import RPROP
from .sgd import SGD

#: The registry: one declaration per ``torch.optim`` optimizer (every per-parameter one; LBFGS
#: and SparseAdam are not per-parameter updates).
BUILT_IN: tuple[DiffOptimizer, ...] = (
    SGD, ADAM, ADAMW, ADAGRAD, RMSPROP, ADADELTA, ADAMAX, NADAM, RADAM, ASGD, RPROP,
    ADAFACTOR,
    MUON,
)

_REGISTRY: dict[type, DiffOptimizer] = {impl.torch_cls: impl.validate() for impl in BUILT_IN}


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
    hyper_names: Sequence[Union[str, Hyperparameter]],
    flag_names: Sequence[Union[str, Flag]] = (),
    state: Optional[Sequence[StateEntry]] = None,
    init_state: Optional[Callable[[Tensor, Hyper], State]] = None,
    counts_steps: bool = False,
    elementwise: bool = True,
    name: Optional[str] = None,
    step_jvp: Optional[StepJvpFn] = None,
) -> DiffOptimizer:
    """Makes an optimizer class usable as the inner optimizer of ``GimliUpdater``.

    The optimizer is declared as the built-in ones are (:class:`DiffOptimizer`), so it gets
    the same reading and writing of param groups, state import and export and projection.

    Args:
        cls: The optimizer class (a ``torch.optim.Optimizer`` subclass).
        step: ``step(theta, G, state, hyper) -> (theta_next, state_next)`` for one parameter
            tensor, out of place, with the same update as ``cls.step``. ``state`` is a dict
            in the class's own ``opt.state[p]`` naming; ``hyper`` maps each hyperparameter
            (a float, or a tensor when learned) and each flag to its value.
        step_vjp: Its vector-Jacobian product (see :class:`DiffOptimizer`). Without it, one is
            derived with ``torch.func.vjp`` of ``step``: exact, and slower.
        hyper_names: The float options of a param group that can be meta-learned: names (read
            as ``float(group[name])``; ``lr``, ``beta1``... get their usual valid range), or
            :class:`Hyperparameter` declarations (a tuple option such as ``betas``, a range).
        flag_names: Other options of a param group that ``step`` reads: names (read as
            ``group[name]``, default False) or :class:`Flag` declarations.
        state: The tensor entries of ``opt.state[p]`` (:class:`StateEntry`); or give ``init_state``.
        init_state: ``init_state(param, hyper) -> state`` for a parameter that has no state
            yet (default: an empty dict); an existing ``opt.state[p]`` is copied as it is.
        counts_steps: The state holds ``torch.optim``'s step count ``"step"`` (with ``state``).
        elementwise: The step acts on each element alone.
        name: Display name (default: the class name).
        step_jvp: Its Jacobian-vector product (see :class:`DiffOptimizer`), for forward-mode
            hypergradients. Without it, one is derived with ``torch.func.jvp`` of ``step``
            (:attr:`DiffOptimizer.jvp`): exact, and slower.

    Returns:
        The registered :class:`DiffOptimizer`.

    Example::

        def lion_step(theta, G, state, hyper):
            m = state["exp_avg"]
            update = torch.sign(torch.lerp(G, m, hyper["beta1"]))  # not differentiable in G
            ...
        register_optimizer(Lion, lion_step, hyper_names=("lr", "beta1", "beta2", "weight_decay"),
                           state=(StateEntry("exp_avg"),))
    """
    if not isinstance(cls, type):
        raise TypeError(f"register_optimizer needs the optimizer class, got {type(cls).__name__}")
    if not callable(step) or (step_vjp is not None and not callable(step_vjp)):
        raise TypeError("step and step_vjp must be callables")
    if step_jvp is not None and not callable(step_jvp):
        raise TypeError("step_jvp must be a callable (or None: derived with torch.func.jvp)")
    if state is not None and init_state is not None:
        raise ValueError("give the state as entries (state=) or as a function (init_state=), not both")
    impl = DiffOptimizer(
        name=name or cls.__name__,
        torch_cls=cls,
        step=step,
        step_vjp=step_vjp if step_vjp is not None else derive_step_vjp(step),
        hyper=declared(hyper_names),
        flags=tuple(f if isinstance(f, Flag) else Flag(f) for f in flag_names),
        state=tuple(state) if state is not None else None,
        counts_steps=counts_steps,
        init_state=init_state,
        elementwise=elementwise,
        notes="registered" + ("" if step_vjp is not None else "; VJP derived with torch.func.vjp")
              + ("" if step_jvp is not None else "; JVP derived with torch.func.jvp"),
        step_jvp=step_jvp,
    ).validate()
    _REGISTRY[cls] = impl
    return impl


def unregister_optimizer(cls: type) -> None:
    """Removes a registration made with :func:`register_optimizer` (built-ins cannot be removed)."""
    if cls in tuple(impl.torch_cls for impl in BUILT_IN):
        raise ValueError(f"{cls.__name__} is built in and cannot be unregistered")
    _REGISTRY.pop(cls, None)


__all__ = [
    "ADADELTA",
    "ADAFACTOR",
    "ADAGRAD",
    "ADAM",
    "ADAMAX",
    "ADAMW",
    "ASGD",
    "BUILT_IN",
    "MUON",
    "NADAM",
    "RADAM",
    "RMSPROP",
    "RPROP",
    "SGD",
    "DiffOptimizer",
    "Flag",
    "FlatLayout",
    "Hyper",
    "Hyperparameter",
    "State",
    "StateEntry",
    "derive_step_jvp",
    "derive_step_vjp",
    "get_optimizer",
    "register_optimizer",
    "supported_optimizers",
    "unregister_optimizer",
]
