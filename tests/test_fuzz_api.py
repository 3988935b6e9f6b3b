# SPDX-License-Identifier: Apache-2.0
"""Fuzzing the public API's arguments: every bad input gets a documented exception, never a crash."""
from __future__ import annotations

import os
import random
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gimli_bptt import GimliUpdater, Memory, NonFiniteError

from optim_table import row
from problems import build_model, ce_loss, make_batches
from snapshots import assert_unchanged, snapshot

DOCUMENTED = (TypeError, ValueError)

anything = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 12), st.floats(allow_nan=True), st.text(max_size=6),
    st.lists(st.sampled_from(["lr", "momentum", "beta1", "nesterov", "x"]), max_size=3),
    st.dictionaries(st.sampled_from(["lr", "momentum", "dampening", "beta1", "betas", "eps", "foo"]),
                    st.sampled_from(["group", "tensor", "element", "layer", 3, None]), max_size=3),
)


@settings(max_examples=40)
@given(
    unroll=anything, learn=anything, hvp=anything, memory=st.one_of(anything, st.builds(
        Memory, slots=st.one_of(st.none(), st.integers(-1, 4)), every=st.one_of(st.none(), st.integers(-1, 4)),
        budget=st.one_of(st.none(), st.integers(-1, 2**24)), keep_graphs=st.booleans(), verify=anything)),
    on_nonfinite=anything, learn_init=st.booleans(), commit=st.booleans(),
    opt_kind=st.sampled_from(["sgd", "adam", "rprop"]),
)
def test_constructor_raises_only_documented_errors(unroll: Any, learn: Any, hvp: Any, memory: Any,
                                                   on_nonfinite: Any, learn_init: bool, commit: bool,
                                                   opt_kind: str) -> None:
    model = build_model("mlp")
    opt = row({"sgd": "sgd-half_momentum", "adam": "adam-default", "rprop": "rprop-default"}[opt_kind]).for_model(
        model, grouped=False)
    try:
        up = GimliUpdater(model, opt, ce_loss, ce_loss, unroll=unroll, learn=learn, hvp=hvp, memory=memory,
                          on_nonfinite=on_nonfinite, learn_init=learn_init, commit=commit)
    except DOCUMENTED as exc:
        assert str(exc), "an error must say what is wrong"
        return
    # whatever was accepted must run
    up.hypergradient(*make_batches(up.unroll))


@settings(max_examples=25)
@given(n_batches=st.integers(0, 5), shape_bad=st.booleans(), poison=st.sampled_from([None, "nan", "inf"]),
       kind=st.sampled_from(["list", "tuple", "generator", "tensor", "none", "str"]))
def test_step_raises_only_documented_errors_and_changes_nothing(n_batches: int, shape_bad: bool, poison: Any,
                                                                kind: str) -> None:
    model = build_model("mlp_bn")
    up = GimliUpdater(model, row("sgd-heavy_momentum").for_model(model, grouped=False), ce_loss, ce_loss,
                      unroll=3, learn={"lr": "tensor"})
    batches, val = make_batches(max(n_batches, 1))
    batches = batches[:n_batches]
    if poison and batches:
        x, y = batches[-1]
        batches[-1] = (torch.full_like(x, float(poison)), y)
    arg: Any = {"list": batches, "tuple": tuple(batches), "generator": (b for b in batches),
                "tensor": torch.zeros(3), "none": None, "str": "abc"}[kind]
    before = snapshot(up)
    try:
        up.step(arg, val)
    except (*DOCUMENTED, NonFiniteError) as exc:
        assert str(exc)
        assert_unchanged(before, snapshot(up))
        return
    assert n_batches == 3 and kind in ("list", "tuple", "generator") and poison is None


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc to read resident memory")
def test_short_soak_does_not_leak() -> None:
    """200 meta steps (bench/soak.py runs 2,000 with a tighter bound): no graph survives a step."""
    model = build_model("mlp_bn")
    up = GimliUpdater(model, row("adam-lr").for_model(model, grouped=False), ce_loss, ce_loss, unroll=3,
                      learn={"lr": "group", "beta1": "tensor"}, commit=True, memory=Memory(slots=2))
    rng = random.Random(0)
    data = [make_batches(3, seed=s) for s in range(8)]
    for _ in range(20):
        up.step(*data[rng.randrange(8)])
    start = _rss_mib()
    for _ in range(200):
        up.step(*data[rng.randrange(8)])
    assert _rss_mib() - start < 50.0
