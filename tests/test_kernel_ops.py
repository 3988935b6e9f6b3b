# SPDX-License-Identifier: Apache-2.0
"""The compiled ops as proper custom ops: ``torch.library.opcheck`` over every op, the fake kernels, the shared checks.

``opcheck`` runs each op under its schema checker (no input mutated or aliased by an output),
through FakeTensor (the fake kernel of ``gimli_bptt/kernels/_fake.py`` gives the real outputs'
shapes, dtypes, strides and devices) and through AOT dispatch with dynamic shapes (what
torch.compile does). The inputs are the self-check's (``selfcheck._cases``): every op, float32
and float64, under the static and the generic loops' flags.
"""
from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from gimli_bptt import kernels
from gimli_bptt.kernels import _fake, ops, selfcheck

pytestmark = pytest.mark.skipif(os.environ.get("GIMLI_DISABLE_KERNELS") == "1", reason="GIMLI_DISABLE_KERNELS=1")

CASES = [(op, dtype, k) for dtype in (torch.float64, torch.float32) for k, (op, *_) in
         enumerate(selfcheck._cases(dtype, torch.device("cpu")))]


@pytest.fixture(scope="module", autouse=True)
def loaded() -> None:
    assert kernels.is_available("cpu"), f"CPU kernels did not build: {ops.load_error()!r}"


def _case(dtype: torch.dtype, k: int) -> tuple[str, list[Any]]:
    op, args, _, _ = selfcheck._cases(dtype, torch.device("cpu"))[k]
    return op, args


@pytest.mark.parametrize("op, dtype, k", CASES, ids=[f"{op}-{str(d)[6:]}-{'generic' if k // 2 % 2 else 'static'}"
                                                     for op, d, k in CASES])
def test_opcheck(op: str, dtype: torch.dtype, k: int) -> None:
    name, args = _case(dtype, k)
    torch.library.opcheck(getattr(torch.ops.gimli, name).default, tuple(args))


def test_every_op_has_a_fake_kernel() -> None:
    assert set(_fake.FAKES) == set(ops.OP_NAMES)
    for name in ops.OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gimli::{name}", "Meta"), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fake_outputs_are_the_real_ones(dtype: torch.dtype) -> None:
    """Shapes and dtypes of every output under FakeTensor (the empty outputs and the per-segment sums too)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for op, args, _, _ in selfcheck._cases(dtype, torch.device("cpu")):
        real = getattr(torch.ops.gimli, op)(*args)
        with FakeTensorMode() as mode:
            fake_args = [[mode.from_tensor(t) for t in a] if isinstance(a, list) else
                         mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = getattr(torch.ops.gimli, op)(*fake_args)
        flat_real = [t for x in real for t in (x if isinstance(x, list) else [x])]
        flat_fake = [t for x in fake for t in (x if isinstance(x, list) else [x])]
        assert [(t.shape, t.dtype) for t in flat_fake] == [(t.shape, t.dtype) for t in flat_real], op


def test_compile_traces_the_op_without_a_graph_break() -> None:
    """torch.compile(fullgraph=True) over a fused step: the fake kernel lets it trace; the result is the eager one."""
    op, args = _case(torch.float64, 0)  # sgd_step
    theta, G, buf, offsets, hyper, *rest = args

    def step(theta: torch.Tensor, G: torch.Tensor, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.gimli.sgd_step(theta, G, buf, offsets, hyper, *rest)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(theta, G, buf), step(theta, G, buf)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("bad, match", [
    (lambda a: a.__setitem__(5, a[5] | (1 << 4)), "elementwise = .* sets a bit past the 4 hyperparameter slots"),
    (lambda a: a.__setitem__(1, a[1][:-1]), "G has 4277 elements but theta has 4278"),
    (lambda a: a.__setitem__(4, a[4][:3]), "expected 4 hyperparameter tensors, got 3"),
    (lambda a: a.__setitem__(3, a[3].to(torch.int32)), "offsets must be a contiguous 1-D int64 tensor"),
])
def test_the_shared_checks_name_the_problem(bad: Any, match: str) -> None:
    """One check per op in csrc/include/gimli/checks.h, used by the CPU and the CUDA binding."""
    _, args = _case(torch.float64, 0)
    bad(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.gimli.sgd_step(*args)


def test_learned_past_the_slots_is_rejected() -> None:
    op, args = _case(torch.float64, 5)
    assert op == "adam_step_vjp"
    args[12] = 1 << 5  # learned
    with pytest.raises(RuntimeError, match="learned = 32 sets a bit past the 5 hyperparameter slots"):
        torch.ops.gimli.adam_step_vjp(*args)
