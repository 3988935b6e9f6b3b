# SPDX-License-Identifier: Apache-2.0
"""Second-order-safe passes: each equivalent against the op it replaces, the mode, the registry, the wiring, the errors."""
from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gimli_bptt import GimliUpdater, Memory
from gimli_bptt.second_order import diagnosis, registry as so_registry, safe_mode
from gimli_bptt.second_order import (MissingDoubleBackwardError, attention_math, hardsigmoid_relu6, missing_derivative,
                                     register_equivalent, registered_equivalents, second_order_safe,
                                     unregister_equivalent)
from gimli_bptt.testing import check_hypergradients, float64_rtol, relative_error

D = torch.float64
TOL = 1e-9


@pytest.fixture
def registry() -> Iterator[None]:
    """Restores the registry as it was after a test that changes it."""
    saved = dict(so_registry._REGISTRY)
    try:
        yield
    finally:
        so_registry._REGISTRY.clear()
        so_registry._REGISTRY.update(saved)


def _second_derivative(f: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    x = x.detach().requires_grad_(True)
    y = f(x)
    w = torch.randn_like(y)
    (g,) = torch.autograd.grad((y * y * w).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad((g * torch.randn_like(g)).sum(), x)
    return h


# --------------------------------------------------------------------------- the equivalents
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_hardsigmoid_equivalent_has_the_same_bits_and_first_derivative(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = torch.randn(100_003, dtype=dtype) * 4  # long enough for the vectorised kernel and its tail
    x[:8] = torch.tensor([-3.0, 3.0, 0.0, 6.0, -6.0, 2.99999, -2.99999, -0.0], dtype=dtype)
    x.requires_grad_(True)
    a, b = F.hardsigmoid(x), hardsigmoid_relu6(x)
    assert torch.equal(a, b)
    w = torch.randn_like(a)
    (ga,) = torch.autograd.grad((a * a * w).sum(), x)
    (gb,) = torch.autograd.grad((b * b * w).sum(), x)
    assert torch.equal(ga, gb)  # PyTorch's own slope (1/6 rounded to float32), in every dtype


def test_hardsigmoid_equivalent_in_place_and_twice_differentiable() -> None:
    torch.manual_seed(0)
    x = torch.randn(50, dtype=D) * 4
    y = x.clone()
    out = hardsigmoid_relu6(y, inplace=True)
    assert out is y and torch.equal(y, F.hardsigmoid(x))
    with pytest.raises(RuntimeError, match="hardsigmoid_backward"):
        _second_derivative(F.hardsigmoid, x)  # why the entry exists
    x = x[(x.abs() - 3).abs() > 1e-3][:8]  # away from the kinks
    assert torch.autograd.gradgradcheck(lambda t: hardsigmoid_relu6(t) ** 2, (x.requires_grad_(True),))


def test_hardsigmoid_equivalent_under_forward_mode_ad() -> None:
    """The value carries no tangent of its own (detach, not no_grad): forward-over-reverse is exact."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    x, v = torch.randn(40, dtype=D) * 4, torch.randn(40, dtype=D)
    with fwAD.dual_level():
        a = fwAD.unpack_dual(F.hardsigmoid(fwAD.make_dual(x, v))).tangent
        b = fwAD.unpack_dual(hardsigmoid_relu6(fwAD.make_dual(x, v))).tangent
    assert torch.equal(a, b)


def _qkv(B: int = 2, H: int = 3, L: int = 5, S: int = 4, E: int = 6) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, H, L, E, dtype=D, generator=g), torch.randn(B, H, S, E, dtype=D, generator=g),
            torch.randn(B, H, S, E, dtype=D, generator=g))


ATTENTION_CASES: dict[str, dict[str, Any]] = {
    "plain": {},
    "scale": {"scale": 0.3},
    "causal": {"is_causal": True},
    "bool mask": {"attn_mask": torch.rand(5, 4, generator=torch.Generator().manual_seed(1)) > 0.3},
    "float mask": {"attn_mask": torch.randn(2, 1, 5, 4, dtype=D, generator=torch.Generator().manual_seed(2))},
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_equivalent_matches_the_fused_kernel(case: str) -> None:
    kwargs = ATTENTION_CASES[case]
    if case == "bool mask":
        kwargs["attn_mask"][:, 0] = True  # no fully masked row (NaN either way)
    q, k, v = (t.requires_grad_(True) for t in _qkv(S=5 if case == "causal" else 4))
    fused = F.scaled_dot_product_attention(q, k, v, **kwargs)
    math = attention_math(q, k, v, **kwargs)
    # Torch's kernel and the equivalent sum in other orders. The attention and its gradients grow
    # their rounding at most 2.4 times over these cases (testing.rounding_amplification of
    # attention_math and its gradients, float32 vs float64), bounded by 10.
    tol = float64_rtol(terms=1, condition=10)
    assert relative_error(fused, math) <= tol
    w = torch.randn_like(fused)
    g_fused = torch.autograd.grad((fused * w).sum(), (q, k, v))
    g_math = torch.autograd.grad((math * w).sum(), (q, k, v), create_graph=True)
    for a, b in zip(g_fused, g_math):
        assert relative_error(a, b) <= tol
    h = torch.autograd.grad(sum((g * g).sum() for g in g_math), (q, k, v))  # the double backward exists
    assert all(t is not None and torch.isfinite(t).all() for t in h)


def test_attention_equivalent_with_dropout_draws_the_same_mask() -> None:
    q, k, v = _qkv()
    torch.manual_seed(3)
    a = F.scaled_dot_product_attention(q, k, v, dropout_p=0.4)
    torch.manual_seed(3)
    b = attention_math(q, k, v, dropout_p=0.4)
    assert relative_error(a, b) <= float64_rtol(terms=1, condition=10)  # as the attention without dropout


def test_attention_equivalent_is_twice_differentiable() -> None:
    q, k, v = (t[:1, :1, :3, :2].clone().requires_grad_(True) for t in _qkv())
    assert torch.autograd.gradgradcheck(lambda a, b, c: attention_math(a, b, c, is_causal=True), (q, k, v))


# --------------------------------------------------------------------------- the mode
def test_the_mode_replaces_attention_inside_multi_head_attention() -> None:
    """F.multi_head_attention_forward calls F.scaled_dot_product_attention from its Python body:
    the mode re-enters itself there, so the nested call runs on the math backend."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(6, 2, batch_first=True).double()
    x = torch.randn(2, 4, 6, dtype=D, requires_grad=True)

    def second() -> Tensor:
        (out, _) = mha(x, x, x, need_weights=False)
        (g,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), x)[0]

    with pytest.raises(RuntimeError, match="not implemented"):
        second()
    plain = mha(x, x, x, need_weights=False)[0]
    with second_order_safe():
        safe = mha(x, x, x, need_weights=False)[0]
        h = second()
    # torch's attention and the equivalents inside MultiheadAttention: as the attention alone (condition 10)
    assert relative_error(safe, plain) <= float64_rtol(terms=1, condition=10) and torch.isfinite(h).all()


def test_the_mode_is_off_outside_and_inside_an_equivalent(registry: None) -> None:
    calls: list[bool] = []

    def spy(x: Tensor, inplace: bool = False) -> Tensor:
        calls.append(True)
        return F.hardsigmoid(x, inplace)  # the mode is off inside: no recursion

    register_equivalent(F.hardsigmoid, spy, replace=True)
    x = torch.randn(3)
    F.hardsigmoid(x)
    assert calls == []
    with second_order_safe():
        with second_order_safe():  # entered twice: one mode
            assert torch.equal(F.hardsigmoid(x), F.hardsigmoid(x))
    assert calls == [True, True]
    with second_order_safe(enabled=False):
        F.hardsigmoid(x)
    assert len(calls) == 2
    assert not torch._C._is_torch_function_mode_enabled()


# --------------------------------------------------------------------------- the registry
def test_the_built_in_entries() -> None:
    names = {e.name for e in registered_equivalents()}
    assert {"torch.nn.functional.scaled_dot_product_attention", "torch.nn.functional.hardsigmoid"} <= names
    for e in registered_equivalents():
        assert e.how and e.aten and callable(e.replacement)


def test_registry_errors(registry: None) -> None:
    with pytest.raises(TypeError, match="callable"):
        register_equivalent(F.relu, "relu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already has"):
        register_equivalent(F.hardsigmoid, hardsigmoid_relu6)
    with pytest.raises(ValueError, match="itself"):
        register_equivalent(F.relu, F.relu)
    with pytest.raises(KeyError, match="no second-order equivalent"):
        unregister_equivalent(F.relu)
    register_equivalent(F.relu, lambda x, inplace=False: x.clamp_min(0))
    unregister_equivalent(F.relu)
    with pytest.warns(UserWarning, match="not among torch's overridable"):
        register_equivalent(len, lambda x: 0)


def test_missing_derivative_reads_both_messages() -> None:
    assert missing_derivative(RuntimeError("derivative for aten::hardsigmoid_backward is not implemented")) == \
        "hardsigmoid_backward"
    assert missing_derivative(RuntimeError("the derivative for '_cdist_backward' is not implemented.")) == \
        "_cdist_backward"
    assert missing_derivative(RuntimeError("double backwards on roi_align not supported")) == "_roi_align_backward"
    assert diagnosis._forward_candidates("_roi_align_backward")[-1] == "roi_align"  # torchvision's names
    assert missing_derivative(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert missing_derivative(ValueError("derivative for aten::x is not implemented")) is None


# --------------------------------------------------------------------------- through GimliUpdater
class SqueezeExcite(nn.Module):
    """MobileNetV3's block: hardswish, and a hardsigmoid gate."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        w = self.scale_activation(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * w


def _se_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.Hardswish(), SqueezeExcite(6), nn.Flatten(), nn.Linear(96, 3)).double()


def _attention_net() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Flatten(),
                         nn.Linear(40, 3)).double()


def _batches(shape: tuple[int, ...], J: int = 2, seed: int = 0) -> tuple[list[Any], Any]:
    g = torch.Generator().manual_seed(seed)
    make = lambda: (torch.randn(4, *shape, dtype=D, generator=g), torch.randint(0, 3, (4,), generator=g))  # noqa: E731
    return [make() for _ in range(J)], make()


def _ce(model: Any, batch: Any) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _updater(model: nn.Module, unroll: int = 2, **options: Any) -> GimliUpdater:
    groups = [{"params": list(m.parameters())} for m in model if any(True for _ in m.parameters())]
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    return GimliUpdater(model, opt, _ce, _ce, unroll=unroll, learn={"lr": "group"}, **options)


PLANS: dict[str, dict[str, Any]] = {
    "rev, full tape": {"memory": None},
    "rev, kept graphs": {"memory": Memory(keep_graphs=True)},
    "rev, auto": {},
    "fwd": {"hvp": "fwd", "memory": None},
}


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("net, shape", [(_se_net, (1, 6, 6)), (_attention_net, (5, 8))], ids=["squeeze-excite", "attention"])
def test_exact_out_of_the_box(net: Callable[[], nn.Module], shape: tuple[int, ...], plan: str) -> None:
    batches, val = _batches(shape)
    with _no_fallback_warning():
        errors = check_hypergradients(_updater(net(), **PLANS[plan]), batches, val)
    assert max(errors.values()) <= TOL, errors


class _no_fallback_warning:
    def __enter__(self) -> None:
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.filterwarnings("error", message="hvp='fwd'")

    def __exit__(self, *exc: Any) -> None:
        self._catch.__exit__(*exc)


def test_only_second_order_passes_use_the_equivalents(registry: None) -> None:
    """The tape's plain pass and train_step call F.hardsigmoid itself; the recomputation before
    each HVP (full tape: once per step) and the kept graphs use the equivalent."""
    calls: list[int] = []

    def counted(x: Tensor, inplace: bool = False) -> Tensor:
        calls.append(1)
        return hardsigmoid_relu6(x, inplace)

    register_equivalent(F.hardsigmoid, counted, replace=True)
    batches, val = _batches((1, 6, 6), J=3)
    up = _updater(_se_net(), unroll=3, memory=None)
    up.hypergradient(batches, val)
    assert len(calls) == 3  # one recomputation per inner step, none in the tape's pass or L_val
    calls.clear()
    up.train_step(batches[0])
    assert calls == []
    _updater(_se_net(), unroll=3, memory=Memory(keep_graphs=True)).hypergradient(batches, val)
    assert len(calls) == 3  # the tape's pass keeps every graph: no recomputation


def test_a_meta_step_with_tasks_uses_the_equivalents() -> None:
    """Under torch.func.vmap (tasks=T) the mode sees the calls too: the mean of single-task calls."""
    T = 2
    batches, val = _batches((5, 8), J=2)
    g = torch.Generator().manual_seed(5)
    stacked = [(torch.randn(T, 4, 5, 8, dtype=D, generator=g), torch.randint(0, 3, (T, 4), generator=g)) for _ in batches]
    sval = (torch.randn(T, 4, 5, 8, dtype=D, generator=g), torch.randint(0, 3, (T, 4), generator=g))

    def no_dropout() -> nn.Module:  # train mode: in eval mode the encoder layer takes PyTorch's inference fast path
        net = _attention_net()
        for m in net.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
            if isinstance(m, nn.MultiheadAttention):  # its attention dropout is a float, not a module
                m.dropout = 0.0
        return net

    ours = _updater(no_dropout(), tasks=T).hypergradient(stacked, sval).hypergrads["lr"]
    single = [_updater(no_dropout()).hypergradient([(x[t], y[t]) for x, y in stacked], (sval[0][t], sval[1][t]))
              .hypergrads["lr"] for t in range(T)]
    expected = sum(single) / T
    assert torch.allclose(ours, expected, rtol=1e-9, atol=0)


# --------------------------------------------------------------------------- skipping the mode
class Branchy(nn.Module):
    """An MLP with dropout whose activation is F.hardsigmoid only while ``gate`` is set: a branch
    that the passes of one meta step take and those of an earlier one did not."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(5, 8), nn.Dropout(0.2), nn.Linear(8, 3)
        self.gate = False

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        return self.fc2(self.drop(F.hardsigmoid(h) if self.gate else torch.tanh(h)))


def _branchy_updater(model: Branchy, **options: Any) -> GimliUpdater:
    opt = torch.optim.SGD([{"params": model.fc1.parameters()}, {"params": model.fc2.parameters()}], lr=0.1,
                          momentum=0.9)
    return GimliUpdater(model, opt, _ce, _ce, unroll=3, learn={"lr": "group"}, memory=None, **options)


class _CountedModes:
    """Counts the second-order-safe modes entered (monkeypatched over safe_mode.SecondOrderSafeMode)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = 0
        counter = self

        class Counted(safe_mode.SecondOrderSafeMode):
            def __init__(self) -> None:
                super().__init__()
                counter.entered += 1

        monkeypatch.setattr(safe_mode, "SecondOrderSafeMode", Counted)


def _branchy() -> Branchy:
    torch.manual_seed(0)
    return Branchy().double()


def test_a_model_that_calls_nothing_of_the_registry_skips_the_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Note [Skipping the safe mode]: the first pass learns, the others run without the mode, and the
    hypergradient is the one of passes that all run under it, bit for bit."""
    modes = _CountedModes(monkeypatch)
    batches, val = _batches((5,), J=3)
    up = _branchy_updater(_branchy())
    assert up._safe_mode.needed is None
    torch.manual_seed(1)
    first = up.hypergradient(batches, val).hypergrads["lr"]
    assert modes.entered == 1 and up._safe_mode.needed is False  # three recomputations with a graph, one mode
    torch.manual_seed(1)
    again = up.hypergradient(batches, val).hypergrads["lr"]
    assert modes.entered == 1
    always = _branchy_updater(_branchy())
    always._safe_mode = safe_mode.SafeModeLatch(learns=False)
    torch.manual_seed(1)
    reference = always.hypergradient(batches, val).hypergrads["lr"]
    assert modes.entered == 4  # every pass under the mode
    assert torch.equal(first, reference) and torch.equal(again, reference)


def test_a_branch_the_first_pass_did_not_take_is_computed_again_under_the_mode() -> None:
    """A registered function in a pass without the mode: the meta step runs again from its start,
    with the same dropout masks, as an updater that knew from the start; and it is exact."""
    batches, val = _batches((5,), J=3)
    up = _branchy_updater(_branchy())
    up.hypergradient(batches, val)
    assert up._safe_mode.needed is False
    up.model.gate = True
    torch.manual_seed(3)
    ours = up.hypergradient(batches, val).hypergrads["lr"]
    after = torch.get_rng_state()
    assert up._safe_mode.needed is True
    fresh = _branchy_updater(_branchy())
    fresh.model.gate = True
    torch.manual_seed(3)
    expected = fresh.hypergradient(batches, val).hypergrads["lr"]
    assert torch.equal(ours, expected) and torch.equal(after, torch.get_rng_state())
    errors = check_hypergradients(up, batches, val)
    assert max(errors.values()) <= TOL, errors


def test_an_edit_of_the_registry_makes_the_latch_learn_again(registry: None) -> None:
    batches, val = _batches((5,), J=3)
    up = _branchy_updater(_branchy())
    up.hypergradient(batches, val)
    assert up._safe_mode.skipping
    calls: list[int] = []

    def counted_tanh(x: Tensor) -> Tensor:
        calls.append(1)
        return torch.tanh(x)

    register_equivalent(torch.tanh, counted_tanh)
    assert not up._safe_mode.skipping
    up.hypergradient(batches, val)
    assert len(calls) == 3 and up._safe_mode.needed is True


# --------------------------------------------------------------------------- errors that name the fix
class Gate(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.hardsigmoid(x)


def _gated_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(36, 5), Gate()), nn.Linear(5, 3)).double()


@pytest.mark.parametrize("plan", list(PLANS))
def test_a_missing_double_backward_names_the_op_the_module_and_the_fix(registry: None, plan: str) -> None:
    unregister_equivalent(F.hardsigmoid)
    batches, val = _batches((1, 6, 6))
    with pytest.raises(MissingDoubleBackwardError) as info:
        with _quiet_fallback():
            _updater(_gated_net(), **PLANS[plan]).hypergradient(batches, val)
    e = info.value
    assert (e.op, e.forward_op, e.module_path, e.module_type) == ("hardsigmoid_backward", "hardsigmoid", "1.1", "Gate")
    assert e.function == "torch.nn.functional.hardsigmoid"
    msg = str(e)
    for part in ("aten::hardsigmoid_backward", "`1.1` (Gate)", "register_equivalent(torch.nn.functional.hardsigmoid",
                 "first_order=True", "inner step"):
        assert part in msg, msg
    assert isinstance(e.__cause__, RuntimeError) and "not implemented" in str(e.__cause__)


class _quiet_fallback:
    def __enter__(self) -> None:
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.filterwarnings("ignore", message="hvp='fwd'")

    def __exit__(self, *exc: Any) -> None:
        self._catch.__exit__(*exc)


def _multi_margin(input: Tensor, target: Tensor, p: int = 1, margin: float = 1.0, weight: Any = None,
                  size_average: Any = None, reduce: Any = None, reduction: str = "mean") -> Tensor:
    """``F.multi_margin_loss`` (p=1, no weights, mean) from ops with a double backward."""
    assert p == 1 and weight is None and size_average is None and reduce is None and reduction == "mean"
    hinge = (margin - input.gather(1, target.unsqueeze(1)) + input).clamp_min(0)
    hinge = hinge.masked_fill(F.one_hot(target, input.shape[1]).bool(), 0.0)  # the target class adds nothing
    return (hinge.sum(1) / input.shape[1]).mean()


def _margin(model: Any, batch: Any) -> Tensor:
    x, y = batch
    return F.multi_margin_loss(model(x), y)


def test_a_users_own_entry_makes_the_model_exact(registry: None) -> None:
    """F.multi_margin_loss has no double backward (torch 2.13 and 2.14); the user's equivalent makes it exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    batches, val = _batches((1, 6, 6))
    opt = torch.optim.SGD([{"params": model[1].parameters()}, {"params": model[3].parameters()}], lr=0.1, momentum=0.9)
    updater = GimliUpdater(model, opt, _margin, _ce, unroll=2, learn={"lr": "group"})
    with pytest.raises(MissingDoubleBackwardError,
                       match=r"register_equivalent\(torch.nn.functional.multi_margin_loss") as info:
        updater.hypergradient(batches, val)
    assert info.value.op == "multi_margin_loss_backward" and info.value.module_path is None  # in the loss, not the model
    # a mean of clamped margins, all >= 0 (condition 1): one rounding per term
    terms = val[0].shape[0] * 3
    assert relative_error(_multi_margin(model(val[0]), val[1]), F.multi_margin_loss(model(val[0]), val[1])) <= \
        float64_rtol(terms=terms)
    register_equivalent(F.multi_margin_loss, _multi_margin, how="as a masked sum of clamped margins",
                        aten=("multi_margin_loss_backward",))
    errors = check_hypergradients(updater, batches, val)
    assert max(errors.values()) <= TOL, errors


def test_a_call_the_mode_cannot_see_is_named_as_such(registry: None) -> None:
    """A registered function called inside another entry's equivalent (the mode is off there) runs as it is."""
    register_equivalent(F.silu, lambda x, inplace=False: x * F.hardsigmoid(x) * 0 + F.silu(x) * 1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 5), nn.SiLU(), nn.Linear(5, 3)).double()
    batches, val = _batches((1, 6, 6))
    with pytest.raises(MissingDoubleBackwardError, match="did not go through") as info:
        _updater(model).hypergradient(batches, val)
    assert info.value.module_path == "2"


class Shuffle(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.native_channel_shuffle(x, 2)


def test_an_op_without_any_derivative_is_named_where_the_graph_is_kept() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), Shuffle(), nn.Flatten(), nn.Linear(64, 3)).double()
    batches, val = _batches((1, 6, 6))
    with pytest.raises(MissingDoubleBackwardError, match="no derivative for aten::native_channel_shuffle at all") as info:
        _updater(model, memory=Memory(keep_graphs=True)).hypergradient(batches, val)
    assert info.value.module_path == "1" and "first_order" not in str(info.value)
