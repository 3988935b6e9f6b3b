# SPDX-License-Identifier: Apache-2.0
"""The approximate hypergradients (first order, truncated), each exact against an autograd unroll of its definition."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gimli_bptt import GimliUpdater, Memory
from gimli_bptt.metaparams import flat_list
from gimli_bptt.testing import check_hypergradients, float64_rtol, relative_error

from optim_table import ROWS, Row
from problems import build_model, ce_loss, make_batches

TOL = 1e-9
#: First order: Adam-type steps at their first step subtract two paths of nearly equal size in
#: ḡ (Note [Adam at a zero second moment] and the VJP floors of tests/optim_table.py); the full
#: hypergradient adds second-order terms of the same size to them, the first-order one does not,
#: so the difference of the paths is a larger share of it (measured: 2.5e-9 for adam-maximize's
#: weight decay).
TOL_FIRST_ORDER = 1e-8
_ROWS = [pytest.param(r, id=r.id) for r in ROWS if "hypergrad" not in r.skips]
# (models without a bias right before BatchNorm: that bias's gradient is pure round-off, which
# optimizers that divide by a running second moment (Adafactor's eps1 ~ 1e-16) amplify into
# hypergradients of noise; problems.py's mlp_bn_dropout has no such bias)


def _updater(row: Row, arch: str, J: int, learn: dict[str, str], **options: Any) -> GimliUpdater:
    model = build_model(arch, seed=5)
    return GimliUpdater(model, row.for_model(model), ce_loss, ce_loss, unroll=J, learn=learn, **options)


def _check(up: GimliUpdater, J: int, seed: int = 5) -> dict[str, float]:
    errors = check_hypergradients(up, *make_batches(J, seed=seed))
    tol = TOL_FIRST_ORDER if up.options.first_order else TOL
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"
    return errors


@pytest.mark.parametrize("row", _ROWS)
def test_first_order_is_exact_against_its_definition(row: Row) -> None:
    """Every hyperparameter and θ_0 (FOMAML) against an unroll whose G_j carry no graph."""
    arch = "conv" if row.shapes.accepts((3, 1, 3, 3)) else "mlp"
    up = _updater(row, arch, 4, {n: "tensor" for n in row.impl.hyper_names}, learn_init=True, first_order=True)
    _check(up, 4)
    assert up.last_tape_stats is not None and up.last_tape_stats.graphs_kept == 0


@pytest.mark.parametrize("row", _ROWS)
def test_truncated_is_exact_against_its_definition(row: Row) -> None:
    """The last K = 2 of J = 5 steps, against an unroll whose state and φ_opt are detached at step 3."""
    arch = "conv" if row.shapes.accepts((3, 1, 3, 3)) else "mlp"
    up = _updater(row, arch, 5, {n: "element" for n in row.impl.hyper_names}, truncate=2)
    _check(up, 5)
    assert up.last_tape_stats is not None and up.last_tape_stats.max_slots_used <= 2


def test_fomaml_with_plain_sgd_is_the_validation_gradient_at_the_end() -> None:
    """For SGD without momentum, dθ'/dθ = I: the first-order θ_0 hypergradient is ∇L_val(θ'_J)."""
    model = build_model("mlp", seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    up = GimliUpdater(model, opt, ce_loss, ce_loss, unroll=3, learn_init=True, first_order=True)
    batches, val = make_batches(3, seed=1)
    result = up.hypergradient(batches, val)
    # θ'_J by plain training on a copy, then the gradient there
    import copy

    twin = copy.deepcopy(model)
    t_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    for b in batches:
        t_opt.zero_grad()
        ce_loss(twin, b).backward()
        t_opt.step()
    t_opt.zero_grad()
    ce_loss(twin, val).backward()
    for (name, p) in twin.named_parameters():
        # torch.optim.SGD's steps and our own round differently; SGD on the MLP, J = 3, grows the
        # rounding 1.2 times (hypergradient_amplification of this first-order hypergradient)
        assert relative_error(result.hypergrads[f"init.{name}"], p.grad) <= float64_rtol(terms=1, condition=10), name


def test_truncate_to_the_whole_unroll_is_the_full_hypergradient_bit_for_bit() -> None:
    row = next(r for r in ROWS if r.torch_cls is torch.optim.Adam)
    batches, val = make_batches(5, seed=3)
    full = _updater(row, "mlp_bn", 5, {"lr": "tensor", "beta1": "group"}, learn_init=True).hypergradient(batches, val)
    trunc = _updater(row, "mlp_bn", 5, {"lr": "tensor", "beta1": "group"}, learn_init=True,
                     truncate=5).hypergradient(batches, val)
    for name, v in full.hypergrads.items():
        assert all(torch.equal(a, b) for a, b in zip(flat_list(v), flat_list(trunc.hypergrads[name]))), name
    assert torch.equal(full.train_losses, trunc.train_losses)


def test_a_truncated_tape_holds_the_window_only() -> None:
    """The tape of truncate=K holds at most K states whatever J is, and the losses of all J steps."""
    row = next(r for r in ROWS if r.torch_cls is torch.optim.SGD)
    for J in (4, 12):
        up = _updater(row, "mlp", J, {"lr": "group"}, truncate=3, memory=None)
        result = up.hypergradient(*make_batches(J, seed=4))
        assert result.train_losses.shape == (J,)
        assert up.last_tape_stats is not None and up.last_tape_stats.max_slots_used == 3
        assert up.last_tape_stats.forward_steps == 3


@settings(max_examples=15, deadline=None)
@given(row=st.sampled_from([p.values[0] for p in _ROWS]), J=st.integers(1, 6), data=st.data(),
       mode=st.sampled_from(["first_order", "truncate", "both"]), hvp=st.sampled_from(["rev", "fwd"]),
       arch=st.sampled_from(["mlp", "mlp_bn_dropout", "conv"]), granularity=st.sampled_from(["group", "tensor", "element"]),
       memory=st.sampled_from(["auto", None, "slots"]), seed=st.integers(0, 2**10))
def test_modes_random(row: Row, J: int, data: Any, mode: str, hvp: str, arch: str, granularity: str,
                      memory: Any, seed: int) -> None:
    if not row.shapes.accepts((3, 1, 3, 3)) and arch == "conv":
        arch = "mlp"
    K = data.draw(st.integers(1, J))
    options: dict[str, Any] = dict(hvp=hvp, memory=Memory(slots=1) if memory == "slots" else memory)
    if mode in ("first_order", "both"):
        options["first_order"] = True
    if mode in ("truncate", "both"):
        options["truncate"] = K
    learn_init = "truncate" not in options or K == J
    names = row.impl.hyper_names[: 1 + seed % len(row.impl.hyper_names)]
    up = _updater(row, arch, J, {n: granularity for n in names}, learn_init=learn_init, **options)
    _check(up, J, seed)


@pytest.mark.parametrize("options, exc, match", [
    (dict(truncate=5), ValueError, "between 1 and unroll=4"),
    (dict(truncate=0), ValueError, "between 1 and unroll=4"),
    (dict(truncate=2.0), TypeError, "truncate must be None or a number"),
    (dict(truncate=2, learn_init=True), ValueError, "θ_0 is a constant of the truncated window"),
    (dict(first_order=1), TypeError, "first_order must be True or False"),
    (dict(first_order=True, memory=Memory(keep_graphs=True)), ValueError, "first_order=True never builds"),
])
def test_bad_mode_options(options: dict[str, Any], exc: type, match: str) -> None:
    row = next(r for r in ROWS if r.torch_cls is torch.optim.SGD)
    with pytest.raises(exc, match=match):
        _updater(row, "mlp", 4, {"lr": "group"}, **options)


def test_the_approximations_change_the_hypergradient() -> None:
    """A check that the tests above can fail: on a curved problem both differ from the exact one."""
    row = next(r for r in ROWS if r.torch_cls is torch.optim.SGD and r.kwargs.get("momentum"))
    batches, val = make_batches(5, seed=6)
    exact = _updater(row, "mlp_bn", 5, {"lr": "tensor"}).hypergradient(batches, val).hypergrads["lr"]
    for options in (dict(first_order=True), dict(truncate=2)):
        approx = _updater(row, "mlp_bn", 5, {"lr": "tensor"}, **options).hypergradient(batches, val).hypergrads["lr"]
        assert not torch.allclose(exact, approx, rtol=1e-3), options
