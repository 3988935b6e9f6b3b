# SPDX-License-Identifier: Apache-2.0
"""The first-use self-check of the fused kernels (Note [Kernel self-check] in ``kernels/selfcheck.py``).

A wrong kernel is injected by replacing the loaded op with one that perturbs an output: the
check must warn once, naming the op, the device and the error, and from then on the pure twin
must run on that device (``kernels="auto"`` gives the twin's numbers, the broken op is never
called again); ``GIMLI_KERNEL_SELFCHECK=0`` skips it; a perturbation of an ulp passes.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable

import pytest
import torch
from torch import nn

from gimli_bptt import GimliUpdater, kernels
from gimli_bptt.kernels import ops, selfcheck
from gimli_bptt.kernels.flat import clear_plans

pytestmark = pytest.mark.skipif(os.environ.get("GIMLI_DISABLE_KERNELS") == "1", reason="GIMLI_DISABLE_KERNELS=1")
CPU = torch.device("cpu")


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU kernels loaded, and no self-check run yet in this process (restored afterwards)."""
    assert kernels.is_available("cpu"), f"CPU kernels did not build: {ops.load_error()!r}"
    monkeypatch.delenv("GIMLI_KERNEL_SELFCHECK", raising=False)
    monkeypatch.setattr(selfcheck, "_results", {})
    clear_plans()  # cached plans remember which implementation their buckets chose
    yield
    clear_plans()


def _break(monkeypatch: pytest.MonkeyPatch, name: str, output: int,
           perturb: Callable[[torch.Tensor], torch.Tensor]) -> list[int]:
    """Replaces ``torch.ops.gimli.<name>`` by the real op with ``perturb`` applied to one output; returns a call counter."""
    real = getattr(torch.ops.gimli, name)
    calls = [0]

    def broken(*args: Any) -> Any:
        calls[0] += 1
        out = list(real(*args))
        out[output] = perturb(out[output])
        return tuple(out)

    monkeypatch.setattr(torch.ops.gimli, name, broken)
    return calls


def _one_element_off(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[4100] += 1e-6 * x.abs().max()  # an indexing bug's size is the scale itself; this is far smaller
    return x


def _hypergrads(kernel_impl: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g))
               for _ in range(4)]
    loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    up = GimliUpdater(model, opt, loss, loss, unroll=3, kernels=kernel_impl, learn=["lr", "weight_decay"])
    result = up.hypergradient(batches[:3], batches[3])
    return {k: torch.stack([t.reshape(()) for t in v]) if isinstance(v, (list, tuple)) else v
            for k, v in result.hypergrads.items()}


def test_the_real_kernels_pass_without_a_warning(fresh: None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.is_available("cpu")
    assert selfcheck.failure(CPU) is None and selfcheck._results == {("cpu", None): None}


@pytest.mark.parametrize("name, output", [("adam_step_vjp", 1), ("sgd_step", 0)])
def test_a_wrong_kernel_warns_once_and_the_twin_runs(fresh: None, monkeypatch: pytest.MonkeyPatch, name: str,
                                                     output: int) -> None:
    calls = _break(monkeypatch, name, output, _one_element_off)
    with pytest.warns(RuntimeWarning) as record:
        assert not kernels.is_available("cpu")
    messages = [str(w.message) for w in record if "self-check" in str(w.message)]
    assert len(messages) == 1, messages
    assert f"{name} (torch.float64) is off by" in messages[0] and "failed on cpu" in messages[0]
    assert "times the tolerance" in messages[0] and "GIMLI_KERNEL_SELFCHECK=0" in messages[0]
    checked = calls[0]
    assert checked > 0
    theta = torch.zeros(3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, whatever runs next
        assert kernels.select_impl([theta], "auto") == "reference"
        with pytest.raises(RuntimeError, match=f"fused kernels requested but cannot run: .*self-check.*{name}"):
            kernels.select_impl([theta], "fused")
        auto, twin = _hypergrads("auto"), _hypergrads("reference")
        assert not kernels.is_available("cpu")
    assert calls[0] == checked, "the broken op ran again after the self-check"
    assert auto.keys() == twin.keys() and all(torch.equal(auto[k], twin[k]) for k in twin)


def test_an_op_that_raises_fails_the_check(fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(_: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    _break(monkeypatch, "sgd_step_vjp", 0, fail)
    with pytest.warns(RuntimeWarning, match="sgd_step_vjp .* raised RuntimeError: CUDA error: an illegal memory"):
        assert not kernels.is_available("cpu")


def test_an_ulp_is_inside_the_tolerance(fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not bit-equality: a last-bit difference everywhere (another GPU's rounding) passes."""
    _break(monkeypatch, "adam_step_vjp", 0, lambda x: torch.nextafter(x, torch.full_like(x, float("inf"))))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.is_available("cpu")


def test_the_environment_variable_skips_it(fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _break(monkeypatch, "adam_step", 0, _one_element_off)
    monkeypatch.setenv("GIMLI_KERNEL_SELFCHECK", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.is_available("cpu")
    assert calls[0] == 0 and selfcheck.failure(CPU) is None


def test_once_per_device(fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check runs at the first use on a device only; later calls read its result."""
    calls = _break(monkeypatch, "sgd_step", 0, lambda x: x)
    assert kernels.is_available("cpu") and kernels.is_available(torch.device("cpu"))
    assert calls[0] == 4  # sgd_step under two flag sets, in float32 and float64, once
