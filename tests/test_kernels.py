# SPDX-License-Identifier: Apache-2.0
"""Oracle 4: the fused kernels against their pure-PyTorch twin, and both against the per-tensor optimizers.

Tolerances: element-wise float64 outputs agree bit for bit on the CPU (by construction: Note [One
source of truth]), to float64_rtol(terms=4, condition=10) relative on CUDA, and to 2 ulp in
float32; hyperparameter partials summed over a segment of n elements agree to float64_rtol(terms=n)
of the sum of the magnitudes of their terms (the summation order differs, which is all a sum's
condition number allows).
"""
from __future__ import annotations

import zlib
import itertools
import os
from typing import Any, Optional

import pytest
import torch
from torch import Tensor, nn

from gimli_bptt import GimliUpdater, kernels
from gimli_bptt.testing import float64_rtol, relative_error
from gimli_bptt.kernels import _reference as ref
from gimli_bptt.kernels import ops
from gimli_bptt.optim import ADAM, ADAMW, SGD
from gimli_bptt.stepping import step_all, step_vjp_all

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float64, torch.float32]
#: Segment sizes: odd, a single element, and a total that crosses the 4096-element reduction chunk.
SIZES = [1, 3, 7, 33, 130, 4099, 5]
GRANULARITIES = ("fixed", "segment", "element", "mixed")


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    dev = request.param
    if os.environ.get("GIMLI_DISABLE_KERNELS") == "1":
        pytest.skip("GIMLI_DISABLE_KERNELS=1")
    if dev == "cpu":
        # The CPU extension must build on CI: a failure here is a test failure, not a skip.
        assert kernels.is_available("cpu"), f"CPU kernels did not build: {ops.load_error()!r}"
    elif not kernels.is_available(dev):
        pytest.skip(f"no compiled kernels for {dev}")
    return dev


# ------------------------------------------------------------------------------ helpers
def _ulp(x: Tensor) -> Tensor:
    a = x.abs()
    return torch.nextafter(a, torch.full_like(a, float("inf"))) - a


def assert_elementwise(a: Tensor, b: Tensor, what: str) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
    on_cuda = a.is_cuda or b.is_cuda
    a, b = a.cpu(), b.cpu()
    assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{what}: NaN pattern differs"
    a, b = torch.nan_to_num(a), torch.nan_to_num(b)
    err = (a - b).abs()
    if b.dtype == torch.float64:
        # CPU: bit for bit by construction (Note [One source of truth]: the same operations in the same
        # order, no FMA contraction, a correctly rounded sqrt and the C library's pow on both sides).
        # CUDA: its pow is within 2 ulp of the C library's, through the few products of one step
        # (condition <= 10: no cancellation in an element-wise update of a state entry).
        bound = (float64_rtol(terms=4, condition=10) if on_cuda else 0.0) * b.abs()
    else:
        bound = 2 * _ulp(b)
    bad = err > bound
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off, worst {float((err - bound).max()):.3g} over bound"


def assert_segment_sums(a: Tensor, b: Tensor, scale: Tensor, what: str) -> None:
    assert a.shape == b.shape and a.dtype == torch.float64 == b.dtype, what
    err = (a - b).abs().cpu()
    bound = float64_rtol(terms=1) * scale.cpu() + 1e-300  # scale: n * sum |terms| (_scales)
    assert (err <= bound).all(), f"{what}: segment sums differ by {err.max():.3g} (bound {bound.min():.3g})"


def _offsets(sizes: list[int], device: str) -> Tensor:
    return torch.tensor([0] + list(itertools.accumulate(sizes)), dtype=torch.int64, device=device)


SGD_RANGES = [(0.01, 0.2), (0.5, 0.95), (0.0, 0.5), (0.0, 0.1)]
ADAM_RANGES = [(1e-3, 1e-2), (0.8, 0.95), (0.9, 0.999), (1e-8, 1e-3), (0.0, 0.1)]


def _hyper(ranges: list[tuple[float, float]], granularity: str, sizes: list[int], device: str,
           gen: torch.Generator) -> tuple[list[Tensor], int, int]:
    """Per slot a float64 tensor, plus the ``elementwise`` and ``learned`` bit masks."""
    n, nseg = sum(sizes), len(sizes)
    elementwise = {"fixed": 0, "segment": 0, "element": (1 << len(ranges)) - 1, "mixed": 0b1}[granularity]
    learned = {"fixed": 0, "segment": (1 << len(ranges)) - 1, "element": (1 << len(ranges)) - 1,
               "mixed": 0b1011}[granularity]
    out = []
    for h, (lo, hi) in enumerate(ranges):
        m = n if elementwise >> h & 1 else nseg
        out.append((lo + (hi - lo) * torch.rand(m, generator=gen, dtype=torch.float64)).to(device))
    return out, elementwise, learned


def _rand(n: int, dtype: torch.dtype, device: str, gen: torch.Generator, scale: float = 1.0) -> Tensor:
    return (scale * torch.randn(n, generator=gen, dtype=torch.float64)).to(dtype).to(device)


def _compare_outputs(fused: Any, twin: Any, names: list[str], hyper_scale: Optional[list[Tensor]] = None) -> None:
    for name, a, b in zip(names, fused, twin):
        if name == "hyper_bar":
            for h, (x, y) in enumerate(zip(a, b)):
                if x.numel() and x.dtype == torch.float64 and y.numel() != 0 and hyper_scale is not None \
                        and hyper_scale[h] is not None:
                    assert_segment_sums(x, y, hyper_scale[h], f"hyper_bar[{h}]")
                else:
                    assert_elementwise(x, y, f"hyper_bar[{h}]")
        else:
            assert_elementwise(a, b, name)


def _scales(op: str, args: list[Any], hyper_index: int, elementwise_index: int, learned: int,
            offsets: Tensor, n: int) -> list[Optional[Tensor]]:
    """Per slot: n times the sum over each segment of |element-wise partial| (the twin, element-wise),
    n the segment's length: a sum of n terms in any order is within (n - 1) eps/2 of that sum of
    magnitudes, whatever its cancellation (Higham, Accuracy and Stability, §4.2)."""
    args = list(args)
    hyper, elementwise = args[hyper_index], args[elementwise_index]
    counts = offsets[1:] - offsets[:-1]
    args[hyper_index] = [h if args[elementwise_index] >> k & 1 else torch.repeat_interleave(h, counts) for k, h in
                         enumerate(hyper)]
    args[elementwise_index] = (1 << len(hyper)) - 1
    parts = getattr(ref, op)(*args)[-1]
    return [ref._segment_sum(p.abs(), offsets) * counts.to(p) if (learned >> k & 1 and not elementwise >> k & 1)
            else None for k, p in enumerate(parts)]


# ------------------------------------------------------------------- op level: fused vs twin
SGD_FLAGS = [  # nesterov, maximize, use_momentum, has_wd, has_buf, has_buf_bar
    (False, False, False, False, False, False),
    (False, True, False, True, False, False),
    (False, False, True, False, False, False),
    (False, False, True, True, True, True),
    (True, False, True, False, False, True),
    (True, True, True, True, True, True),
    (True, False, True, True, True, False),
]
# Note [Static flags] in csrc/cpu/loops.h: every combination that gets its own compiled loop
# (per-segment hyperparameters, buffer and carried cotangent present) is checked once.
SGD_FLAGS += [(n and u, m, u, w, u, u) for n, m, u, w in itertools.product((False, True), repeat=4)
              if (n and u, m, u, w, u, u) not in SGD_FLAGS]
ADAM_FLAGS = [  # amsgrad, maximize, decoupled, has_wd, step, carried
    (False, False, False, False, 1.0, False),
    (False, True, False, True, 3.0, True),
    (True, False, False, False, 2.0, True),
    (True, True, True, True, 7.0, True),
    (False, False, True, True, 1.0, False),
    (True, False, False, True, 1.0, False),
]
ADAM_FLAGS += [(a, m, d and w, w, 3.0, True) for a, m, d, w in itertools.product((False, True), repeat=4)
               if (a, m, d and w, w, 3.0, True) not in ADAM_FLAGS and (a, m, d and w, w, 2.0, True) not in ADAM_FLAGS
               and (a, m, d and w, w, 7.0, True) not in ADAM_FLAGS]


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", SGD_FLAGS, ids=lambda f: "".join("NMUWBC"[i] if x else "-" for i, x in enumerate(f)))
def test_sgd_fused_matches_twin(device: str, flags: tuple, dtype: torch.dtype, granularity: str) -> None:
    nesterov, maximize, use_momentum, has_wd, has_buf, has_buf_bar = flags
    gen = torch.Generator().manual_seed(zlib.crc32(repr((flags, dtype, granularity)).encode()))
    n = sum(SIZES)
    offsets = _offsets(SIZES, device)
    hyper, elementwise, learned = _hyper(SGD_RANGES, granularity, SIZES, device, gen)
    theta, G, tb = (_rand(n, dtype, device, gen) for _ in range(3))
    G[::11] = 0
    buf = _rand(n, dtype, device, gen) if has_buf else None
    buf_bar = _rand(n, dtype, device, gen) if has_buf_bar else None
    step_args = [theta, G, buf, offsets, hyper, elementwise, nesterov, maximize, use_momentum, has_wd]
    _compare_outputs(torch.ops.gimli.sgd_step(*step_args), ref.sgd_step(*step_args), ["theta_next", "buf_next"])
    vjp_args = [theta, G, buf, tb, buf_bar, offsets, hyper, elementwise, learned, nesterov, maximize, use_momentum,
                has_wd]
    scales = _scales("sgd_step_vjp", vjp_args, 6, 7, learned, offsets, n)
    _compare_outputs(torch.ops.gimli.sgd_step_vjp(*vjp_args), ref.sgd_step_vjp(*vjp_args),
                     ["theta_bar", "G_bar", "buf_bar", "hyper_bar"], scales)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", ADAM_FLAGS, ids=lambda f: "".join(
    ("A" if f[0] else "-", "M" if f[1] else "-", "D" if f[2] else "-", "W" if f[3] else "-", f"t{int(f[4])}",
     "C" if f[5] else "-")))
def test_adam_fused_matches_twin(device: str, flags: tuple, dtype: torch.dtype, granularity: str) -> None:
    amsgrad, maximize, decoupled, has_wd, step, carried = flags
    gen = torch.Generator().manual_seed(zlib.crc32(repr((flags, dtype, granularity)).encode()))
    n = sum(SIZES)
    offsets = _offsets(SIZES, device)
    hyper, elementwise, learned = _hyper(ADAM_RANGES, granularity, SIZES, device, gen)
    theta, G, tb = (_rand(n, dtype, device, gen) for _ in range(3))
    m = _rand(n, dtype, device, gen, 0.1)
    v = _rand(n, dtype, device, gen, 0.1) ** 2
    # Note [Adam at a zero second moment]: exactly-zero gradients and moments on some elements.
    for t in (G, m, v):
        t[::13] = 0
    vmax = v * (0.5 + torch.rand(n, generator=gen, dtype=torch.float64).to(dtype).to(device) * 1.5) if amsgrad else None
    cm, cv, cx = ((_rand(n, dtype, device, gen) if carried else None) for _ in range(3))
    step_args = [theta, G, m, v, vmax, offsets, hyper, elementwise, step, amsgrad, maximize, decoupled, has_wd]
    _compare_outputs(torch.ops.gimli.adam_step(*step_args), ref.adam_step(*step_args),
                     ["theta_next", "m_next", "v_next", "vmax_next"])
    vjp_args = [theta, G, m, v, vmax, tb, cm, cv, cx, offsets, hyper, elementwise, learned, step, amsgrad, maximize,
                decoupled, has_wd]
    scales = _scales("adam_step_vjp", vjp_args, 10, 11, learned, offsets, n)
    out = torch.ops.gimli.adam_step_vjp(*vjp_args)
    _compare_outputs(out, ref.adam_step_vjp(*vjp_args), ["theta_bar", "G_bar", "m_bar", "v_bar", "vmax_bar",
                                                         "hyper_bar"], scales)
    assert all(torch.isfinite(x).all() for x in out[:5]), "non-finite cotangent at a zero second moment"


def test_ops_reject_bad_buffers(device: str) -> None:
    """Non-contiguous, mis-typed and mis-sized inputs are rejected with a message, not misread."""
    n = 10
    theta = torch.randn(2 * n, dtype=torch.float64, device=device)
    G = torch.randn(n, dtype=torch.float64, device=device)
    offsets = _offsets([4, 6], device)
    hyper = [torch.full((2,), 0.1, dtype=torch.float64, device=device) for _ in range(4)]
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.gimli.sgd_step(theta[::2], G, None, offsets, hyper, 0, False, False, False, False)
    with pytest.raises(RuntimeError, match="float64"):
        torch.ops.gimli.sgd_step(G, G, None, offsets, [h.float() for h in hyper], 0, False, False, False, False)
    with pytest.raises(RuntimeError, match="values, expected"):
        torch.ops.gimli.sgd_step(G, G, None, offsets, hyper, 1, False, False, False, False)
    with pytest.raises(RuntimeError, match="elements"):
        torch.ops.gimli.sgd_step(G, theta, None, offsets, hyper, 0, False, False, False, False)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        torch.ops.gimli.sgd_step(G.half(), G.half(), None, offsets, hyper, 0, False, False, False, False)
    adam_hyper = hyper + hyper[:1]
    with pytest.raises(RuntimeError, match="adam_step: amsgrad needs vmax"):
        torch.ops.gimli.adam_step(G, G, G, G.abs(), None, offsets, adam_hyper, 0, 1.0, True, False, False, False)
    with pytest.raises(RuntimeError, match="adam_step_vjp: amsgrad needs vmax"):
        torch.ops.gimli.adam_step_vjp(G, G, G, G.abs(), None, G, None, None, None, offsets, adam_hyper, 0, 0, 1.0,
                                      True, False, False, False)
    with pytest.raises(RuntimeError, match="m_next_bar"):
        torch.ops.gimli.adam_step_vjp(G, G, G, G.abs(), None, G, theta, None, None, offsets, adam_hyper, 0, 0, 1.0,
                                      False, False, False, False)
    if device == "cpu":
        with pytest.raises(RuntimeError, match="offsets"):
            torch.ops.gimli.sgd_step(G, G, None, _offsets([4, 5], device), hyper, 0, False, False, False, False)


# --------------------------------------------------- list level: fused vs twin vs per-tensor
SHAPES = [(), (3, 5), (7,), (2, 1, 3), (0,), (4, 4)]
LIST_CASES = [
    (SGD, dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)),
    (SGD, dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01, nesterov=False, maximize=True)),
    (SGD, dict(lr=0.05, momentum=0.8, dampening=0.0, weight_decay=0.02, nesterov=True, maximize=False)),
    (ADAM, dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
                decoupled_weight_decay=False)),
    (ADAM, dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.05, amsgrad=True, maximize=True,
                decoupled_weight_decay=False)),
    (ADAMW, dict(lr=0.02, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, amsgrad=False, maximize=False,
                 decoupled_weight_decay=True)),
]


def _list_problem(impl: Any, fixed: dict[str, Any], granularity: str, dtype: torch.dtype, device: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda shape, s=1.0: (s * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype).to(device)  # noqa: E731
    theta = [rnd(s) for s in SHAPES]
    theta[1] = rnd((5, 3)).t()  # a non-contiguous parameter
    G: list[Optional[Tensor]] = [rnd(t.shape) for t in theta]
    G[3] = None  # a parameter outside the loss: skipped
    hyper = []
    for k, t in enumerate(theta):
        h = dict(fixed)
        if k % 2:  # a second param group
            h["lr"] = fixed["lr"] * 0.5
        for name in impl.hyper_names:
            if granularity == "tensor":
                h[name] = torch.tensor(h[name], dtype=dtype, device=device)
            elif granularity == "element":
                h[name] = torch.full_like(t, h[name])
        hyper.append(h)
    state = [impl.import_state({}, t, h) for t, h in zip(theta, hyper)]
    return theta, G, state, hyper, rnd


def _assert_lists(a: list[Any], b: list[Any], dtype: torch.dtype, what: str) -> None:
    """Per-tensor values agree relative to the largest magnitude of the quantity over the list.

    float32: the per-tensor path sums in float32 and forms learned coefficients (1 - b1^t, ...)
    in float32 arithmetic, the flat ops in double; cancellation in small sums magnifies the
    difference relative to the sum itself, not relative to the scale of the quantity. With a
    learned beta2 = 0.999, the per-tensor path's float32 ``1 - beta2**t`` is itself off by 5e-5
    relative at t = 1 (the flat ops form it in double), hence 1e-4.

    float64: 3 steps of element-wise updates and, in the cotangents of the learned hyperparameters,
    sums over a tensor (at most 16 entries in SHAPES) taken in another order: at most 3 * 16
    rounded terms. Relative to the quantity's largest magnitude over the list, an element-wise
    output has condition 1; a sum of random-signed terms has Σ|t| / |Σ t| about √16 = 4, bounded
    here by 1e2. So ``float64_rtol(terms=48, condition=1e2)`` (1.7e-11).
    """
    tol = float64_rtol(terms=3 * 16, condition=1e2) if dtype == torch.float64 else 1e-4
    if a and isinstance(a[0], dict):
        for k, (x, y) in enumerate(zip(a, b)):
            assert set(x) == set(y), f"{what}[{k}]: keys {sorted(x)} vs {sorted(y)}"
        for key in sorted(set().union(*[set(x) for x in b])):
            _assert_lists([x.get(key) for x in a], [y.get(key) for y in b], dtype, f"{what}[{key}]")
        return
    scale = max([float(y.abs().max()) for y in b if isinstance(y, Tensor) and y.numel()] + [1e-30])
    for k, (x, y) in enumerate(zip(a, b)):
        if isinstance(y, Tensor):
            assert x.shape == y.shape, f"{what}[{k}]: shape {x.shape} vs {y.shape}"
            err = float((x - y).abs().max()) if y.numel() else 0.0
            assert err <= tol * scale, f"{what}[{k}]: {err:.3g}, relative to the scale {err / scale:.3g}"
        else:
            assert x == y, f"{what}[{k}]: {x} vs {y}"


@pytest.mark.parametrize("granularity", ["fixed", "tensor", "element"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(LIST_CASES)))
def test_step_all_fused_twin_and_loop_agree(device: str, case: int, dtype: torch.dtype, granularity: str) -> None:
    """Three steps and their VJPs through ``step_all``/``step_vjp_all``: fused = twin = per-tensor."""
    impl, fixed = LIST_CASES[case]
    theta0, G, state0, hyper, rnd = _list_problem(impl, fixed, granularity, dtype, device, seed=case)
    results = {}
    for mode in ("loop", "reference", "fused"):
        theta, state, tape = theta0, state0, []
        with torch.no_grad():
            for _ in range(3):
                tape.append((theta, state))
                theta, state = step_all(impl, theta, G, state, hyper, mode)
            gen_bar = torch.Generator().manual_seed(7)
            tb = [torch.randn(t.shape, generator=gen_bar, dtype=torch.float64).to(dtype).to(device) for t in theta]
            sb: list[dict[str, Tensor]] = [{} for _ in theta]
            bars = []
            for th, st in reversed(tape):
                tb, Gb, sb, hb = step_vjp_all(impl, th, G, st, hyper, tb, sb, mode)
                bars.append(hb)
        results[mode] = (theta, state, tb, Gb, sb, bars)
    for mode in ("reference", "fused"):
        for what, a, b in zip(("theta", "state", "theta_bar", "G_bar", "state_bar"), results[mode], results["loop"]):
            _assert_lists(a, b, dtype, f"{mode} {what}")
        for a, b in zip(results[mode][5], results["loop"][5]):
            _assert_lists(a, b, dtype, f"{mode} hyper_bar")


def test_flat_outputs_are_views_of_one_buffer(device: str) -> None:
    """Note [Flat buffers]: θ_{j+1} comes back as views of one buffer, reused without a copy."""
    from gimli_bptt.kernels.flat import flat

    impl, fixed = LIST_CASES[3]
    theta, G, state, hyper, _ = _list_problem(impl, fixed, "fixed", torch.float64, device, seed=0)
    G = [torch.zeros_like(t) for t in theta]
    with torch.no_grad():
        theta1, state1 = step_all(impl, theta, G, state, hyper, "fused")
    stepped = [t for t in theta1 if t.numel()]
    assert len({t._base.data_ptr() for t in stepped}) == 1
    assert flat(stepped).data_ptr() == stepped[0]._base.data_ptr()


@pytest.mark.parametrize("case", [1, 3, 4])
def test_flat_outputs_follow_replaced_items(device: str, case: int) -> None:
    """Note [Flat outputs]: a replaced item of an op's output list is gathered, not the stale buffer."""
    from gimli_bptt.kernels.flat import FlatOutputs, owned_indices

    impl, fixed = LIST_CASES[case]
    theta, G, state, hyper, _ = _list_problem(impl, fixed, "fixed", torch.float64, device, seed=1)
    with torch.no_grad():
        theta1, state1 = step_all(impl, theta, G, state, hyper, "fused")
        stepped = {k for k, (t, g) in enumerate(zip(theta1, G)) if t.numel() and g is not None}
        assert type(theta1) is FlatOutputs and owned_indices(theta1) == stepped
        k = min(stepped)
        theta1[k] = theta1[k] + 1.0  # replaced: no longer a view of the recorded buffer
        key = next(name for name, v in state1[k].items() if isinstance(v, Tensor))
        state1[k] = {**state1[k], key: state1[k][key] * 0.5}  # a replaced state entry
        assert k not in owned_indices(theta1)
        got = step_all(impl, theta1, G, state1, hyper, "fused")
        want = step_all(impl, [t.clone() for t in theta1], G,
                        [{n: (v.clone() if isinstance(v, Tensor) else v) for n, v in s.items()} for s in state1], hyper,
                        "fused")
    for a, b in zip(got[0], want[0]):
        assert torch.equal(a, b)
    for sa, sb in zip(got[1], want[1]):
        assert all(torch.equal(sa[n], sb[n]) if isinstance(sa[n], Tensor) else sa[n] == sb[n] for n in sa)


@pytest.mark.parametrize("case", range(len(LIST_CASES)))
def test_plan_cache_follows_changed_inputs(device: str, case: int) -> None:
    """Note [Plan cache]: a cached plan is reused only for the same signature; a replaced
    hyperparameter value, a new dtype or a learned value changed in place give the results of
    a fresh plan, bit for bit."""
    from gimli_bptt.kernels import flat as flat_mod

    impl, fixed = LIST_CASES[case]
    def run(theta, G, state, hyper, fresh: bool):
        if fresh:
            flat_mod.clear_plans()
        with torch.no_grad():
            return step_all(impl, theta, G, state, hyper, "auto")

    def same(a, b) -> None:
        for x, y in zip(a[0], b[0]):
            assert torch.equal(x, y)
        for sx, sy in zip(a[1], b[1]):
            assert sx.keys() == sy.keys()
            for k in sx:
                assert torch.equal(sx[k], sy[k]) if isinstance(sx[k], Tensor) else sx[k] == sy[k]

    theta, G, state, hyper, _ = _list_problem(impl, fixed, "tensor", torch.float64, device, seed=case)
    run(theta, G, state, hyper, fresh=True)
    hyper[2] = {**hyper[2], "lr": torch.tensor(0.25 * float(hyper[2]["lr"]), dtype=torch.float64, device=device)}
    same(run(theta, G, state, hyper, fresh=False), run(theta, G, state, hyper, fresh=True))
    hyper[0]["weight_decay"] = 0.125  # a value replaced in place in the same dict
    same(run(theta, G, state, hyper, fresh=False), run(theta, G, state, hyper, fresh=True))
    hyper[1]["lr"].mul_(0.5)  # a learned value changed in place (as the meta step does)
    same(run(theta, G, state, hyper, fresh=False), run(theta, G, state, hyper, fresh=True))
    theta32 = [t.float() for t in theta]
    G32 = [None if g is None else g.float() for g in G]
    state32 = [impl.import_state({}, t, h) for t, h in zip(theta32, hyper)]
    same(run(theta32, G32, state32, hyper, fresh=False), run(theta32, G32, state32, hyper, fresh=True))


# ------------------------------------------------------------------------------- dispatch
def test_select_impl_rules(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(3, device=device)
    assert kernels.select_impl([x]) == "fused"
    assert kernels.select_impl([x], "reference") == "reference"
    assert kernels.select_impl([x.half()]) == "reference"
    with pytest.raises(RuntimeError, match="float32 and float64"):
        kernels.select_impl([x.half()], "fused")
    with pytest.raises(ValueError, match="impl must be one of"):
        kernels.select_impl([x], "fast")
    monkeypatch.setenv("GIMLI_DISABLE_KERNELS", "1")
    assert kernels.select_impl([x]) == "reference"
    with pytest.raises(RuntimeError, match="GIMLI_DISABLE_KERNELS"):
        kernels.select_impl([x], "fused")


def test_unknown_kernels_mode_is_rejected() -> None:
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="kernels must be one of"):
        GimliUpdater(model, opt, lambda m, b: m(b).sum(), lambda m, b: m(b).sum(), learn=["lr"], kernels="fast")


# -------------------------------------------------------- hypergradients through GimliUpdater
UPDATER_CASES = [
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3), {"lr": "tensor", "momentum": "group"}),
    (torch.optim.Adam, dict(lr=0.01, amsgrad=True), {"lr": "element", "beta1": "group", "beta2": "tensor"}),
    (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1), {"lr": "group", "weight_decay": "tensor", "eps": "group"}),
]
#: The condition of each case's hypergradients: their rounding growth measured with
#: testing.hypergradient_amplification (float32 vs float64, kernels="loop"), rounded up to a power of ten.
#: SGD 2.6; AdamW 12; Adam at most 1.7e2, except β2's hypergradient, 1.3e6: its terms scale with
#: 1 / (1 - β2) = 1e3 and cancel (g² - v), so a change of summation order there moves it by up to
#: ~1e6 eps relative, on any machine.
UPDATER_CONDITION: dict[type, dict[str, float]] = {
    torch.optim.SGD: {"": 10.0}, torch.optim.AdamW: {"": 100.0}, torch.optim.Adam: {"": 1e3, "beta2": 1e7},
}


@pytest.mark.parametrize("case", range(len(UPDATER_CASES)), ids=lambda i: UPDATER_CASES[i][0].__name__)
def test_updater_hypergradients_same_either_way(device: str, case: int) -> None:
    cls, kwargs, learn = UPDATER_CASES[case]
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(6, 6) for _ in range(5)], nn.Linear(6, 1)).to(torch.float64).to(device)
    groups = [{"params": list(model[:3].parameters())}, {"params": list(model[3:].parameters()), "lr": kwargs["lr"] / 2}]
    batches = [(torch.randn(16, 6, dtype=torch.float64, device=device),
                torch.randn(16, 1, dtype=torch.float64, device=device)) for _ in range(5)]
    loss = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    out = {}
    for mode in ("loop", "fused", "reference"):
        opt = cls(groups, **kwargs)
        upd = GimliUpdater(model, opt, loss, loss, unroll=4, learn=learn, learn_init=True, kernels=mode)
        out[mode] = upd.hypergradient(batches[:4], batches[4]).hypergrads
    for mode in ("fused", "reference"):
        for name, ref_value in out["loop"].items():
            a = out[mode][name]
            for x, y in zip(a if isinstance(a, list) else [a], ref_value if isinstance(ref_value, list) else [ref_value]):
                err = float((x - y).abs().max()) / max(float(y.abs().max()), 1e-30)
                cond = UPDATER_CONDITION[cls]
                tol = float64_rtol(terms=1, condition=cond.get(name, cond[""]))
                assert err <= tol, f"{mode} {name}: relative error {err:.3g} > {tol:.1e}"


def test_auto_runs_small_cpu_sgd_steps_per_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Note [Small steps run per tensor]: under kernels="auto" an SGD call without momentum on CPU
    tensors with fewer elements than the layout's cpu_loop_below runs the per-tensor functions; a
    larger one, or one with a momentum buffer, the flat ops; "fused" always runs the flat ops; the
    hypergradients agree with the loop's."""
    from gimli_bptt import stepping

    flat_calls: list[str] = []
    real_step, real_vjp = stepping._flat_step, stepping._flat_step_vjp
    monkeypatch.setattr(stepping, "_flat_step", lambda *a: flat_calls.append("step") or real_step(*a))
    monkeypatch.setattr(stepping, "_flat_step_vjp", lambda *a: flat_calls.append("vjp") or real_vjp(*a))
    impl = SGD
    assert impl.flat is not None and impl.flat.cpu_loop_below > 0
    hyper = [dict(lr=torch.tensor(0.1, dtype=torch.float64), momentum=0.9, dampening=0.0, weight_decay=0.0,
                  nesterov=False, maximize=False)]

    def run(n: int, mode: str) -> None:
        theta = [torch.randn(n, dtype=torch.float64)]
        G = [torch.randn(n, dtype=torch.float64)]
        state = [impl.import_state({}, theta[0], hyper[0])]
        th, st = step_all(impl, theta, G, state, hyper, mode)
        step_vjp_all(impl, theta, G, state, hyper, [torch.ones(n, dtype=torch.float64)], [{}], mode)

    run(1000, "auto")  # with momentum the fused op is the faster one
    assert flat_calls == ["step", "vjp"]
    flat_calls.clear()
    run(1000, "fused")
    assert flat_calls == ["step", "vjp"]
    flat_calls.clear()
    hyper[0]["momentum"] = 0.0
    run(1000, "auto")  # no momentum buffer: per tensor
    assert flat_calls == []
    run(impl.flat.cpu_loop_below, "auto")  # but not on a buffer this large
    assert flat_calls == ["step", "vjp"]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(torch.float64)
    batches = [(torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)) for _ in range(4)]
    loss = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    out = {}
    for mode in ("auto", "fused", "loop"):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        upd = GimliUpdater(model, opt, loss, loss, unroll=3, learn={"lr": "tensor"}, learn_init=True, kernels=mode)
        out[mode] = upd.hypergradient(batches[:3], batches[3]).hypergrads
    for mode in ("auto", "fused"):
        for name, ref_value in out["loop"].items():
            for x, y in zip(out[mode][name] if isinstance(out[mode][name], list) else [out[mode][name]],
                            ref_value if isinstance(ref_value, list) else [ref_value]):
                # SGD through a tanh MLP, J = 3: the rounding grows 4 times (hypergradient_amplification)
                assert relative_error(x, y) <= float64_rtol(terms=1, condition=10), (mode, name)
