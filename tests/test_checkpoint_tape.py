# SPDX-License-Identifier: Apache-2.0
"""The checkpointed tape: bit-identical hypergradients to the full tape, in bounded memory."""
from __future__ import annotations

import copy
import random
from typing import Any

import pytest
import torch
from torch import Tensor

from gimli_bptt import GimliUpdater, Memory, TapeStats
from gimli_bptt.reverse.schedule_costs import every_k_forward_steps, min_forward_steps

from optim_table import row
from problems import build_model, ce_loss, make_batches
from snapshots import bit_identical


def _hypergrads(arch: str, opt_name: str, J: int, memory: Any, hvp: str = "rev",
                dtype: torch.dtype = torch.float64) -> tuple[dict[str, Any], GimliUpdater]:
    model = build_model(arch, seed=4).to(dtype)
    if opt_name == "adam":
        opt = row("adam-amsgrad").for_model(model, grouped=False)
        learn = {"lr": "tensor", "beta1": "group", "eps": "element"}
    else:
        opt = row("sgd-heavy_nesterov").for_model(model, grouped=False)
        learn = {"lr": "element", "momentum": "group"}
    up = GimliUpdater(model, opt, ce_loss, ce_loss, unroll=J, learn=learn, learn_init=True, hvp=hvp,
                      memory=memory)
    batches, val = make_batches(J, seed=4)
    batches = [(x.to(dtype), y) for x, y in batches]
    val = (val[0].to(dtype), val[1])
    torch.manual_seed(123)  # dropout draws the same masks in each run
    return up.hypergradient(batches, val).hypergrads, up


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("arch, opt_name, hvp", [("dropout", "sgd", "rev"), ("mlp_bn", "adam", "rev"),
                                                  ("conv_bn", "sgd", "fwd"), ("dropout", "adam", "fwd")])
def test_checkpointed_tape_is_bit_identical_to_the_full_tape(arch: str, opt_name: str, hvp: str,
                                                             dtype: torch.dtype) -> None:
    J = 7
    full, _ = _hypergrads(arch, opt_name, J, None, hvp, dtype)
    for memory in (Memory(slots=1), Memory(slots=3), Memory(every=3), Memory(slots=2, verify=True)):
        ours, up = _hypergrads(arch, opt_name, J, memory, hvp, dtype)
        assert bit_identical(full, ours), memory


@pytest.mark.parametrize("J, slots", [(1, 1), (7, 1), *[pytest.param(J, s, marks=pytest.mark.slow) for J, s in
                                                     ((20, 2), (33, 3), (50, 5))], (12, 12), (12, 40)])
def test_recomputation_is_optimal_and_slots_are_bounded(J: int, slots: int) -> None:
    _, up = _hypergrads("mlp", "sgd", J, Memory(slots=slots))
    stats = up.last_tape_stats
    assert stats is not None and stats.max_slots_used <= slots
    assert stats.forward_steps == (min_forward_steps(J, slots) if slots < J else J)


def test_every_k_counts() -> None:
    _, up = _hypergrads("mlp", "sgd", 10, Memory(every=3))
    assert up.last_tape_stats is not None and up.last_tape_stats.forward_steps == every_k_forward_steps(10, 3)


def test_full_tape_keeps_every_state_and_recomputes_nothing() -> None:
    _, up = _hypergrads("mlp", "sgd", 6, None)
    assert up.last_tape_stats == TapeStats(forward_steps=6, max_slots_used=6, schedule="full", graphs_kept=0,
                                           graph_bytes=None, state_bytes=None, budget=None)


def test_budget_in_bytes_derives_the_slots() -> None:
    model = build_model("mlp")
    state_bytes = sum(p.numel() * 8 for p in model.parameters()) * 2  # θ and the momentum buffer
    _, up = _hypergrads("mlp", "sgd", 20, 3 * state_bytes + 5)
    assert up.last_tape_stats is not None
    assert up.last_tape_stats.max_slots_used == 3
    assert up.last_tape_stats.forward_steps == min_forward_steps(20, 3)
    with pytest.raises(ValueError, match="allows no checkpoint slot"):
        _hypergrads("mlp", "sgd", 20, state_bytes // 2)


def test_verify_catches_a_nondeterministic_loss() -> None:
    model = build_model("mlp")
    noise = random.Random(0)

    def flaky(m: Any, b: Any) -> Tensor:  # randomness outside torch's generators
        return ce_loss(m, b) * (1 + 1e-3 * noise.random())

    up = GimliUpdater(model, row("sgd-plain").for_model(model, grouped=False), flaky, ce_loss, unroll=8,
                      learn=["lr"], memory=Memory(slots=2, verify=True))
    with pytest.raises(RuntimeError, match="recomputed state before inner step .* differs"):
        up.hypergradient(*make_batches(8))


@pytest.mark.parametrize(
    "memory, exc, match",
    [
        (Memory(slots=2, every=3), ValueError, "at most one of"),
        (Memory(budget=2**20, slots=2), ValueError, "at most one of"),
        (Memory(slots=0), ValueError, "slots"),
        (Memory(every=0), ValueError, "every"),
        (Memory(slots=2.5), TypeError, "slots must be an int"),  # type: ignore[arg-type]
        (Memory(verify=1), TypeError, "verify"),  # type: ignore[arg-type]
        (0, ValueError, "at least 1 byte"),
        ("1GB", ValueError, "memory must be .auto."),
        (True, TypeError, "memory must be"),
        (1.5e6, TypeError, "memory must be"),
    ],
)
def test_bad_memory_options(memory: Any, exc: type, match: str) -> None:
    model = build_model("mlp")
    with pytest.raises(exc, match=match):
        GimliUpdater(model, row("sgd-plain").for_model(model, grouped=False), ce_loss, ce_loss, unroll=3,
                     learn=["lr"], memory=memory)


def test_commit_with_a_checkpointed_tape() -> None:
    results = []
    for memory in (None, Memory(slots=2)):
        model = build_model("mlp_bn", seed=2)
        opt = row("adam-lr").for_model(model, grouped=False)
        up = GimliUpdater(model, opt, ce_loss, ce_loss, unroll=7, learn=["lr"], commit=True, memory=memory)
        up.step(*make_batches(7, seed=2))
        results.append((copy.deepcopy(model.state_dict()), float(opt.param_groups[0]["lr"])))
    assert results[0][1] == results[1][1]
    for k in results[0][0]:
        assert torch.equal(results[0][0][k], results[1][0][k]), k


def test_progress_bar_of_the_unroll(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import sys

    from gimli_bptt.progress import Progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    def run(progress: Any, stream: io.StringIO) -> str:
        monkeypatch.setattr(sys, "stderr", stream)
        model = build_model("mlp")
        up = GimliUpdater(model, row("sgd-plain").for_model(model, grouped=False), ce_loss, ce_loss, unroll=3,
                          learn=["lr"], progress=progress)
        up.hypergradient(*make_batches(3))
        monkeypatch.undo()
        return stream.getvalue()

    drawn = run(True, Tty())
    assert "unroll:" in drawn and "6/6" in drawn and "forward 3/3 reverse 3/3" in drawn
    assert run(None, Tty()) == ""  # J < 100: no bar by default
    assert run(False, Tty()) == ""
    quiet = io.StringIO()  # not a terminal: nothing is drawn unless asked
    bar = Progress(3, "x", stream=quiet)
    bar.update()
    bar.close()
    assert quiet.getvalue() == ""


@pytest.mark.parametrize("arch", ["dropout", "mlp_bn"])
def test_keep_graphs_gives_the_same_hypergradients(arch: str) -> None:
    results = []
    for keep in (False, True):
        model = build_model(arch, seed=6)
        up = GimliUpdater(model, row("adam-lr").for_model(model, grouped=False), ce_loss, ce_loss, unroll=5,
                          learn={"lr": "tensor", "beta1": "element"}, learn_init=True,
                          memory=Memory(keep_graphs=keep))
        torch.manual_seed(3)
        results.append(up.hypergradient(*make_batches(5, seed=6)).hypergrads)
    assert bit_identical(results[0], results[1])


def test_keep_graphs_option_errors() -> None:
    model = build_model("mlp")
    for memory, kw, match in ((Memory(keep_graphs=True, slots=2), {}, "cannot be combined"),
                              (Memory(keep_graphs=True, budget=2**20), {}, "cannot be combined"),
                              (Memory(keep_graphs=True), dict(hvp="fwd"), "use hvp='rev'")):
        with pytest.raises(ValueError, match=match):
            GimliUpdater(model, row("sgd-plain").for_model(model, grouped=False), ce_loss, ce_loss, unroll=3,
                         learn=["lr"], memory=memory, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("memory, kept", [(Memory(slots=3), 4), (Memory(every=3), 4)], ids=["binomial", "every-k"])
def test_the_last_step_of_an_advance_keeps_its_graph(memory: Memory, kept: int) -> None:
    """Note [The last step of an advance]: a step whose gradient an advance computes right before
    the sweep reverses it is not recomputed (binomial, J = 10, 3 slots: steps 8, 6, 3 and 0;
    every 3rd state: steps 9, 7, 4 and 1), and the hypergradient stays the full tape's, bit for bit."""
    J = 10
    calls = {"n": 0}

    def counting(m: Any, b: Any) -> Tensor:
        calls["n"] += 1
        return ce_loss(m, b)

    def run(memory: Any) -> tuple[dict[str, Any], GimliUpdater]:
        model = build_model("mlp_bn", seed=4)
        up = GimliUpdater(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), counting, ce_loss,
                          unroll=J, learn={"lr": "tensor", "momentum": "group"}, learn_init=True, memory=memory)
        calls["n"] = 0
        return up.hypergradient(*make_batches(J, seed=4)).hypergrads, up

    full, _ = run(None)
    ours, up = run(memory)
    assert up.last_tape_stats is not None
    assert calls["n"] == up.last_tape_stats.forward_steps + J - kept
    assert bit_identical(full, ours)
