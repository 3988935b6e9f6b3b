# SPDX-License-Identifier: Apache-2.0
"""``gimli_bptt.engine.grad``: autograd's engine called directly (the private
``torch.autograd.graph._engine_run_backward``) and the public ``torch.autograd.grad`` it falls back
to give the same bits, per call and for whole hypergradients.

The comparisons are ``torch.equal``, bit-exact by construction: ``torch.autograd.grad`` normalises
its arguments and then calls the same engine function with the same graph, roots, cotangents
(ones for a scalar output, the same values in the same dtype) and inputs, so both run the same
backward kernels in the same order.
"""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch import Tensor

from gimli_bptt import GimliUpdater, engine

from optim_table import row
from problems import build_model, ce_loss, make_batches


@pytest.fixture
def private_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls into the private entry point (so a test knows the fast path was taken)."""
    if engine._engine_run_backward is None:
        pytest.skip("this torch has no torch.autograd.graph._engine_run_backward")
    calls: list[int] = []
    real = engine._engine_run_backward

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_engine_run_backward", counting)
    return calls


def _both_paths(monkeypatch: pytest.MonkeyPatch, run: Callable[[], Any]) -> tuple[Any, Any]:
    """``run()`` with the private entry point, then with it removed (the fallback to torch.autograd.grad)."""
    fast = run()
    with monkeypatch.context() as m:
        m.setattr(engine, "_engine_run_backward", None)
        public = run()
    return fast, public


def test_one_inner_step_gradient_and_hvp_equal_the_public_path(monkeypatch: pytest.MonkeyPatch,
                                                                private_calls: list[int]) -> None:
    """G_j with create_graph ([Alg.1 L5]) and the Hessian-vector product through it ([Alg.1 L13])."""
    model = build_model("mlp", seed=1)
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().requires_grad_() for p in model.parameters()]
    batch = make_batches(1, seed=1)[1]
    v = [torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]

    def run() -> list[Tensor]:
        loss = ce_loss(lambda x: torch.func.functional_call(model, dict(zip(names, params)), (x,)), batch)
        G = engine.grad([loss], params, create_graph=True)
        Hv = engine.grad(G, params, v)
        return [g.detach() for g in G] + list(Hv)

    fast, public = _both_paths(monkeypatch, run)
    assert len(private_calls) == 2  # the fast run took the private entry point, the other did not
    for a, b in zip(fast, public):
        assert torch.equal(a, b)


@pytest.mark.parametrize("hvp", ["rev", "fwd"])
def test_a_hypergradient_equals_the_public_path(hvp: str, monkeypatch: pytest.MonkeyPatch,
                                                private_calls: list[int]) -> None:
    """Adam with learned rates and β1, a learned loss weight and θ_0, BatchNorm: every hypergradient bit-equal."""
    def run() -> dict[str, Tensor]:
        model = build_model("mlp_bn", seed=3)
        scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        updater = GimliUpdater(model, row("adam-lr").for_model(model, True),
                               lambda m, b: scale * ce_loss(m, b), ce_loss, unroll=4,
                               learn={"lr": "tensor", "beta1": "group"}, loss_params={"scale": scale},
                               learn_init=True, hvp=hvp)
        return dict(updater.hypergradient(*make_batches(4, seed=3)).hypergrads)

    fast, public = _both_paths(monkeypatch, run)
    assert private_calls, "the default path did not call the private entry point"
    assert fast.keys() == public.keys()
    for name in fast:
        assert torch.equal(fast[name], public[name]), name
