# SPDX-License-Identifier: Apache-2.0
"""GimliUpdater(memory=): the plan a budget picks in each regime, and hypergradients that never depend on it."""
from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from gimli_bptt import GimliUpdater, Memory, TapeStats
from gimli_bptt.reverse.schedule_costs import min_forward_steps
from gimli_bptt.testing import check_hypergradients

from optim_table import row
from problems import build_model, ce_loss, make_batches
from snapshots import bit_identical

HUGE = 2**40  # holds everything


def _train_loss(w: Tensor, model: Any, batch: tuple[Tensor, Tensor]) -> Tensor:
    return ce_loss(model, batch) + w * sum(p.pow(2).sum() for p in model.parameters())


def _updater(opt_name: str, J: int, dtype: torch.dtype = torch.float64, arch: str = "mlp_bn_dropout",
             train_loss: Any = None, **options: Any) -> GimliUpdater:
    model = build_model(arch, seed=4).to(dtype)
    if opt_name == "adam":
        opt = row("adam-amsgrad").for_model(model, grouped=False)
        learn = {"lr": "tensor", "beta1": "group", "eps": "element"}
    else:
        opt = row("sgd-heavy_momentum").for_model(model, grouped=False)
        learn = {"lr": "element", "momentum": "group"}
    w = torch.tensor(1e-3, dtype=dtype, requires_grad=True)
    return GimliUpdater(model, opt, train_loss or functools.partial(_train_loss, w), ce_loss, unroll=J, learn=learn,
                        loss_params={"w": w}, learn_init=True, **options)


def _data(J: int, dtype: torch.dtype = torch.float64) -> tuple[list[Any], Any]:
    batches, val = make_batches(J, seed=4)
    return [(x.to(dtype), y) for x, y in batches], (val[0].to(dtype), val[1])


def _hypergrads(up: GimliUpdater, J: int, dtype: torch.dtype = torch.float64) -> dict[str, Any]:
    torch.manual_seed(123)  # dropout draws the same masks in each run
    return up.hypergradient(*_data(J, dtype)).hypergrads


@functools.cache
def _baseline(opt_name: str, J: int, dtype: torch.dtype) -> tuple[dict[str, Any], int, int]:
    """The full tape's hypergradients without a budget, and the bytes of one state and one graph."""
    full = _hypergrads(_updater(opt_name, J, dtype), J, dtype)
    probe = _updater(opt_name, J, dtype, memory=HUGE)
    _hypergrads(probe, J, dtype)
    stats = probe.last_tape_stats
    assert stats is not None and stats.state_bytes is not None and stats.graph_bytes is not None
    return full, stats.state_bytes, stats.graph_bytes


@st.composite
def _budget_cases(draw: st.DrawFn) -> tuple[str, int, torch.dtype, str, int, int]:
    """``(optimizer, J, dtype, regime, budget, k or slots)`` with the budget inside the regime."""
    regime = draw(st.sampled_from(["graphs", "some graphs", "full", "checkpointed"]))
    J = draw(st.integers(2 if regime in ("some graphs", "checkpointed") else 1, 6))
    opt_name = draw(st.sampled_from(["sgd", "adam"]))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    _, state, graph = _baseline(opt_name, J, dtype)
    if regime == "graphs":
        return opt_name, J, dtype, regime, J * state + J * graph + draw(st.integers(0, 3 * graph)), J
    if regime == "some graphs":
        k = draw(st.integers(1, J - 1))
        return opt_name, J, dtype, regime, J * state + k * graph + draw(st.integers(0, graph - 1)), k
    if regime == "full":
        return opt_name, J, dtype, regime, J * state + draw(st.integers(0, graph - 1)), 0
    slots = draw(st.integers(1, J - 1))
    return opt_name, J, dtype, regime, slots * state + draw(st.integers(0, state - 1)), slots


@pytest.mark.slow
@given(_budget_cases())
def test_hypergradients_are_bit_identical_whatever_the_budget(case: tuple[str, int, torch.dtype, str, int, int]) -> None:
    opt_name, J, dtype, regime, budget, n = case
    full, state, graph = _baseline(opt_name, J, dtype)
    up = _updater(opt_name, J, dtype, memory=budget)
    assert bit_identical(full, _hypergrads(up, J, dtype)), (regime, budget)
    stats = up.last_tape_stats
    assert stats is not None
    if regime == "checkpointed":
        assert stats.schedule == "checkpointed" and stats.graphs_kept == 0 and stats.graph_bytes is None
        assert stats.max_slots_used <= n and stats.forward_steps == min_forward_steps(J, n)
    else:
        assert stats.schedule == ("full" if n == 0 else "graphs") and stats.graphs_kept == n
        assert stats.graph_bytes == graph and stats.forward_steps == J and stats.max_slots_used == J
        assert J * state + n * graph <= budget
    assert stats.state_bytes == state and stats.budget == budget
    torch.manual_seed(7)
    errors = check_hypergradients(up, *_data(J, dtype), dtype=None)  # against the full autograd unroll
    assert max(errors.values()) <= (1e-9 if dtype == torch.float64 else 2e-3), errors


# --------------------------------------------------------------------------- the plan
def test_a_large_budget_keeps_every_graph() -> None:
    up = _updater("sgd", 4, memory=HUGE)
    assert up.last_tape_stats is None  # before the first meta step
    _hypergrads(up, 4)
    stats = up.last_tape_stats
    assert stats is not None and (stats.schedule, stats.graphs_kept, stats.forward_steps) == ("graphs", 4, 4)
    assert stats.graph_bytes is not None and stats.graph_bytes > 0


def test_a_budget_of_exactly_the_states_keeps_no_graph_and_one_byte_less_checkpoints() -> None:
    J = 5
    _, state, graph = _baseline("sgd", J, torch.float64)
    up = _updater("sgd", J, memory=J * state)
    _hypergrads(up, J)
    assert up.last_tape_stats == TapeStats(forward_steps=J, max_slots_used=J, schedule="full", graphs_kept=0,
                                           graph_bytes=graph, state_bytes=state, budget=J * state, budget_source="given")
    up = _updater("sgd", J, memory=J * state - 1)
    _hypergrads(up, J)
    assert up.last_tape_stats == TapeStats(forward_steps=min_forward_steps(J, J - 1), max_slots_used=J - 1,
                                           schedule="checkpointed", graphs_kept=0, graph_bytes=None,
                                           state_bytes=state, budget=J * state - 1, budget_source="given")


def test_the_last_steps_graphs_are_kept_and_the_others_recomputed_newest_first() -> None:
    J, k = 6, 2
    _, state, graph = _baseline("sgd", J, torch.float64)
    batches, val = _data(J)
    calls: list[int] = []

    def recording_loss(model: Any, batch: Any) -> Tensor:
        calls.append(next(j for j, b in enumerate(batches) if b is batch))
        return ce_loss(model, batch)

    up = _updater("sgd", J, train_loss=recording_loss, memory=J * state + k * graph)
    torch.manual_seed(123)
    up.hypergradient(batches, val)
    assert up.last_tape_stats is not None and up.last_tape_stats.graphs_kept == k
    # the tape pass, then the sweep recomputes only the steps whose graphs were not kept
    assert calls == list(range(J)) + list(range(J - k - 1, -1, -1))


def test_forward_over_reverse_spends_the_budget_on_states_only() -> None:
    full = _hypergrads(_updater("adam", 4, hvp="fwd"), 4)
    up = _updater("adam", 4, hvp="fwd", memory=HUGE)
    assert bit_identical(full, _hypergrads(up, 4))
    stats = up.last_tape_stats
    assert stats is not None and (stats.schedule, stats.graphs_kept, stats.graph_bytes) == ("full", 0, None)


def test_keep_graphs_keeps_every_graph() -> None:
    up = _updater("sgd", 3, memory=Memory(keep_graphs=True))
    _hypergrads(up, 3)
    stats = up.last_tape_stats
    assert stats is not None and (stats.schedule, stats.graphs_kept, stats.graph_bytes) == ("graphs", 3, None)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("options, exc, match", [
    ({"memory": 0}, ValueError, "memory must be at least 1 byte"),
    ({"memory": 1.5e6}, TypeError, "memory must be 'auto', a number of bytes"),
    ({"memory": True}, TypeError, "memory must be 'auto', a number of bytes"),
    ({"memory": "1GB"}, ValueError, "memory must be 'auto', a number of bytes"),
    ({"memory": Memory(slots=0)}, ValueError, "slots must be >= 1"),
    ({"memory": Memory(slots=True)}, TypeError, "slots must be an int"),
])
def test_bad_memory_values(options: dict[str, Any], exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        _updater("sgd", 3, **options)


def test_a_budget_below_one_state_says_so() -> None:
    _, state, _ = _baseline("sgd", 3, torch.float64)
    up = _updater("sgd", 3, memory=state - 1)
    with pytest.raises(ValueError, match=f"budget_bytes={state - 1} allows no checkpoint slot for state_bytes={state}"):
        _hypergrads(up, 3)


# --------------------------------------------------------------------------- saving and resuming
def test_state_dict_round_trip_and_resume_under_another_budget() -> None:
    J = 3
    _, state, _ = _baseline("adam", J, torch.float64)

    def run(up: GimliUpdater, seeds: range) -> None:
        for seed in seeds:
            torch.manual_seed(seed)
            up.step(*make_batches(J, seed=seed))

    straight = _updater("adam", J, memory=HUGE)
    run(straight, range(2))
    first = _updater("adam", J, memory=HUGE)
    run(first, range(1))
    saved = first.state_dict()
    assert saved["options"]["memory"]["budget"] == HUGE
    same = _updater("adam", J, memory=HUGE)
    same.load_state_dict(saved)
    assert same.state_dict()["options"] == saved["options"]
    for options in ({"memory": 2 * state}, {"memory": Memory(slots=1)}, {"memory": Memory(keep_graphs=True)}, {}):
        resumed = _updater("adam", J, **options)  # memory options do not change the results: free to differ
        resumed.load_state_dict(copy.deepcopy(saved))  # the meta optimizer's state would alias saved's tensors
        run(resumed, range(1, 2))
        for (name, a), (_, b) in zip(straight.named_meta_parameters(), resumed.named_meta_parameters()):
            assert torch.equal(a, b), (options, name)


# --------------------------------------------------------------------------- memory="auto"
def _with_available(monkeypatch: pytest.MonkeyPatch, nbytes: int) -> None:
    from gimli_bptt.reverse import plan

    monkeypatch.setattr(plan, "available_memory", lambda device: (nbytes, "test"))


def test_auto_is_the_default_and_plans_in_half_the_available_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    J = 4
    full, state, graph = _baseline("adam", J, torch.float64)
    _with_available(monkeypatch, 2 * (J * state + J * graph))
    up = _updater("adam", J)
    assert up.memory == Memory(fraction=0.5)
    assert bit_identical(full, _hypergrads(up, J))
    stats = up.last_tape_stats
    assert stats is not None and stats.budget == J * state + J * graph and stats.schedule == "graphs"
    assert stats.graphs_kept == J and "0.5 of" in (stats.budget_source or "")


@pytest.mark.parametrize("available, schedule", [
    (lambda J, s, g: 2 * (J * s + J * g + 10), "graphs"),       # everything fits: every graph
    (lambda J, s, g: 2 * (J * s + 2 * g), "graphs"),            # two graphs
    (lambda J, s, g: 2 * (J * s + g // 2), "full"),             # the states but no graph
    (lambda J, s, g: 2 * (2 * s + s // 2), "checkpointed"),     # two states: binomial checkpointing
], ids=["all graphs", "some graphs", "full", "checkpointed"])
def test_auto_plans_in_what_is_available(monkeypatch: pytest.MonkeyPatch, available: Any, schedule: str) -> None:
    J = 5
    full, state, graph = _baseline("sgd", J, torch.float64)
    _with_available(monkeypatch, available(J, state, graph))
    up = _updater("sgd", J, memory="auto")
    assert bit_identical(full, _hypergrads(up, J))
    stats = up.last_tape_stats
    assert stats is not None and stats.schedule == schedule and stats.budget is not None
    held = (J if schedule != "checkpointed" else stats.max_slots_used) * state + stats.graphs_kept * graph
    assert held <= stats.budget, "the plan exceeds the budget"


def test_auto_fraction_is_overridable(monkeypatch: pytest.MonkeyPatch) -> None:
    J = 3
    _, state, graph = _baseline("sgd", J, torch.float64)
    _with_available(monkeypatch, 10 * (J * state + J * graph))
    up = _updater("sgd", J, memory=Memory(fraction=0.2))
    _hypergrads(up, J)
    assert up.last_tape_stats is not None and up.last_tape_stats.budget == int(0.2 * 10 * (J * state + J * graph))
    monkeypatch.setenv("GIMLI_MEMORY_FRACTION", "0.25")
    assert _updater("sgd", J).memory == Memory(fraction=0.25)
    monkeypatch.setenv("GIMLI_MEMORY_FRACTION", "lots")
    with pytest.raises(ValueError, match="GIMLI_MEMORY_FRACTION"):
        _updater("sgd", J)
    for bad in (0, 1.5, -0.1, True, "half"):
        with pytest.raises(ValueError, match=r"fraction=\.\.\.\) must be a number in \(0, 1\]"):
            _updater("sgd", J, memory=Memory(fraction=bad))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at most one of"):
        _updater("sgd", J, memory=Memory(fraction=0.5, slots=2))
    with pytest.raises(ValueError, match="memory must be 'auto'"):
        _updater("sgd", J, memory="fast")


def test_cpu_available_memory_respects_a_cgroup_limit(tmp_path: Any) -> None:
    from gimli_bptt.memory_probe import _cpu_available

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:   20000000 kB\n")
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    assert _cpu_available(str(meminfo), ()) == (20000000 * 1024, "MemAvailable")
    limit.write_text(f"{8 * 2**30}\n")
    usage.write_text(f"{3 * 2**30}\n")
    assert _cpu_available(str(meminfo), ((str(limit), str(usage)),)) == (5 * 2**30, "the cgroup's memory limit")
    limit.write_text("max\n")  # no limit
    assert _cpu_available(str(meminfo), ((str(limit), str(usage)),))[1] == "MemAvailable"


def test_available_memory_is_read_afresh_at_every_call(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Note [Reading the available memory cheaply]: a file under /proc is opened once and re-read
    with pread, so its current contents are returned each time; other paths are read afresh."""
    from gimli_bptt import memory_probe as memory_mod

    first = memory_mod._read_text("/proc/self/stat")
    assert first is not None and "/proc/self/stat" in memory_mod._FDS
    fd = memory_mod._FDS["/proc/self/stat"]
    torch.zeros(1 << 20).add_(1)  # the process's counters move
    again = memory_mod._read_text("/proc/self/stat")
    assert again is not None and memory_mod._FDS["/proc/self/stat"] == fd and again.split()[0] == first.split()[0]
    assert memory_mod._read_text("/proc/no-such-file") is None and memory_mod._FDS["/proc/no-such-file"] is None
    available, source = memory_mod._cpu_available()
    assert available > 0 and source
    path = tmp_path / "memory.max"
    path.write_text("123\n")
    assert memory_mod._read_int(str(path)) == 123
    path.write_text("456\n")
    assert memory_mod._read_int(str(path)) == 456 and str(path) not in memory_mod._FDS
