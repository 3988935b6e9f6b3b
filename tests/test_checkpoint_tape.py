# SPDX-License-Identifier: Apache-2.0
"""The checkpointed tape: bit-identical hypergradients to the full tape, in bounded memory."""
from __future__ import annotations

import copy
import random
from typing import Any

import pytest
import torch
from torch import Tensor

from gimli_bptt import Checkpointing, GimliUpdater
from gimli_bptt.checkpoint import every_k_forward_steps, min_forward_steps

from problems import build_model, ce_loss, make_batches


def _hypergrads(arch: str, opt_name: str, J: int, checkpoint: Any, hvp: str = "rev",
                dtype: torch.dtype = torch.float64) -> tuple[dict[str, Any], GimliUpdater]:
    model = build_model(arch, seed=4).to(dtype)
    if opt_name == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=0.01, amsgrad=True)
        learn = {"lr": "tensor", "beta1": "group", "eps": "element"}
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        learn = {"lr": "element", "momentum": "group"}
    up = GimliUpdater(model, opt, ce_loss, ce_loss, unroll=J, learn=learn, learn_init=True, hvp=hvp,
                      checkpoint=checkpoint)
    batches, val = make_batches(J, seed=4)
    batches = [(x.to(dtype), y) for x, y in batches]
    val = (val[0].to(dtype), val[1])
    torch.manual_seed(123)  # dropout draws the same masks in each run
    return up.hypergradient(batches, val).hypergrads, up


def _bit_identical(a: dict[str, Any], b: dict[str, Any]) -> bool:
    flat = lambda v: v if isinstance(v, list) else [v]  # noqa: E731
    return a.keys() == b.keys() and all(
        all(torch.equal(x, y) for x, y in zip(flat(a[k]), flat(b[k]))) for k in a
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("arch, opt_name, hvp", [("dropout", "sgd", "rev"), ("mlp_bn", "adam", "rev"),
                                                  ("conv_bn", "sgd", "fwd"), ("dropout", "adam", "fwd")])
def test_checkpointed_tape_is_bit_identical_to_the_full_tape(arch: str, opt_name: str, hvp: str,
                                                             dtype: torch.dtype) -> None:
    J = 7
    full, _ = _hypergrads(arch, opt_name, J, None, hvp, dtype)
    for checkpoint in (1, 3, Checkpointing(every=3), Checkpointing(slots=2, verify=True)):
        ours, up = _hypergrads(arch, opt_name, J, checkpoint, hvp, dtype)
        assert _bit_identical(full, ours), checkpoint


@pytest.mark.parametrize("J, slots", [(1, 1), (7, 1), (20, 2), (33, 3), (50, 5), (12, 12), (12, 40)])
def test_recomputation_is_optimal_and_slots_are_bounded(J: int, slots: int) -> None:
    _, up = _hypergrads("mlp", "sgd", J, slots)
    stats = up.last_tape_stats
    assert stats["max_slots_used"] <= slots
    assert stats["forward_steps"] == (min_forward_steps(J, slots) if slots < J else J)


def test_every_k_counts() -> None:
    _, up = _hypergrads("mlp", "sgd", 10, Checkpointing(every=3))
    assert up.last_tape_stats["forward_steps"] == every_k_forward_steps(10, 3)


def test_full_tape_keeps_every_state_and_recomputes_nothing() -> None:
    _, up = _hypergrads("mlp", "sgd", 6, None)
    assert up.last_tape_stats == {"forward_steps": 6, "max_slots_used": 6, "schedule": "full", "graphs_kept": 0,
                                  "graph_bytes": None, "state_bytes": None}


def test_budget_in_bytes_derives_the_slots() -> None:
    model = build_model("mlp")
    state_bytes = sum(p.numel() * 8 for p in model.parameters()) * 2  # θ and the momentum buffer
    _, up = _hypergrads("mlp", "sgd", 20, Checkpointing(budget_bytes=3 * state_bytes + 5))
    assert up.last_tape_stats["max_slots_used"] == 3
    assert up.last_tape_stats["forward_steps"] == min_forward_steps(20, 3)
    with pytest.raises(ValueError, match="allows no checkpoint slot"):
        _hypergrads("mlp", "sgd", 20, Checkpointing(budget_bytes=state_bytes // 2))


def test_verify_catches_a_nondeterministic_loss() -> None:
    model = build_model("mlp")
    noise = random.Random(0)

    def flaky(m: Any, b: Any) -> Tensor:  # randomness outside torch's generators
        return ce_loss(m, b) * (1 + 1e-3 * noise.random())

    up = GimliUpdater(model, torch.optim.SGD(model.parameters(), lr=0.1), flaky, ce_loss, unroll=8,
                      learn=["lr"], checkpoint=Checkpointing(slots=2, verify=True))
    with pytest.raises(RuntimeError, match="recomputed state before inner step .* differs"):
        up.hypergradient(*make_batches(8))


@pytest.mark.parametrize(
    "checkpoint, exc, match",
    [
        (Checkpointing(), ValueError, "exactly one of"),
        (Checkpointing(slots=2, every=3), ValueError, "exactly one of"),
        (Checkpointing(slots=0), ValueError, "slots"),
        (0, ValueError, "slots"),
        ("1GB", TypeError, "checkpoint must be"),
        (True, TypeError, "checkpoint must be"),
    ],
)
def test_bad_checkpoint_options(checkpoint: Any, exc: type, match: str) -> None:
    model = build_model("mlp")
    with pytest.raises(exc, match=match):
        GimliUpdater(model, torch.optim.SGD(model.parameters(), lr=0.1), ce_loss, ce_loss, unroll=3,
                     learn=["lr"], checkpoint=checkpoint)


def test_commit_with_a_checkpointed_tape() -> None:
    results = []
    for checkpoint in (None, 2):
        model = build_model("mlp_bn", seed=2)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        up = GimliUpdater(model, opt, ce_loss, ce_loss, unroll=7, learn=["lr"], commit=True, checkpoint=checkpoint)
        up.step(*make_batches(7, seed=2))
        results.append((copy.deepcopy(model.state_dict()), float(opt.param_groups[0]["lr"])))
    assert results[0][1] == results[1][1]
    for k in results[0][0]:
        assert torch.equal(results[0][0][k], results[1][0][k]), k


def test_progress_bar_draws_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    import io

    from gimli_bptt.progress import Progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    bar = Progress(3, 3, enabled=True, stream=stream)
    for _ in range(3):
        bar.advance()
    for _ in range(3):
        bar.reversed()
    bar.close()
    assert "forward 3/3 reverse 3/3" in stream.getvalue()
    quiet = io.StringIO()  # not a terminal: nothing is drawn
    bar = Progress(3, 3, enabled=True, stream=quiet)
    bar.advance()
    bar.close()
    assert quiet.getvalue() == ""


@pytest.mark.parametrize("arch", ["dropout", "mlp_bn"])
def test_keep_graphs_gives_the_same_hypergradients(arch: str) -> None:
    results = []
    for keep in (False, True):
        model = build_model(arch, seed=6)
        up = GimliUpdater(model, torch.optim.Adam(model.parameters(), lr=0.01), ce_loss, ce_loss, unroll=5,
                          learn={"lr": "tensor", "beta1": "element"}, learn_init=True, keep_graphs=keep)
        torch.manual_seed(3)
        results.append(up.hypergradient(*make_batches(5, seed=6)).hypergrads)
    assert _bit_identical(results[0], results[1])


def test_keep_graphs_option_errors() -> None:
    model = build_model("mlp")
    for kw, match in ((dict(checkpoint=2), "cannot be combined"), (dict(hvp="fwd"), "use hvp='rev'")):
        with pytest.raises(ValueError, match=match):
            GimliUpdater(model, torch.optim.SGD(model.parameters(), lr=0.1), ce_loss, ce_loss, unroll=3,
                         learn=["lr"], keep_graphs=True, **kw)
