# SPDX-License-Identifier: Apache-2.0
"""Where one gimli hypergradient spends its time, next to the torch.func unroll.

Times one hypergradient of bench_peers' problem (default a-sgd, J=50) per phase, by wrapping the
functions that make up Algorithm 1 with wall-clock timers (a wrapper costs ~1 µs per call, far
less than cProfile's per-call overhead, which inflates Python-heavy code), and splits the
torch.func unroll into its forward loop and its single backward pass::

    python bench/breakdown.py                       # a-sgd, J=50, keep_graphs and rev
    python bench/breakdown.py --problem a-adam --unroll 200 --repeats 10

Phases (each the total over the J steps of one hypergradient, median over the repeats):

- ``tape: loss + G_j``   ``InnerProblem.gradient_with_graph`` (forward and backward, [Alg.1 L5])
- ``tape: optimizer``    ``InnerProblem.step`` as the tape calls it ([Alg.1 L6])
- ``sweep: recompute``   the sweep's recomputation of ℓ_j and G_j with a graph (``hvp="rev"``)
- ``sweep: optimizer``   ``InnerProblem.step_vjp`` ([Alg.1 L11])
- ``sweep: HVP``         ``StepSecondOrder.apply`` ([Alg.1 L13-14])
- ``sweep: A_opt``       ``OptimizerHyperparameters.accumulate_all`` ([Alg.1 L12])
- ``other``              the rest: validation loss, tape bookkeeping, random-generator capture, ...
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_peers as peers  # noqa: E402

from gimli_bptt import hvp as hvp_mod  # noqa: E402
from gimli_bptt import hyper as hyper_mod  # noqa: E402
from gimli_bptt import problem as problem_mod  # noqa: E402

SPENT: dict[str, float] = defaultdict(float)
_ACTIVE: list[str] = []


def _timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` adding its wall time to SPENT[name] (outermost timed call only)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _ACTIVE:
            return fn(*args, **kwargs)
        _ACTIVE.append(name)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[name] += time.perf_counter() - t0
            _ACTIVE.pop()

    return wrapper


def instrument() -> None:
    """Wraps the phase functions where the tape and the sweep look them up."""
    cls = problem_mod.InnerProblem
    cls.step = _timed("tape: optimizer", cls.step)
    cls.step_vjp = _timed("sweep: optimizer", cls.step_vjp)
    cls.step_gradient = _timed("tape: loss + G_j", cls.step_gradient)
    step = hvp_mod.StepSecondOrder
    step._recompute_with_graph = _timed("sweep: recompute", step._recompute_with_graph)
    step.apply = _timed("sweep: HVP", step.apply)
    hp = hyper_mod.OptimizerHyperparameters
    hp.accumulate_all = _timed("sweep: A_opt", hp.accumulate_all)


def func_phases(P: peers.Problem) -> Callable[[], dict[str, float]]:
    """The torch.func unroll of bench_peers, timed as its forward loop and its backward pass."""
    run = peers.run_func(P)

    def fn() -> dict[str, float]:
        original = torch.autograd.grad
        marks: dict[str, float] = {}

        def grad(outputs: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            if not kwargs.get("create_graph"):  # the final backward pass
                marks["backward start"] = time.perf_counter()
            return original(outputs, inputs, *args, **kwargs)

        torch.autograd.grad = grad
        try:
            t0 = time.perf_counter()
            run()
            t1 = time.perf_counter()
        finally:
            torch.autograd.grad = original
        start = marks.get("backward start", t1)
        return {"forward loop": start - t0, "validation + backward": t1 - start, "total": t1 - t0}

    return fn


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problem", default="a-sgd", choices=[x for x in peers.PROBLEMS if x != "c-maml"])
    p.add_argument("--unroll", type=int, default=50)
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    instrument()
    P = peers.Problem(a.problem, a.unroll, torch.float32, 128, 64)
    impls = {name: peers.run_gimli(P, name) for name in ("gimli keep_graphs", "gimli rev")}
    func = func_phases(P)
    rows: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in list(impls) + ["torch.func unroll"]}
    for fn in list(impls.values()) + [func]:
        fn()  # warm-up
    for _ in range(a.repeats):
        for name, fn in impls.items():
            SPENT.clear()
            t0 = time.perf_counter()
            fn()
            total = time.perf_counter() - t0
            for phase, t in SPENT.items():
                rows[name][phase].append(t)
            rows[name]["other"].append(total - sum(SPENT.values()))
            rows[name]["total"].append(total)
        for phase, t in func().items():
            rows["torch.func unroll"][phase].append(t)
    print(f"{a.problem}, J={a.unroll}, median of {a.repeats} interleaved runs, ms per hypergradient "
          f"(per inner step in brackets)")
    for name, phases in rows.items():
        print(f"\n{name}")
        for phase, ts in phases.items():
            med = statistics.median(ts)
            print(f"  {phase:24s} {med * 1e3:8.1f} ms  [{med / a.unroll * 1e6:7.0f} µs/step]")


if __name__ == "__main__":
    main()
