# SPDX-License-Identifier: Apache-2.0
"""GimliUpdater on a GPU: host syncs per meta step and the deferred finiteness check.

Skipped without a GPU (CI has none; ``bench/gpu_check.sh`` runs these with the CUDA kernel tests).
The fused CUDA kernels' own tests are the ``cuda`` cases of ``test_kernels.py``.
"""
from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from gimli_bptt import GimliUpdater, Memory, NonFiniteError

from problems import build_model, ce_loss, make_batches
from snapshots import assert_unchanged, snapshot

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _cuda_updater(J: int, opt: str = "sgd", **kw: Any) -> GimliUpdater:
    model = build_model("mlp", seed=0).cuda()
    if opt == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return GimliUpdater(model, optimizer, ce_loss, ce_loss, unroll=J, learn={"lr": "group"}, progress=False, **kw)


def _cuda_batches(J: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    batches, val = make_batches(J)
    return [(x.cuda(), y.cuda()) for x, y in batches], (val[0].cuda(), val[1].cuda())


def _syncs_of_one_step(up: GimliUpdater, J: int) -> int:
    batches, val = _cuda_batches(J)
    up.step(batches, val)  # warm-up: kernels loaded, plans cached
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            up.step(batches, val)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("mode", [{}, {"memory": Memory(keep_graphs=True)}, {"memory": Memory(slots=2)}],
                         ids=["full", "keep_graphs", "slots"])
def test_cuda_host_syncs_do_not_grow_with_the_unroll(opt: str, mode: dict[str, Any]) -> None:
    # Note [Deferred finiteness check]: no host sync per inner step, so the host keeps queueing.
    short = _syncs_of_one_step(_cuda_updater(2, opt, **mode), 2)
    long = _syncs_of_one_step(_cuda_updater(8, opt, **mode), 8)
    # A meta step syncs at least once (the deferred finiteness check reads the J losses): no
    # warning at all means the sync debug mode caught nothing, and 0 == 0 would prove nothing.
    assert short >= 1, "torch.cuda.set_sync_debug_mode reported no host sync at all; the count is not working"
    assert long == short, f"{short} host syncs per meta step at J=2, {long} at J=8"


@pytest.mark.parametrize("where", [0, 2])
def test_cuda_nan_names_the_step_and_changes_nothing(where: int) -> None:
    up = _cuda_updater(3)
    batches, val = _cuda_batches(3)
    x, y = batches[where]
    x = x.clone()
    x[0, 0] = float("nan")
    batches[where] = (x, y)
    before = snapshot(up)
    with pytest.raises(NonFiniteError, match=f"inner step {where}"):
        up.step(batches, val)
    assert_unchanged(before, snapshot(up))


def test_cuda_hypergradients_match_the_cpu() -> None:
    results = []
    for device in ("cpu", "cuda"):
        model = build_model("mlp", seed=0).to(device)  # float64, as every test model
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        up = GimliUpdater(model, opt, ce_loss, ce_loss, unroll=4, learn={"lr": "group"}, progress=False)
        batches, val = make_batches(4)
        batches = [(x.to(device), y.to(device)) for x, y in batches]
        res = up.hypergradient(batches, (val[0].to(device), val[1].to(device)))
        results.append(res.hypergrads["lr"].detach().cpu())
    torch.testing.assert_close(results[1], results[0], rtol=1e-10, atol=1e-12)
