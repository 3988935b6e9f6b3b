# SPDX-License-Identifier: Apache-2.0
"""The table of optimizer configurations, and helpers, shared by the differentiable-optimizer tests."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import pytest
import torch
from torch import Tensor

from gimli_bptt.optim import DiffOptimizer, get_optimizer

DTYPE = torch.float64

#: Shapes of the parameter tensors of each of the two param groups (0-d and odd sizes included).
GROUP_SHAPES: tuple[tuple[tuple[int, ...], ...], ...] = (((), (3, 5)), ((7,), (2, 1, 3)))

#: The granularities of a hyperparameter: a Python float (fixed), a 0-d tensor (learned per
#: group or tensor), a tensor shaped like the parameter (learned per element).
GRANULARITIES = ("float", "0d", "element")


@dataclass(frozen=True)
class OptimCase:
    """One optimizer configuration: the ``torch.optim`` class, its kwargs (the first param
    group's hyperparameters) and the overrides of the second param group."""

    id: str
    torch_cls: type
    kwargs: dict[str, Any]
    group2: dict[str, Any] = field(default_factory=dict)

    @property
    def impl(self) -> DiffOptimizer:
        return get_optimizer(self.torch_cls)

    @property
    def is_adam(self) -> bool:
        return issubclass(self.torch_cls, torch.optim.Adam)

    def __repr__(self) -> str:
        return self.id


SGD, Adam, AdamW = torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW

CASES: list[OptimCase] = [
    OptimCase("sgd-plain", SGD, dict(lr=0.1), dict(lr=0.03)),
    OptimCase("sgd-momentum", SGD, dict(lr=0.05, momentum=0.9), dict(lr=0.02, momentum=0.5)),
    OptimCase("sgd-dampening", SGD, dict(lr=0.05, momentum=0.9, dampening=0.3), dict(dampening=0.7)),
    OptimCase("sgd-nesterov", SGD, dict(lr=0.05, momentum=0.8, nesterov=True), dict(lr=0.1, momentum=0.6)),
    OptimCase("sgd-weight_decay", SGD, dict(lr=0.1, weight_decay=0.05), dict(weight_decay=0.0)),
    OptimCase("sgd-maximize", SGD, dict(lr=0.1, maximize=True), dict(lr=0.02, weight_decay=0.1)),
    OptimCase("sgd-momentum-dampening-wd-maximize", SGD,
              dict(lr=0.03, momentum=0.7, dampening=0.2, weight_decay=0.05, maximize=True),
              dict(lr=0.05, momentum=0.4, dampening=0.0, weight_decay=0.01)),
    OptimCase("sgd-nesterov-wd-maximize", SGD,
              dict(lr=0.04, momentum=0.6, nesterov=True, weight_decay=0.02, maximize=True),
              dict(momentum=0.9, weight_decay=0.0)),
    OptimCase("adam-default", Adam, dict(), dict(lr=0.01)),
    OptimCase("adam-amsgrad", Adam, dict(lr=0.01, amsgrad=True), dict(lr=0.003, betas=(0.8, 0.9))),
    OptimCase("adam-weight_decay", Adam, dict(lr=0.01, weight_decay=0.1), dict(weight_decay=0.0)),
    OptimCase("adam-maximize", Adam, dict(lr=0.01, maximize=True), dict(eps=1e-4)),
    OptimCase("adam-amsgrad-maximize-wd", Adam, dict(lr=0.01, amsgrad=True, maximize=True, weight_decay=0.05),
              dict(lr=0.02, weight_decay=0.2, betas=(0.5, 0.99))),
    OptimCase("adam-betas-eps", Adam, dict(lr=0.02, betas=(0.8, 0.99), eps=1e-3), dict(betas=(0.95, 0.9), eps=1e-6)),
    OptimCase("adam-decoupled_weight_decay", Adam, dict(lr=0.01, weight_decay=0.05, decoupled_weight_decay=True),
              dict(weight_decay=0.2)),
    OptimCase("adamw-default", AdamW, dict(), dict(lr=0.01, weight_decay=0.0)),
    OptimCase("adamw-amsgrad", AdamW, dict(lr=0.01, amsgrad=True), dict(lr=0.003, betas=(0.8, 0.9))),
    OptimCase("adamw-weight_decay", AdamW, dict(lr=0.01, weight_decay=0.1), dict(weight_decay=0.5)),
    OptimCase("adamw-maximize", AdamW, dict(lr=0.01, maximize=True), dict(eps=1e-4)),
    OptimCase("adamw-amsgrad-maximize-wd", AdamW, dict(lr=0.01, amsgrad=True, maximize=True, weight_decay=0.05),
              dict(lr=0.02, weight_decay=0.2, betas=(0.5, 0.99))),
    OptimCase("adamw-betas-eps", AdamW, dict(lr=0.02, betas=(0.8, 0.99), eps=1e-3), dict(betas=(0.95, 0.9), eps=1e-6)),
]

# --- Adagrad, RMSprop, Adadelta, Adamax (issue 3, part a) ---
# Adagrad's initial_accumulator_value is never overridden in group 2: torch fills every state
# from the constructor's value (Note [Adagrad's initial accumulator]).
Adagrad, RMSprop, Adadelta, Adamax = torch.optim.Adagrad, torch.optim.RMSprop, torch.optim.Adadelta, torch.optim.Adamax
CASES += [
    OptimCase("adagrad-default", Adagrad, dict(lr=0.1), dict(lr=0.05)),
    OptimCase("adagrad-lr_decay-wd", Adagrad, dict(lr=0.1, lr_decay=0.05, weight_decay=0.1),
              dict(lr_decay=0.2, weight_decay=0.0)),
    OptimCase("adagrad-init_acc-eps-maximize", Adagrad,
              dict(lr=0.05, initial_accumulator_value=0.1, eps=1e-6, maximize=True), dict(lr=0.1, lr_decay=0.01)),
    OptimCase("rmsprop-default", RMSprop, dict(lr=0.01), dict(alpha=0.9)),
    OptimCase("rmsprop-centered", RMSprop, dict(lr=0.01, centered=True), dict(alpha=0.8, eps=1e-4)),
    OptimCase("rmsprop-momentum-wd", RMSprop, dict(lr=0.01, momentum=0.9, weight_decay=0.1),
              dict(momentum=0.0, weight_decay=0.0)),
    OptimCase("rmsprop-centered-momentum-wd-maximize", RMSprop,
              dict(lr=0.005, alpha=0.95, centered=True, momentum=0.5, weight_decay=0.05, maximize=True),
              dict(lr=0.01, momentum=0.8)),
    OptimCase("adadelta-default", Adadelta, dict(), dict(lr=0.5)),
    OptimCase("adadelta-rho-eps-wd", Adadelta, dict(lr=0.5, rho=0.8, eps=1e-4, weight_decay=0.1),
              dict(rho=0.95, weight_decay=0.0)),
    OptimCase("adadelta-maximize", Adadelta, dict(lr=1.0, maximize=True), dict(lr=0.3, eps=1e-3)),
    OptimCase("adamax-default", Adamax, dict(), dict(lr=0.01)),
    OptimCase("adamax-betas-eps-wd", Adamax, dict(lr=0.01, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1),
              dict(betas=(0.95, 0.99), weight_decay=0.0)),
    OptimCase("adamax-maximize", Adamax, dict(lr=0.02, maximize=True), dict(eps=1e-4)),
]
# --- end of issue 3, part a ---


def case_params(cases: Sequence[OptimCase] = CASES) -> list[Any]:
    """``pytest.param`` per case, with its readable id."""
    return [pytest.param(c, id=c.id) for c in cases]


def make_torch_optimizer(case: OptimCase, params: Sequence[Tensor], kernel: str = "for_loop",
                         ) -> torch.optim.Optimizer:
    """``case``'s optimizer over two param groups (split as :data:`GROUP_SHAPES`).

    ``kernel`` picks torch's implementation: ``"for_loop"`` (the CPU default), ``"foreach"``
    or ``"fused"`` (the defaults on accelerators).
    """
    n1 = len(GROUP_SHAPES[0])
    groups = [{"params": list(params[:n1])}, {"params": list(params[n1:]), **case.group2}]
    if not groups[1]["params"]:
        groups = groups[:1]
    extra = {"for_loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[kernel]
    return case.torch_cls(groups, **case.kwargs, **extra)


def group_hyper(case: OptimCase, group: int = 0) -> dict[str, Any]:
    """The hyper dict (floats and flags) that ``read_hyper`` gives for one of ``case``'s groups."""
    params = [torch.nn.Parameter(torch.zeros(1, dtype=DTYPE)) for _ in range(2)]
    opt = case.torch_cls([{"params": params[:1]}, {"params": params[1:], **case.group2}], **case.kwargs)
    return case.impl.read_hyper(opt.param_groups[group])


def learn(hyper: Mapping[str, Any], names: Sequence[str], granularity: str, like: Tensor) -> dict[str, Any]:
    """A copy of ``hyper`` whose ``names`` are turned into tensors of the given granularity."""
    out = dict(hyper)
    if granularity == "float":
        return out
    for name in names:
        value = float(hyper[name])
        if granularity == "0d":
            out[name] = torch.tensor(value, dtype=DTYPE)
        elif granularity == "element":
            out[name] = torch.full_like(like, value, dtype=DTYPE)
        else:
            raise ValueError(granularity)
    return out


def random_like(shape: Sequence[int], gen: torch.Generator) -> Tensor:
    return torch.randn(tuple(shape), generator=gen, dtype=DTYPE)


def tensor_keys(state: Mapping[str, Any]) -> list[str]:
    """The keys of the differentiable (tensor) entries of one tensor's state, sorted."""
    return sorted(k for k, v in state.items() if isinstance(v, Tensor))


def rel_err(actual: Tensor, expected: Tensor, floor: float = 0.0) -> float:
    """max |actual - expected| / max(max |expected|, floor) (the absolute error where both are 0).

    ``floor`` is the size of the terms that cancel in ``expected`` where it is much smaller
    than they are: neither side can then be more accurate than round-off of those terms.
    """
    actual, expected = torch.as_tensor(actual, dtype=DTYPE), torch.as_tensor(expected, dtype=DTYPE)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.numel() == 0:
        return 0.0
    diff = (actual - expected).abs().max().item()
    scale = max(expected.abs().max().item(), floor)
    return diff / scale if scale > 0 else diff


def assert_rel(actual: Tensor, expected: Tensor, tol: float, what: str, floor: float = 0.0) -> None:
    assert torch.isfinite(torch.as_tensor(actual)).all(), f"{what}: not finite: {actual}"
    err = rel_err(actual, expected, floor)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}\nactual={actual}\nexpected={expected}"


# --------------------------------------------------------------------------------------------
# Issue 3, part B: NAdam, RAdam, ASGD, Rprop.
# --------------------------------------------------------------------------------------------

NAdam, RAdam, ASGD, Rprop = torch.optim.NAdam, torch.optim.RAdam, torch.optim.ASGD, torch.optim.Rprop

CASES_B: list[OptimCase] = [
    OptimCase("nadam-default", NAdam, dict(lr=0.01), dict(lr=0.003, momentum_decay=0.01)),
    OptimCase("nadam-weight_decay", NAdam, dict(lr=0.01, weight_decay=0.1), dict(weight_decay=0.0, betas=(0.8, 0.99))),
    OptimCase("nadam-decoupled_weight_decay", NAdam, dict(lr=0.01, weight_decay=0.05, decoupled_weight_decay=True),
              dict(weight_decay=0.2, momentum_decay=0.0)),
    OptimCase("nadam-maximize-betas-eps", NAdam, dict(lr=0.02, betas=(0.8, 0.99), eps=1e-3, maximize=True,
                                                     momentum_decay=0.1), dict(betas=(0.95, 0.9), eps=1e-6)),
    # RAdam rectifies from step 6 (beta2 >= 0.9) or step 10 (beta2 = 0.7): 20 steps see both branches.
    OptimCase("radam-default", RAdam, dict(lr=0.01), dict(lr=0.003, betas=(0.8, 0.9))),
    OptimCase("radam-weight_decay", RAdam, dict(lr=0.01, weight_decay=0.1), dict(weight_decay=0.0)),
    OptimCase("radam-decoupled_weight_decay", RAdam, dict(lr=0.01, weight_decay=0.05, decoupled_weight_decay=True),
              dict(weight_decay=0.2)),
    OptimCase("radam-maximize-betas-eps", RAdam, dict(lr=0.02, betas=(0.8, 0.99), eps=1e-3, maximize=True),
              dict(betas=(0.95, 0.7), eps=1e-6)),
    OptimCase("asgd-default", ASGD, dict(lr=0.01), dict(lr=0.05, lambd=1e-3)),
    OptimCase("asgd-t0", ASGD, dict(lr=0.02, lambd=0.01, alpha=0.5, t0=3.0), dict(t0=0.0, alpha=1.0)),
    OptimCase("asgd-weight_decay-maximize", ASGD, dict(lr=0.01, lambd=0.05, t0=5.0, weight_decay=0.1, maximize=True),
              dict(lr=0.1, weight_decay=0.0)),
    OptimCase("rprop-default", Rprop, dict(lr=0.01), dict(lr=0.002, etas=(0.3, 1.5))),
    # Tight step-size bounds: both clamps act within a few steps.
    OptimCase("rprop-clamped", Rprop, dict(lr=0.01, step_sizes=(0.004, 0.015)),
              dict(etas=(0.4, 1.1), step_sizes=(0.008, 0.02))),
    OptimCase("rprop-maximize", Rprop, dict(lr=0.01, maximize=True, step_sizes=(1e-3, 0.05)), dict(lr=0.03)),
]
CASES += CASES_B
