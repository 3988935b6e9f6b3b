# SPDX-License-Identifier: Apache-2.0
"""Saving and resuming meta-training, and determinism on the CPU."""
from __future__ import annotations

import functools
import io
from typing import Any

import pytest
import torch

from gimli_bptt import GimliUpdater

from optim_table import row
from problems import build_model, ce_loss, make_batches


def _build(seed: int = 0, **kw: Any) -> GimliUpdater:
    model = build_model("dropout", seed=seed)
    opt = row("adam-lr").for_model(model)
    kw.setdefault("learn", {"lr": "group", "beta1": "tensor", "eps": "element"})
    return GimliUpdater(model, opt, ce_loss, ce_loss, unroll=3, commit=True,
                        meta_opt=functools.partial(torch.optim.Adam, lr=1e-3), **kw)


def _run(up: GimliUpdater, steps: range) -> None:
    for i in steps:
        torch.manual_seed(1000 + i)  # the losses draw dropout masks
        up.step(*make_batches(3, seed=i))


def test_resume_is_bit_identical() -> None:
    straight = _build()
    _run(straight, range(4))

    first = _build()
    _run(first, range(2))
    buffer = io.BytesIO()
    torch.save({"updater": first.state_dict(), "model": first.model.state_dict(), "opt": first.opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # a state_dict is tensors and plain values only

    resumed = _build(seed=7)  # different initial weights: everything must come from the checkpoint
    resumed.model.load_state_dict(saved["model"])
    resumed.opt.load_state_dict(saved["opt"])
    resumed.load_state_dict(saved["updater"])
    assert resumed.meta_steps == 2
    _run(resumed, range(2, 4))
    for (name, a), (_, b) in zip(straight.named_meta_parameters(), resumed.named_meta_parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert [g["lr"] for g in straight.opt.param_groups] == [g["lr"] for g in resumed.opt.param_groups]


def test_same_seeds_give_bit_identical_hypergradients() -> None:
    grads = []
    for _ in range(2):
        up = _build()
        torch.manual_seed(5)
        grads.append(up.hypergradient(*make_batches(3, seed=5)).hypergrads)
    for name, value in grads[0].items():
        flat = value if isinstance(value, list) else [value]
        other = grads[1][name] if isinstance(grads[1][name], list) else [grads[1][name]]
        assert all(torch.equal(a, b) for a, b in zip(flat, other)), name


def test_load_rejects_a_different_configuration_and_changes_nothing() -> None:
    saved = _build().state_dict()
    other = _build(learn={"lr": "tensor"})
    before = [t.detach().clone() for t in other.meta_parameters()]
    with pytest.raises(ValueError, match=r"learn: saved .*'beta1'"):
        other.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(before, other.meta_parameters()))
    with pytest.raises(ValueError, match="missing 'phi'"):
        other.load_state_dict({})
