# SPDX-License-Identifier: Apache-2.0
"""Interleaved A/B of ``gimli_bptt.engine.grad``: autograd's engine called directly (the private
``torch.autograd.graph._engine_run_backward``, the default) against the public
``torch.autograd.grad`` path it falls back to, per call and per hypergradient.

Per call: the two autograd calls of one inner step on bench_peers' a-sgd MLP, G_j with
``create_graph`` ([Alg.1 L5]) and the Hessian-vector product through it ([Alg.1 L13]).
Per hypergradient: bench_peers' and bench_tasks' problems end to end, the same updater with the
private entry point and with it switched off (``engine._engine_run_backward = None``, what the
fallback does). Both arms run in this process, round-robin, and the medians are compared.

Usage::

    python bench/ab_engine_grad.py [--repeats 11] [--calls 200]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ab_safe_mode  # noqa: E402
import bench_peers as peers  # noqa: E402
from gimli_bptt import engine  # noqa: E402

PRIVATE = engine._engine_run_backward


def one_inner_step(P: Any) -> Callable[[], Any]:
    """G_j = dL/dθ with create_graph, then the Hessian-vector product H_j·v through it."""
    params = [p.detach().requires_grad_() for p in P.model.parameters()]
    names = [n for n, _ in P.model.named_parameters()]
    x, y = P.batches[0]
    vs = [torch.randn_like(p) for p in params]

    def loss() -> torch.Tensor:
        out = torch.func.functional_call(P.model, dict(zip(names, params)), (x,))
        return torch.nn.functional.cross_entropy(out, y)

    def run() -> Any:
        G = engine.grad([loss()], params, create_graph=True)
        return engine.grad(G, params, vs)

    return run


def ab(call: Callable[[], Any], repeats: int, inner: int) -> tuple[float, float]:
    """Median seconds of ``inner`` calls with the private entry point and with the public path, interleaved."""
    times: dict[bool, list[float]] = {True: [], False: []}
    for private in (True, False):  # warm-up
        engine._engine_run_backward = PRIVATE if private else None
        call()
    for _ in range(repeats):
        for private in (True, False):
            engine._engine_run_backward = PRIVATE if private else None
            t = time.perf_counter()
            for _ in range(inner):
                call()
            times[private].append(time.perf_counter() - t)
    engine._engine_run_backward = PRIVATE
    return statistics.median(times[True]), statistics.median(times[False])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--calls", type=int, default=200, help="inner steps per timed round of the per-call rows")
    args = p.parse_args()
    torch.set_num_threads(1)
    assert PRIVATE is not None, "this torch has no torch.autograd.graph._engine_run_backward"
    print(f"torch {torch.__version__}, 1 thread, {args.repeats} interleaved rounds")
    print("| case | private entry point | public torch.autograd.grad | ratio |\n|---|---:|---:|---:|")
    for hidden, batch in ((32, 16), (128, 64)):
        P = peers.Problem("a-sgd", 1, torch.float32, hidden, batch)
        a, b = ab(one_inner_step(P), args.repeats, args.calls)
        print(f"| one inner step's G_j + HVP, MLP hidden {hidden}, batch {batch} | {a / args.calls * 1e6:.0f} µs | "
              f"{b / args.calls * 1e6:.0f} µs | {a / b:.3f} |", flush=True)
    for name, (make, call) in ab_safe_mode.cases().items():
        u = make()
        a, b = ab(lambda u=u, call=call: call(u), args.repeats, 1)
        print(f"| hypergradient, {name} | {a * 1e3:.2f} ms | {b * 1e3:.2f} ms | {a / b:.3f} |", flush=True)


if __name__ == "__main__":
    main()
