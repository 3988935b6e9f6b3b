# SPDX-License-Identifier: Apache-2.0
"""register_optimizer: a third-party optimizer (Lion, defined here), with and without a hand-written VJP."""
from __future__ import annotations

import copy
from typing import Any, Iterator

import pytest
import torch
from torch import Tensor

from gimli_bptt import GimliUpdater, register_optimizer, unregister_optimizer
from gimli_bptt.optim import get_optimizer
from gimli_bptt.optim.adjoints import add_bar
from gimli_bptt.testing import check_hypergradients, float64_rtol, relative_error

from problems import build_model, ce_loss, make_batches


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al., 2023), written as a stock torch optimizer."""

    def __init__(self, params: Any, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, beta1=betas[0], beta2=betas[1], weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                c = group["beta1"] * m + (1 - group["beta1"]) * p.grad
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(torch.sign(c), alpha=-group["lr"])
                m.mul_(group["beta2"]).add_(p.grad, alpha=1 - group["beta2"])


def lion_step(theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    m, b1, b2, lr, wd = state["exp_avg"], hyper["beta1"], hyper["beta2"], hyper["lr"], hyper["weight_decay"]
    c = b1 * m + (1 - b1) * G
    return theta * (1 - lr * wd) - lr * torch.sign(c), {"exp_avg": b2 * m + (1 - b2) * G}


def lion_step_vjp(theta: Tensor, G: Tensor, state: dict[str, Any], hyper: dict[str, Any], theta_bar: Tensor,
                  state_bar: dict[str, Any]) -> tuple[Tensor, Tensor, dict[str, Any], dict[str, Tensor]]:
    # sign() has derivative 0 away from 0: G and m reach θ' only through the new buffer.
    m, b1, b2, lr, wd = state["exp_avg"], hyper["beta1"], hyper["beta2"], hyper["lr"], hyper["weight_decay"]
    c = b1 * m + (1 - b1) * G
    m_bar = state_bar.get("exp_avg", torch.zeros_like(m))
    bars: dict[str, Tensor] = {}
    add_bar(bars, hyper, "lr", lambda: -(wd * theta + torch.sign(c)) * theta_bar)
    add_bar(bars, hyper, "weight_decay", lambda: -lr * theta * theta_bar)
    add_bar(bars, hyper, "beta2", lambda: (m - G) * m_bar)
    add_bar(bars, hyper, "beta1", lambda: torch.zeros_like(theta))
    return theta_bar * (1 - lr * wd), (1 - b2) * m_bar, {"exp_avg": b2 * m_bar}, bars


@pytest.fixture(params=["hand-written VJP", "derived VJP"])
def lion(request: pytest.FixtureRequest) -> Iterator[str]:
    vjp = lion_step_vjp if request.param == "hand-written VJP" else None
    register_optimizer(Lion, lion_step, vjp, hyper_names=("lr", "beta1", "beta2", "weight_decay"),
                       init_state=lambda p, h: {"exp_avg": torch.zeros_like(p)})
    yield request.param
    unregister_optimizer(Lion)


def test_registered_step_matches_the_class(lion: str) -> None:
    model = build_model("mlp")
    twin = copy.deepcopy(model)
    opt = Lion(model.parameters(), lr=1e-2, weight_decay=0.1)
    up = GimliUpdater(model, opt, ce_loss, ce_loss, unroll=2, learn=["lr"])
    twin_opt = Lion(twin.parameters(), lr=1e-2, weight_decay=0.1)
    for batch in make_batches(4)[0]:
        up.train_step(batch)
        twin_opt.zero_grad()
        ce_loss(twin, batch).backward()
        twin_opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):  # J = 4 Lion steps: rounding grows 1.8 times
        assert relative_error(a, b) <= float64_rtol(terms=1, condition=10)


@pytest.mark.parametrize("gran", ["group", "tensor", "element"])
def test_registered_optimizer_hypergradients(lion: str, gran: str) -> None:
    model = build_model("mlp_bn", seed=3)
    opt = Lion(model.parameters(), lr=1e-2, weight_decay=0.1)
    up = GimliUpdater(model, opt, ce_loss, ce_loss, unroll=4, learn={n: gran for n in ("lr", "beta2", "weight_decay")},
                      learn_init=True)
    batches, val = make_batches(4, seed=3)
    errors = check_hypergradients(up, batches, val)
    assert max(errors.values()) <= 1e-9, errors
    assert float(up.hypergradient(batches, val).hypergrads["lr"][0].abs().sum() if gran != "element"
                 else up.hypergradient(batches, val).hypergrads["lr"][0].abs().sum()) > 0


def test_derived_and_hand_written_vjps_agree() -> None:
    results = []
    for vjp in (lion_step_vjp, None):
        register_optimizer(Lion, lion_step, vjp, hyper_names=("lr", "beta1", "beta2", "weight_decay"),
                           init_state=lambda p, h: {"exp_avg": torch.zeros_like(p)})
        try:
            model = build_model("mlp", seed=2)
            up = GimliUpdater(model, Lion(model.parameters(), lr=1e-2, weight_decay=0.1), ce_loss, ce_loss,
                              unroll=3, learn={"lr": "tensor", "beta2": "group"}, learn_init=True)
            results.append(up.hypergradient(*make_batches(3, seed=2)).hypergrads)
        finally:
            unregister_optimizer(Lion)
    for name, value in results[0].items():
        # the derived VJP (autograd through lion_step) and the hand-written one round differently; Lion on
        # the MLP, J = 3, grows the rounding 3.5 times (hypergradient_amplification)
        assert relative_error(value, results[1][name]) <= float64_rtol(terms=1, condition=10), name


def test_registration_errors() -> None:
    with pytest.raises(TypeError, match="needs the optimizer class"):
        register_optimizer(Lion(build_model("mlp").parameters()), lion_step, hyper_names=("lr",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="built in"):
        unregister_optimizer(torch.optim.SGD)
    with pytest.raises(TypeError, match="register_optimizer"):
        get_optimizer(Lion)
