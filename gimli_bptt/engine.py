# SPDX-License-Identifier: Apache-2.0
"""One call into autograd's engine: ``torch.autograd.grad`` without its per-call argument handling.

Algorithm 1 calls autograd twice per inner step (G_j at [Alg.1 L5] and the Hessian-vector
product of [Alg.1 L13]-[Alg.1 L14]), on small graphs, so the Python work that
``torch.autograd.grad`` does around the engine (normalising its arguments, checking for
``__torch_function__`` overrides, building and checking the output gradients: about 50 µs per
call on a 2-core CPU, 5 % of a small model's inner step) is paid 2J times per meta step.
:func:`grad` calls the engine as ``torch.autograd.grad`` does, with the arguments already in the
form it needs, and falls back to ``torch.autograd.grad`` itself whenever that shortcut does not
apply (a tensor subclass or mode that overrides torch functions, or a torch without the engine
entry point).

Measured gain (``python bench/ab_engine_grad.py --repeats 15 --calls 100`` and ``--repeats 21``,
torch 2.13.0 CPU, 1 thread, the two paths interleaved in one process on a 2-core machine shared
with other jobs, load average 6-10; medians, private / public): one inner step's G_j plus
Hessian-vector product 0.90-0.96 (about 60 µs saved per call), a whole hypergradient of
bench_peers' J = 50 problems 0.92-0.99 (a-sgd 0.95, 0.95; b-wd 0.99, 0.94; a-adam 0.96, 0.92);
where one hypergradient takes few engine calls (c-maml J = 5, the sinusoid tasks) the ratio is
within the noise (0.89-1.07). The private name is kept for that 5 %; ``tests/test_engine.py``
holds both paths bit-equal, with the private symbol removed as a newer torch might.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.overrides import has_torch_function

_engine_run_backward: Optional[Callable[..., tuple[Tensor, ...]]]
try:  # the function torch.autograd.grad ends in; private, so a newer torch may rename it
    from torch.autograd.graph import _engine_run_backward
except ImportError:  # pragma: no cover - the public path (tests/test_engine.py runs it)
    _engine_run_backward = None

_ONES: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _ones(like: Tensor) -> Tensor:
    """A 0-d one shaped like the scalar ``like`` (cached: the engine never writes into it)."""
    key = (like.dtype, like.device)
    one = _ONES.get(key)
    if one is None:
        one = _ONES[key] = torch.ones((), dtype=like.dtype, device=like.device)
    return one


def grad(outputs: Sequence[Tensor], inputs: Sequence[Tensor], grad_outputs: Optional[Sequence[Tensor]] = None,
         create_graph: bool = False) -> tuple[Optional[Tensor], ...]:
    """``torch.autograd.grad(outputs, inputs, grad_outputs, create_graph=create_graph, allow_unused=True)``.

    Args:
        outputs: Tensors that require grad.
        inputs: The leaves to differentiate with respect to.
        grad_outputs: One cotangent per output, shaped like it; None: the outputs are scalars and
            each gets 1.
        create_graph: Record the backward pass for a further derivative (also retains the graph).

    Returns:
        One gradient per input, None where an input does not reach the outputs.
    """
    outputs, inputs = tuple(outputs), tuple(inputs)
    if grad_outputs is None:
        if any(o.dim() != 0 for o in outputs):
            raise ValueError("grad_outputs can be omitted only for scalar outputs")
        cotangents = tuple(_ones(o) for o in outputs)
    else:
        cotangents = tuple(grad_outputs)
    if _engine_run_backward is None or has_torch_function(outputs + inputs + cotangents) or any(
            not o.requires_grad for o in outputs) or any(
            c.shape != o.shape or c.dtype != o.dtype for c, o in zip(cotangents, outputs)):
        return torch.autograd.grad(outputs, inputs, cotangents, create_graph=create_graph, allow_unused=True)
    return _engine_run_backward(outputs, cotangents, create_graph, create_graph, inputs, True, accumulate_grad=False)


__all__ = ["grad"]
