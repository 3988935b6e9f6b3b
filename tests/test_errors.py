# SPDX-License-Identifier: Apache-2.0
"""Bad input gets an error that names the problem; a failed step changes nothing."""
from __future__ import annotations

import functools
import random
import re
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from gimli_bptt import GimliUpdater, Memory, NonFiniteError, supported_optimizers

from optim_table import row
from problems import build_model, ce_loss, make_batches
from snapshots import assert_unchanged, snapshot


def _updater(**kw: Any) -> GimliUpdater:
    model = kw.pop("model", None) or build_model("mlp_bn", seed=0)
    opt = kw.pop("opt", None) or row("sgd-heavy_momentum").for_model(model, grouped=False)
    kw.setdefault("unroll", 3)
    kw.setdefault("learn", {"lr": "group"})
    return GimliUpdater(model, opt, kw.pop("train_loss", ce_loss), kw.pop("val_loss", ce_loss), **kw)


# --------------------------------------------------------------------------- construction
def test_unsupported_optimizer_names_it_and_the_supported_ones() -> None:
    model = build_model("mlp")
    names = supported_optimizers()
    assert {"Adam", "AdamW", "SGD", "Adagrad", "RMSprop", "Adadelta", "Adamax"} <= set(names)
    with pytest.raises(TypeError, match=r"LBFGS.*supported optimizers: " + re.escape(", ".join(names))):
        GimliUpdater(model, torch.optim.LBFGS(model.parameters()), ce_loss, ce_loss, learn=["lr"])


@pytest.mark.parametrize(
    "learn, match",
    [
        ({"nesterov": "group"}, "boolean option of SGD"),
        ({"betas": "group"}, "no hyperparameter 'betas'"),
        ({"beta1": "group"}, "SGD has no hyperparameter 'beta1'"),
        ({"lr": "layer"}, "unknown granularity 'layer'"),
    ],
)
def test_unlearnable_hyperparameters(learn: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _updater(learn=learn)


def test_betas_hint_for_adam() -> None:
    model = build_model("mlp")
    with pytest.raises(ValueError, match="use 'beta1' and/or 'beta2'"):
        GimliUpdater(model, row("adam-default").for_model(model, grouped=False), ce_loss, ce_loss,
                     learn={"betas": "group"})


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(unroll=0), ValueError, "unroll must be at least 1"),
        (dict(unroll=2.0), TypeError, "unroll must be an int"),
        (dict(hvp="mixed"), ValueError, "hvp must be one of"),
        (dict(learn=None), ValueError, "nothing to meta-learn"),
        (dict(learn="lr"), TypeError, "learn must be a dict"),
        (dict(on_nonfinite="warn"), ValueError, "on_nonfinite"),
        (dict(commit=True, learn_init=True), ValueError, "contradict"),
        (dict(loss_params={"w": torch.tensor(1.0, dtype=torch.float64)}), ValueError, "requires grad"),
        (dict(loss_params={"w": torch.tensor(1.0, dtype=torch.float32, requires_grad=True)}), ValueError,
         "float32 but the model is torch.float64"),
        (dict(loss_params={"w": 1.0}), TypeError, "must be a tensor"),
        (dict(meta_opt=3), TypeError, "meta_opt"),
    ],
)
def test_bad_options(kwargs: dict[str, Any], exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        _updater(**kwargs)


def test_optimizer_over_foreign_tensors() -> None:
    model = build_model("mlp")
    other = nn.Linear(2, 2).double()
    with pytest.raises(ValueError, match="not parameters of the model"):
        GimliUpdater(model, row("sgd-plain").for_model(other, grouped=False), ce_loss, ce_loss, learn=["lr"])


# --------------------------------------------------------------------------- step()
def test_wrong_number_of_batches() -> None:
    up = _updater()
    batches, val = make_batches(2)
    with pytest.raises(ValueError, match="got 2 train batches but unroll=3"):
        up.step(batches, val)
    with pytest.raises(TypeError, match="sequence of the J inner batches"):
        up.step(batches[0][0], val)


@pytest.mark.parametrize("unroll", [1, 2, 3])
def test_one_batch_where_a_list_is_expected_says_how_to_pass_it(unroll: int) -> None:
    up = _updater(unroll=unroll)
    batches, val = make_batches(unroll)
    before = snapshot(up)
    for one in (batches[0], list(batches[0])):  # (x, y) or [x, y]: inputs and labels, not two batches
        with pytest.raises(ValueError, match=r"pass a list of batches, e\.g\. \[batch\] \* unroll, or \[\(x, y\)\]"):
            up.step(one, val)
    assert_unchanged(before, snapshot(up))
    up.step(batches, val)  # the list of J (x, y) batches is still taken, for every J (J = 2 included)


def test_a_list_of_tensor_batches_is_not_taken_for_one_batch() -> None:
    model = nn.Linear(3, 1).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = lambda m, x: m(x).pow(2).mean()  # noqa: E731  # each batch is one tensor
    up = GimliUpdater(model, opt, loss, loss, unroll=2, learn={"lr": "group"})
    xs = [torch.randn(4, 3, dtype=torch.float64) for _ in range(3)]
    up.step(xs[:2], xs[2])
    with pytest.raises(ValueError, match="got 3 tensors as train batches but unroll=2: give exactly one batch per"):
        up.step(xs, xs[2])


@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(), nn.MSELoss()])
@pytest.mark.parametrize("which", ["train_loss", "val_loss"])
def test_a_loss_module_names_the_signature_and_the_fix(loss: nn.Module, which: str) -> None:
    with pytest.raises(TypeError, match=rf"{which} is the loss module {type(loss).__name__}\(\).*"
                                        r"\(model, batch\) -> scalar tensor.*"
                                        rf"Fix: {which}=lambda m, b: F\.cross_entropy\(m\(b\[0\]\), b\[1\]\)"):
        _updater(**{which: loss})


def _one_argument(batch: Any) -> Tensor:
    return batch[0].sum()


@pytest.mark.parametrize("loss", [_one_argument, lambda m, b, extra: m(b[0]).sum(), lambda: 0.0])
def test_a_loss_that_cannot_take_model_and_batch_names_the_fix(loss: Any) -> None:
    with pytest.raises(TypeError, match=r"train_loss must be a function \(model, batch\) -> scalar tensor, taking two "
                                        r"positional arguments, but its signature is .*Fix, e\.g\.: train_loss=lambda"):
        _updater(train_loss=loss)


def test_losses_of_other_shapes_are_accepted() -> None:
    class Loss(nn.Module):  # a module whose forward takes (model, batch)
        def forward(self, model: Any, batch: Any) -> Tensor:
            return ce_loss(model, batch)

    def with_default(model: Any, batch: Any, scale: float = 1.0) -> Tensor:
        return scale * ce_loss(model, batch)

    def varargs(*args: Any) -> Tensor:
        return ce_loss(*args)

    for loss in (Loss(), with_default, varargs, functools.partial(with_default, scale=2.0)):
        up = _updater(train_loss=loss, val_loss=loss)
        up.step(*make_batches(3))


@pytest.mark.parametrize(
    "loss, exc, match",
    [
        (lambda m, b: m(b[0]).sum(1), ValueError, r"scalar \(0-d\) tensor, got shape \(8,\)"),
        (lambda m, b: 1.0, TypeError, "must return a scalar torch.Tensor"),
        (lambda m, b: torch.tensor(1.0, dtype=torch.float64), ValueError, "does not depend on the model's parameters"),
    ],
)
def test_bad_train_loss(loss: Any, exc: type, match: str) -> None:
    up = _updater(train_loss=loss)
    before = snapshot(up)
    with pytest.raises(exc, match=match):
        up.step(*make_batches(3))
    assert_unchanged(before, snapshot(up))


def test_bad_val_loss() -> None:
    up = _updater(val_loss=lambda m, b: m(b[0]))
    with pytest.raises(ValueError, match="val_loss must return a scalar"):
        up.step(*make_batches(3))


@pytest.mark.parametrize("where", [0, 1, 2])
def test_nan_in_a_batch_names_the_step_and_changes_nothing(where: int) -> None:
    up = _updater()
    batches, val = make_batches(3)
    x, y = batches[where]
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    batches[where] = (x, y)
    before = snapshot(up)
    with pytest.raises(NonFiniteError, match=f"inner step {where}"):
        up.step(batches, val)
    assert_unchanged(before, snapshot(up))


def _nonfinite_updater(**kw: Any) -> GimliUpdater:
    # sqrt(w) at w = 0: every loss and gradient is finite, the mixed second derivative is not.
    w = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)

    def train_loss(m: Any, b: Any) -> Tensor:
        return ce_loss(m, b) + torch.sqrt(w) * sum((p**2).sum() for p in m.parameters())

    return _updater(train_loss=train_loss, loss_params={"w": w}, **kw)


def test_nonfinite_hypergradient_raises_and_changes_nothing() -> None:
    up = _nonfinite_updater()
    before = snapshot(up)
    with pytest.raises(NonFiniteError, match="non-finite hypergradient for loss.w"):
        up.step(*make_batches(3))
    assert_unchanged(before, snapshot(up))


def test_nonfinite_hypergradient_can_skip() -> None:
    up = _nonfinite_updater(on_nonfinite="skip")
    before = snapshot(up)
    result = up.step(*make_batches(3))
    assert result.skipped and result.nonfinite == ["loss.w"]
    assert_unchanged(before, snapshot(up))


# --------------------------------------------------------------------------- fault injection
class Injected(Exception):
    pass


def _failing_loss(fail_at: int, exc: type[BaseException]) -> Any:
    calls = {"n": 0}

    def loss(m: Any, b: Any) -> Tensor:
        calls["n"] += 1
        if calls["n"] == fail_at + 1:
            raise exc("injected")
        return ce_loss(m, b)

    return loss


@pytest.mark.parametrize("exc", [Injected, KeyboardInterrupt])
@pytest.mark.parametrize("hvp", ["rev", "fwd"])
@pytest.mark.parametrize("commit, memory", [(False, None), (True, None), (True, Memory(slots=1)),
                                            (False, Memory(keep_graphs=True)), (True, 2**30)])
def test_exception_in_tape_recomputation_or_reverse_sweep_changes_nothing(
        exc: type[BaseException], hvp: str, commit: bool, memory: Any) -> None:
    if hvp == "fwd" and isinstance(memory, Memory) and memory.keep_graphs:
        pytest.skip("kept graphs are a reverse-over-reverse plan")
    J = 4
    counted = {"n": 0}

    def counting(m: Any, b: Any) -> Tensor:
        counted["n"] += 1
        return ce_loss(m, b)

    probe = _updater(unroll=J, train_loss=counting, hvp=hvp, memory=memory)
    probe.hypergradient(*make_batches(J, seed=4))
    total = counted["n"]  # the tape's J calls, then recomputations (checkpointing) and the sweep's
    rng = random.Random(hash((exc.__name__, hvp, commit, repr(memory))) % 1000)
    # a plan that keeps every graph recomputes nothing: the sweep then calls no loss to fail in
    for fail_at in [rng.randrange(0, J)] + ([rng.randrange(J, total)] if total > J else []):
        model = build_model("mlp_bn", seed=1)
        opt = row("adam-lr").for_model(model, grouped=False)
        warm = _updater(model=model, opt=opt, unroll=J, learn={"lr": "tensor"}, commit=True)
        warm.step(*make_batches(J, seed=2))  # the optimizer now has state, the meta optimizer too
        up = _updater(model=model, opt=opt, unroll=J, learn={"lr": "tensor", "beta1": "element"},
                      train_loss=_failing_loss(fail_at, exc), hvp=hvp, commit=commit, memory=memory)
        before = snapshot(up)
        with pytest.raises(exc, match="injected"):
            up.step(*make_batches(J, seed=4))
        assert_unchanged(before, snapshot(up))


def test_exception_in_val_loss_changes_nothing() -> None:
    up = _updater(val_loss=_failing_loss(0, Injected))
    before = snapshot(up)
    with pytest.raises(Injected):
        up.step(*make_batches(3))
    assert_unchanged(before, snapshot(up))


class _FailingAdam(torch.optim.Adam):
    """A meta optimizer that fails after it has already changed φ and its own state."""

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        super().step(closure)
        raise Injected("injected in the meta optimizer")


@pytest.mark.parametrize("learn_init", [False, True])
def test_exception_in_meta_optimizer_changes_nothing(learn_init: bool) -> None:
    up = _updater(meta_opt=functools.partial(_FailingAdam, lr=0.1), learn_init=learn_init,
                  learn={"lr": "group", "momentum": "element"})
    before = snapshot(up)
    with pytest.raises(Injected):
        up.step(*make_batches(3))
    assert_unchanged(before, snapshot(up))
    assert up.opt.param_groups[0]["lr"] == 0.1


def test_nan_in_a_batch_can_skip_the_update() -> None:
    up = _updater(on_nonfinite="skip")
    batches, val = make_batches(3)
    x, y = batches[1]
    batches[1] = (torch.full_like(x, float("inf")), y)
    before = snapshot(up)
    result = up.step(batches, val)
    assert result.skipped and "inner step 1" in result.nonfinite[0]
    assert up.skipped_steps == 1 and up.meta_steps == 0
    assert_unchanged(before, snapshot(up))


def test_ignore_checks_nothing() -> None:
    """on_nonfinite="ignore": no NaN check (no host sync) and no error, as its docstring says."""
    up = _updater(on_nonfinite="ignore")
    batches, val = make_batches(3)
    x, y = batches[1]
    batches[1] = (torch.full_like(x, float("nan")), y)
    result = up.hypergradient(batches, val)
    assert not result.nonfinite and not result.skipped
    assert torch.isnan(result.train_losses[1]) and torch.isnan(result.val_loss)


@pytest.mark.parametrize("keyword", ["check_finite", "checkpoint", "memory_budget", "keep_graphs", "unrol"])
def test_an_unknown_keyword_is_a_type_error_naming_it(keyword: str) -> None:
    """GimliUpdater's options are plain keyword-only parameters: a keyword it does not take (a
    misspelling, or a spelling it never had) fails as any Python call does, naming the keyword."""
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{keyword}'"):
        _updater(**{keyword: 2})


@pytest.mark.parametrize("mode", [{}, {"memory": Memory(keep_graphs=True)}, {"memory": Memory(slots=2)},
                                  {"hvp": "fwd"}], ids=["full", "keep_graphs", "slots", "fwd"])
@pytest.mark.parametrize("where", [0, 2])
def test_deferred_finiteness_check_names_the_first_bad_step(monkeypatch: pytest.MonkeyPatch, where: int,
                                                           mode: dict[str, Any]) -> None:
    # Note [Deferred finiteness check]: on an accelerator ℓ_j are checked once after the tape's
    # first pass; here the CPU is made to behave like one.
    from gimli_bptt import problem as problem_mod

    monkeypatch.setattr(problem_mod, "DEFERRED_CHECK_DEVICES", frozenset({"cpu"}))
    calls: list[int] = []
    real = problem_mod.InnerProblem.check_losses
    monkeypatch.setattr(problem_mod.InnerProblem, "check_losses",
                        lambda self, losses: (calls.append(len(losses)), real(self, losses))[1])
    up = _updater(**mode)
    batches, val = make_batches(3)
    for k in (where, 1) if where == 0 else (where,):  # with where=0, step 1 is bad too: the first is named
        x, y = batches[k]
        x = x.clone()
        x[0, 0, 0, 0] = float("inf") if k == 1 else float("nan")
        batches[k] = (x, y)
    before = snapshot(up)
    with pytest.raises(NonFiniteError, match=f"is nan at inner step {where}"):
        up.step(batches, val)
    assert calls == [3]  # one check of all three losses, not one per step
    assert_unchanged(before, snapshot(up))
    # and a finite meta step still goes through, checked once
    calls.clear()
    up.step(*make_batches(3))
    assert calls == [3]


def test_nonfinite_names_every_non_finite_hypergradient_and_only_those() -> None:
    """MetaParameters.nonfinite's batched check: a 2-norm that overflows on finite values is not a
    non-finite hypergradient, NaN and infinities anywhere are, empty tensors are skipped."""
    from gimli_bptt.metaparams import MetaParameters

    big = torch.full((4,), 3e38)  # finite, but its float32 2-norm overflows
    assert not bool(torch.isfinite(torch.linalg.vector_norm(big)))
    hg: dict[str, Any] = {"lr": [torch.tensor(0.1), torch.tensor(0.2)], "loss.w": big, "init.b": torch.zeros(0),
                          "init.w": torch.ones(3, 3, dtype=torch.float64)}
    assert MetaParameters.nonfinite(hg) == []
    hg["lr"][1] = torch.tensor(float("-inf"))
    hg["init.w"] = hg["init.w"].clone()
    hg["init.w"][1, 2] = float("nan")
    assert MetaParameters.nonfinite(hg) == ["lr", "init.w"]
    assert MetaParameters.nonfinite({}) == [] and MetaParameters.nonfinite({"x": torch.zeros(0)}) == []
