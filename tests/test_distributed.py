# SPDX-License-Identifier: Apache-2.0
"""Data-parallel meta-updates on gloo: 2 and 3 spawned ranks on loopback against one process on the full batch."""
from __future__ import annotations

import datetime
import functools
import os
import socket
import time
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from gimli_bptt import DistributedError, GimliUpdater, Memory
from gimli_bptt.testing import relative_error

from optim_table import row
from problems import build_model, make_batch

dist = torch.distributed
if not dist.is_available() or not dist.is_gloo_available():  # pragma: no cover - depends on the build
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402

J = 4
N = 12  # full batch: divisible by 2 and 3 ranks (equal shards)
TOL = 1e-10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, timeout_s: float, fn: Callable[[int, int, str], None], out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        fn(rank, world, out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(fn: Callable[[int, int, str], None], world: int, out: str, timeout_s: float = 60.0,
           bound_s: float = 120.0) -> float:
    """Runs ``fn(rank, world, out)`` on ``world`` spawned gloo ranks; fails if any raises or all take > bound_s."""
    start = time.monotonic()
    # fork where there is one: a "spawn" start re-imports torch in every rank, 20-35 s each on a
    # busy 2-core machine; the ranks set one thread each, as DataLoader workers do after a fork.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.start_processes(_entry, args=(world, _free_port(), timeout_s, fn, out), nprocs=world, join=False,
                             start_method=method)
    try:
        while not ctx.join(timeout=max(0.1, bound_s - (time.monotonic() - start))):
            if time.monotonic() - start > bound_s:
                raise AssertionError(f"the {world} ranks did not finish within {bound_s} s (a hang)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return time.monotonic() - start


# ----------------------------------------------------------------------------- the problem
def _data(seed: int = 0) -> tuple[list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
    return [make_batch(N, seed * 100 + j) for j in range(J)], make_batch(N, seed * 100 + 99)


def _shard(batch: tuple[Tensor, Tensor], rank: int, world: int) -> tuple[Tensor, Tensor]:
    return tuple(t.chunk(world)[rank] for t in batch)  # type: ignore[return-value]


def _train_loss(w: Tensor, model: Any, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y) + w * sum(p.pow(2).sum() for p in model.parameters())


def _val_loss(model: Any, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


CONFIGS: dict[str, dict[str, Any]] = {
    "sgd rev": dict(opt="sgd-heavy_momentum", learn={"lr": "tensor", "momentum": "group"}, hvp="rev"),
    "adam fwd": dict(opt="adam-lr", learn={"lr": "group", "beta1": "group"}, hvp="fwd"),
    "sgd 2 slots": dict(opt="sgd-half_momentum", learn={"lr": "element"}, hvp="rev", memory=Memory(slots=2)),
    "adam keep_graphs + learn_init": dict(opt="adam-lr", learn={"lr": "group"}, memory=Memory(keep_graphs=True),
                                          learn_init=True),
}


def _updater(config: dict[str, Any], process_group: Any = None, loss: Callable[..., Tensor] = _train_loss,
             **extra: Any) -> GimliUpdater:
    model = build_model("mlp", seed=1)
    opt = row(config["opt"]).for_model(model, grouped=False)
    w = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    options = {k: v for k, v in config.items() if k != "opt"}
    options.update(extra)
    return GimliUpdater(model, opt, functools.partial(loss, w), _val_loss, unroll=J, loss_params={"w": w},
                        meta_opt=functools.partial(torch.optim.Adam, lr=0.01), process_group=process_group,
                        **options)


def _gathered_equal(tensors: list[Tensor]) -> bool:
    """Whether ``tensors`` are bit-for-bit the same on every rank."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    out = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(out, flat)
    return all(torch.equal(o, out[0]) for o in out)


def _state(u: GimliUpdater) -> list[Tensor]:
    return [t.detach().clone() for t in u.meta_parameters()] + [p.detach().clone() for p in u.model.parameters()]


# ----------------------------------------------------------------------------- happy path
def _check_equal_to_single_process(rank: int, world: int, out: str) -> None:
    batches, val = _data()
    shards = [_shard(b, rank, world) for b in batches]
    val_shard = _shard(val, rank, world)
    for name, config in CONFIGS.items():
        ref = _updater(config, process_group=False).hypergradient(batches, val)
        u = _updater(config)
        assert u.world_size == world
        got = u.hypergradient(shards, val_shard)
        assert set(got.hypergrads) == set(ref.hypergrads)
        for key in ref.hypergrads:
            err = relative_error(got.hypergrads[key], ref.hypergrads[key], floor=1e-12)
            assert err <= TOL, f"{name} rank {rank}/{world}: {key} relative error {err:.2e}"
        assert abs(got.val_loss.item() - ref.val_loss.item()) <= TOL * abs(ref.val_loss.item())
        assert torch.allclose(got.train_losses, ref.train_losses, rtol=TOL, atol=0)
        assert _gathered_equal([t for v in got.hypergrads.values() for t in (v if isinstance(v, list) else [v])])

    # a few meta steps with commit and a real training step: φ and θ stay identical on every rank
    # and equal to the single-process run
    config = CONFIGS["sgd rev"]
    ref, u = _updater(config, process_group=False, commit=True), _updater(config, commit=True)
    for seed in range(3):
        batches, val = _data(seed + 1)
        ref.step(batches, val)
        u.step([_shard(b, rank, world) for b in batches], _shard(val, rank, world))
        assert _gathered_equal(_state(u)), f"φ or θ differ across ranks after meta step {seed}"
    ref.train_step(batches[0])
    u.train_step(_shard(batches[0], rank, world))
    assert _gathered_equal(_state(u))
    for a, b in zip(_state(u), _state(ref)):
        assert relative_error(a, b) <= TOL


@pytest.mark.parametrize("world", [2, 3])
def test_hypergradients_equal_single_process_on_full_batch(world: int, tmp_path: Any) -> None:
    _spawn(_check_equal_to_single_process, world, str(tmp_path))


def _lopsided_loss(w: Tensor, model: Any, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The same loss, but rank 0's graph saves more (a zero term): the ranks measure different graph bytes."""
    extra = 0 * model(batch[0]).exp().sum() if dist.get_rank() == 0 else 0
    return _train_loss(w, model, batch) + extra


def _check_budget_plans_alike(rank: int, world: int, out: str) -> None:
    batches, val = _data()
    shards, val_shard = [_shard(b, rank, world) for b in batches], _shard(val, rank, world)
    config = CONFIGS["sgd rev"]
    probe = _updater(config, loss=_lopsided_loss, memory=2**40)
    probe.hypergradient(shards, val_shard)
    assert probe.last_tape_stats is not None
    state, graph = probe.last_tape_stats.state_bytes, probe.last_tape_stats.graph_bytes
    assert state is not None and graph is not None
    # planned on the mean of the ranks' graph bytes: alone, rank 0 (the larger graph) would keep fewer than rank 1
    u = _updater(config, loss=_lopsided_loss, memory=J * state + 2 * graph)
    got = u.hypergradient(shards, val_shard)
    assert u.last_tape_stats is not None and u.last_tape_stats.graphs_kept == 2
    assert _gathered_equal([torch.tensor([float(graph), float(u.last_tape_stats.graphs_kept)])])
    ref = _updater(config, process_group=False, loss=_lopsided_loss).hypergradient(batches, val)
    for key in ref.hypergrads:
        err = relative_error(got.hypergrads[key], ref.hypergrads[key], floor=1e-12)
        assert err <= TOL, f"budget rank {rank}/{world}: {key} relative error {err:.2e}"


def test_a_budget_keeps_the_same_graphs_on_every_rank(tmp_path: Any) -> None:
    _spawn(_check_budget_plans_alike, 2, str(tmp_path))


# ----------------------------------------------------------------------------- failures
class _FailingAdam(torch.optim.Adam):
    fail = False

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if _FailingAdam.fail:
            raise RuntimeError("meta optimizer failed on purpose")
        return super().step(closure)


def _failing_loss(state: dict[str, int], w: Tensor, model: Any, batch: tuple[Tensor, Tensor]) -> Tensor:
    state["calls"] += 1
    if state["calls"] == state.get("fail_at", -1):
        raise ValueError("train_loss failed on purpose")
    return _train_loss(w, model, batch)


def _check_failures(rank: int, world: int, out: str) -> None:
    bad = 1
    model = build_model("mlp", seed=1)
    opt = row("sgd-heavy_momentum").for_model(model, grouped=False)
    w = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    calls: dict[str, int] = {"calls": 0}
    u = GimliUpdater(model, opt, functools.partial(_failing_loss, calls, w), _val_loss, unroll=J,
                     learn={"lr": "group"}, loss_params={"w": w}, commit=True, meta_opt=_FailingAdam)
    batches, val = _data()
    shards, val_shard = [_shard(b, rank, world) for b in batches], _shard(val, rank, world)
    u.step(shards, val_shard)
    before = _state(u)

    # (a) the meta optimizer raises on one rank only: every rank rolls back
    _FailingAdam.fail = rank == bad
    with pytest.raises(RuntimeError if rank == bad else DistributedError) as info:
        u.step(shards, val_shard)
    _FailingAdam.fail = False
    if rank == bad:
        assert "failed on purpose" in str(info.value)
    else:
        assert "another rank failed while applying the meta update" in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(_state(u), before)), "φ or θ changed by a failed meta step"

    # (b) one rank raises at inner step 2, its caller goes straight on: the ranks are out of step
    # and all of them say so; the next step runs in step again
    calls["calls"], calls["fail_at"] = 0, (3 if rank == bad else -1)
    if rank == bad:
        with pytest.raises(ValueError, match="failed on purpose"):
            u.step(shards, val_shard)
    with pytest.raises(DistributedError, match="out of step"):
        u.step(shards, val_shard)
    assert all(torch.equal(a, b) for a, b in zip(_state(u), before))
    u.step(shards, val_shard)
    assert _gathered_equal(_state(u))
    before = _state(u)

    # (c) one rank raises and stays alive: the others fail within the process group's timeout
    calls["calls"], calls["fail_at"] = 0, (3 if rank == bad else -1)
    start = time.monotonic()
    with pytest.raises(ValueError if rank == bad else DistributedError) as info:
        u.step(shards, val_shard)
    elapsed = time.monotonic() - start
    assert all(torch.equal(a, b) for a, b in zip(_state(u), before))
    if rank == bad:  # alive but never reaching the collective, until the others have reported
        while len(os.listdir(out)) < world - 1 and time.monotonic() - start < FAIL_TIMEOUT_S + 30:
            time.sleep(0.2)
    else:
        assert "a peer rank raised, exited, or did not reach the same collective" in str(info.value)
        assert "ℓ_2 and G_2" in str(info.value)
        assert elapsed < FAIL_TIMEOUT_S + 20, elapsed
        with open(os.path.join(out, f"rank{rank}"), "w") as f:
            f.write(f"{elapsed:.1f}")
    # After a timed-out collective the process group is unusable and tearing it down can block
    # on the peers (see docs/DISTRIBUTED.md): a real job exits, as every rank does here.
    os._exit(0)


FAIL_TIMEOUT_S = 6.0


@pytest.mark.slow
def test_failing_rank_makes_every_rank_fail_in_bounded_time(tmp_path: Any) -> None:
    world = 3
    _spawn(_check_failures, world, str(tmp_path), timeout_s=FAIL_TIMEOUT_S, bound_s=90)
    reported = sorted(os.listdir(tmp_path))
    assert reported == ["rank0", "rank2"], reported


def _check_exited_rank(rank: int, world: int, out: str) -> None:
    model = build_model("mlp", seed=1)
    w = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    calls = {"calls": 0, "fail_at": 3 if rank == 1 else -1}
    u = GimliUpdater(model, row("sgd-plain").for_model(model, grouped=False),
                     functools.partial(_failing_loss, calls, w),
                     _val_loss, unroll=J, learn={"lr": "group"}, loss_params={"w": w})
    batches, val = _data()
    start = time.monotonic()
    try:
        u.step([_shard(b, rank, world) for b in batches], _shard(val, rank, world))
    except (ValueError, DistributedError) as exc:
        with open(os.path.join(out, f"rank{rank}"), "w") as f:
            f.write(f"{type(exc).__name__} {time.monotonic() - start:.1f}")
    os._exit(0)  # the failed rank's process ends (as an uncaught error would end it)


def test_exited_rank_fails_the_others_without_waiting_for_the_timeout(tmp_path: Any) -> None:
    _spawn(_check_exited_rank, 2, str(tmp_path), timeout_s=120.0, bound_s=90)
    kinds = {name: open(tmp_path / name).read().split() for name in sorted(os.listdir(tmp_path))}
    assert kinds["rank1"][0] == "ValueError"
    assert kinds["rank0"][0] == "DistributedError"
    assert float(kinds["rank0"][1]) < 60, kinds  # the closed connection, not the 120 s timeout


def test_process_group_option() -> None:
    config = CONFIGS["sgd rev"]
    assert _updater(config).world_size == 1  # not initialised: no communication
    assert _updater(config, process_group=False).process_group is None
    with pytest.raises(TypeError, match="process_group"):
        _updater(config, process_group="gloo")
