# SPDX-License-Identifier: Apache-2.0
"""``GimliUpdater(tasks=T)``: one sweep over a meta-batch of tasks equals the mean of T single-task calls."""
from __future__ import annotations

import copy
import functools
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from gimli_bptt import GimliUpdater, Memory
from gimli_bptt.metaparams import flat_list
from gimli_bptt.testing import float64_rtol

from optim_table import ROWS, Row
from problems import build_model, ce_loss
from snapshots import assert_unchanged, snapshot

TOL = 1e-10
DTYPE = torch.float64


def _task_batches(T: int, J: int, seed: int, n: int = 6) -> tuple[list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
    """J training batches and a validation batch of T tasks each, stacked along dimension 0."""
    g = torch.Generator().manual_seed(seed)

    def batch() -> tuple[Tensor, Tensor]:
        return torch.randn(T, n, 1, 6, 6, generator=g, dtype=DTYPE), torch.randint(0, 3, (T, n), generator=g)

    return [batch() for _ in range(J)], batch()


def _task(batch: Any, t: int) -> Any:
    return tuple(x[t] for x in batch)


def _updater(row: Row, arch: str, J: int, tasks: int | None, learn: dict[str, str], loss_params: bool = True,
             learn_init: bool = True, **options: Any) -> GimliUpdater:
    model = build_model(arch, seed=3)
    opt = row.for_model(model)
    w = torch.tensor(1e-2, dtype=DTYPE, requires_grad=True)

    def train_loss(m: Any, b: Any) -> Tensor:
        return ce_loss(m, b) + w * sum(p.pow(2).sum() for p in m.parameters())

    kw: dict[str, Any] = dict(loss_params={"w": w}) if loss_params else {}
    return GimliUpdater(model, opt, train_loss if loss_params else ce_loss, ce_loss, unroll=J, learn=learn,
                        learn_init=learn_init, tasks=tasks, **kw, **options)


def _mean_of_single_tasks(make: Callable[[], GimliUpdater], batches: list[Any], val: Any, T: int) -> dict[str, Any]:
    """The mean over the tasks of one hypergradient() per task, each on a fresh updater."""
    per_task = []
    for t in range(T):
        per_task.append(make().hypergradient([_task(b, t) for b in batches], _task(val, t)).hypergrads)
    return {name: [sum(flat_list(h[name])[i] for h in per_task) / T for i in range(len(flat_list(v)))]
            for name, v in per_task[0].items()}


def _assert_close(ours: dict[str, Any], expected: dict[str, Any], tol: float = TOL) -> None:
    assert ours.keys() == expected.keys()
    scale = max(float(t.abs().max()) for v in expected.values() for t in v)
    for name, v in ours.items():
        got = flat_list(v)
        assert len(got) == len(expected[name]), name
        for a, b in zip(got, expected[name]):
            assert a.shape == b.shape, (name, a.shape, b.shape)
            err = float((a - b).abs().max()) / max(float(b.abs().max()), 1e-4 * scale)
            assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def _learnable(row: Row, granularity: str) -> dict[str, str]:
    return {name: granularity for name in row.impl.hyper_names}


# --------------------------------------------------------------------------- every optimizer row
@pytest.mark.parametrize("granularity", ["tensor", "element"])
@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in ROWS if "hypergrad" not in r.skips])
def test_every_row_equals_the_mean_of_single_task_calls(row: Row, granularity: str) -> None:
    """Every hyperparameter learned, learn_init and a loss parameter, on a BatchNorm conv net
    whose tasks each use their own batch statistics."""
    T, J = 3, 2
    batches, val = _task_batches(T, J, seed=1)
    arch = "conv_bn" if row.shapes.accepts((3, 1, 3, 3)) else "mlp"
    learn = _learnable(row, granularity)
    ours = _updater(row, arch, J, T, learn).hypergradient(batches, val)
    expected = _mean_of_single_tasks(lambda: _updater(row, arch, J, None, learn), batches, val, T)
    _assert_close(ours.hypergrads, expected)
    assert ours.task_val_losses is not None and ours.task_val_losses.shape == (T,)
    assert ours.train_losses.shape == (J, T)
    assert torch.allclose(ours.val_loss, ours.task_val_losses.mean())


# --------------------------------------------------------------------------- random property test
_ROWS_FOR_RANDOM = [r for r in ROWS if "hypergrad" not in r.skips]


@settings(max_examples=12, deadline=None)
@given(row=st.sampled_from(_ROWS_FOR_RANDOM), T=st.integers(1, 6), J=st.integers(1, 4),
       arch=st.sampled_from(["mlp", "mlp_bn", "conv_bn"]), hvp=st.sampled_from(["rev", "fwd"]),
       memory=st.sampled_from(["auto", None, "slots", "keep"]), granularity=st.sampled_from(["group", "tensor", "element"]),
       loss_params=st.booleans(), learn_init=st.booleans(), seed=st.integers(0, 2**10))
def test_tasks_random(row: Row, T: int, J: int, arch: str, hvp: str, memory: Any, granularity: str,
                      loss_params: bool, learn_init: bool, seed: int) -> None:
    if not row.shapes.accepts((3, 1, 3, 3)) and arch == "conv_bn":
        arch = "mlp"
    if memory == "keep" and hvp == "fwd":
        memory = None
    mem = {"slots": Memory(slots=1), "keep": Memory(keep_graphs=True)}.get(memory, memory)
    names = row.impl.hyper_names[: 1 + seed % len(row.impl.hyper_names)]
    learn = {n: granularity for n in names}
    batches, val = _task_batches(T, J, seed)
    make = functools.partial(_updater, row, arch, J, learn=learn, loss_params=loss_params, learn_init=learn_init,
                             hvp=hvp, memory=mem)
    ours = make(T).hypergradient(batches, val)
    _assert_close(ours.hypergrads, _mean_of_single_tasks(lambda: make(None), batches, val, T), tol=1e-9)


# --------------------------------------------------------------------------- what tasks change
def test_a_meta_step_with_tasks_and_its_state_dict() -> None:
    row = next(r for r in ROWS if r.torch_cls is torch.optim.Adam)
    T, J = 4, 3
    batches, val = _task_batches(T, J, seed=2)
    up = _updater(row, "mlp_bn", J, T, {"lr": "group", "beta1": "tensor"},
                  meta_opt=functools.partial(torch.optim.SGD, lr=1e-3))
    before = {n: t.detach().clone() for n, t in up.named_meta_parameters()}
    result = up.step(batches, val)
    assert not result.skipped and up.meta_steps == 1
    after = dict(up.named_meta_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    saved = up.state_dict()
    assert saved["options"]["tasks"] == T
    twin = _updater(row, "mlp_bn", J, T, {"lr": "group", "beta1": "tensor"},
                    meta_opt=functools.partial(torch.optim.SGD, lr=1e-3))
    twin.model.load_state_dict(up.model.state_dict())
    twin.load_state_dict(copy.deepcopy(saved))
    with pytest.raises(ValueError, match="tasks"):  # another task count is another configuration
        _updater(row, "mlp_bn", J, T + 1, {"lr": "group", "beta1": "tensor"}).load_state_dict(copy.deepcopy(saved))


def test_a_failure_inside_a_task_changes_nothing() -> None:
    row = next(r for r in ROWS if r.torch_cls is torch.optim.SGD and r.kwargs.get("momentum"))
    T, J = 3, 3
    batches, val = _task_batches(T, J, seed=3)
    up = _updater(row, "mlp_bn", J, T, {"lr": "tensor"})
    up.step(batches, val)
    calls = {"n": 0}
    real = up.train_loss

    def failing(m: Any, b: Any) -> Tensor:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("injected")
        return real(m, b)

    up.train_loss = failing
    before = snapshot(up)
    with pytest.raises(KeyboardInterrupt, match="injected"):
        up.step(batches, val)
    assert_unchanged(before, snapshot(up))


def test_nan_in_one_task_names_it() -> None:
    from gimli_bptt import NonFiniteError

    row = next(r for r in ROWS if r.torch_cls is torch.optim.SGD)
    T, J = 3, 2
    batches, val = _task_batches(T, J, seed=4)
    x, y = batches[1]
    x = x.clone()
    x[2, 0, 0, 0, 0] = float("nan")
    batches[1] = (x, y)
    up = _updater(row, "mlp", J, T, {"lr": "group"})
    before = snapshot(up)
    with pytest.raises(NonFiniteError, match="inner step 1 for task 2"):
        up.step(batches, val)
    assert_unchanged(before, snapshot(up))


@pytest.mark.parametrize("options, exc, match", [
    (dict(tasks=0), ValueError, "tasks must be at least 1"),
    (dict(tasks=2.0), TypeError, "tasks must be None or a number"),
    (dict(tasks=True), TypeError, "tasks must be None or a number"),
    (dict(tasks=2, commit=True, learn_init=False), ValueError, "no one of them to write into the model"),
])
def test_bad_task_options(options: dict[str, Any], exc: type, match: str) -> None:
    row = next(r for r in ROWS if r.torch_cls is torch.optim.SGD)
    kw = {"learn_init": options.pop("learn_init", True)}
    with pytest.raises(exc, match=match):
        _updater(row, "mlp", 2, learn={"lr": "group"}, **kw, **options)


def test_batches_without_the_task_dimension_are_refused() -> None:
    row = next(r for r in ROWS if r.torch_cls is torch.optim.SGD)
    batches, val = _task_batches(3, 2, seed=5)
    up = _updater(row, "mlp", 2, 4, {"lr": "group"})
    with pytest.raises(ValueError, match=r"inner step 0.*leading task dimension of size 4.*tasks=None"):
        up.hypergradient(batches, val)
    up = _updater(row, "mlp", 2, 3, {"lr": "group"})
    with pytest.raises(ValueError, match="the validation batch"):
        up.hypergradient(batches, _task(val, 0))


def test_a_loss_that_cannot_be_vectorised_names_the_fix() -> None:
    row = next(r for r in ROWS if r.torch_cls is torch.optim.SGD)
    batches, val = _task_batches(2, 2, seed=6)

    def branching(m: Any, b: Any) -> Tensor:
        loss = ce_loss(m, b)
        return loss * 2 if loss.item() > 0 else loss  # a Python branch on a value

    up = GimliUpdater(*(lambda m: (m, row.for_model(m)))(build_model("mlp", seed=3)), branching, ce_loss, unroll=2,
                      learn={"lr": "group"}, tasks=2)
    with pytest.raises(ValueError, match=r"train_loss cannot be vectorised.*tasks=None"):
        up.hypergradient(batches, val)


def test_one_task_equals_no_task_dimension() -> None:
    row = next(r for r in ROWS if r.torch_cls is torch.optim.Adam)
    batches, val = _task_batches(1, 3, seed=7)
    ours = _updater(row, "conv_bn", 3, 1, {"lr": "element"}).hypergradient(batches, val)
    single = _updater(row, "conv_bn", 3, None, {"lr": "element"}).hypergradient(
        [_task(b, 0) for b in batches], _task(val, 0))
    # Not bitwise: the vmapped sweep sums and multiplies in other orders than the single-task one.
    # Its rounding grows 2.3e3 times (gimli_bptt.testing.rounding_amplification of the single-task
    # hypergradient, floor=1e-4: Adam over a BatchNorm conv net, J = 3), so 1e4 bounds it.
    _assert_close(ours.hypergrads, {k: flat_list(v) for k, v in single.hypergrads.items()},
                  tol=float64_rtol(terms=1, condition=1e4))


def test_dropout_draws_per_task_masks_and_replays_them() -> None:
    """randomness="different": the tasks draw their own masks; a checkpointed tape replays them."""
    row = next(r for r in ROWS if r.torch_cls is torch.optim.SGD)
    batches, val = _task_batches(3, 4, seed=8)
    results = []
    for memory in (None, Memory(slots=1, verify=True), Memory(keep_graphs=True)):
        up = _updater(row, "dropout", 4, 3, {"lr": "tensor"}, memory=memory)
        torch.manual_seed(11)
        results.append(up.hypergradient(batches, val).hypergrads)
    for other in results[1:]:
        for name, v in results[0].items():
            assert all(torch.equal(a, b) for a, b in zip(flat_list(v), flat_list(other[name]))), name
