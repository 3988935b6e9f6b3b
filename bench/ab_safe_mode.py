# SPDX-License-Identifier: Apache-2.0
"""Interleaved A/B of Note [Skipping the safe mode]: the default updater (its latch learns that the loss
calls nothing of the second-order registry and skips the mode) against the same updater with every
second-order pass under the mode (``SafeModeLatch(learns=False)``), on bench_peers' and bench_tasks' problems.

Usage::

    python bench/ab_safe_mode.py [--repeats 11]
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
import bench_peers as peers  # noqa: E402
import bench_tasks as tasks  # noqa: E402
from gimli_bptt.second_order import SafeModeLatch  # noqa: E402


def cases() -> dict[str, tuple[Any, Callable[[Any], Any]]]:
    """name -> (updater factory, call)."""
    out: dict[str, tuple[Any, Callable[[Any], Any]]] = {}
    for name, J in (("a-sgd", 50), ("b-wd", 50), ("a-adam", 50), ("c-maml", 5)):
        P = peers.Problem(name, J, torch.float32, 128, 64)

        def make(P: Any = P) -> Any:
            return peers.GimliUpdater(P.model, P.make_opt(P.model), P.gimli_train_loss, P.val_loss, unroll=P.J,
                                      learn={"lr": "group"} if P.meta == "lr" else None,
                                      loss_params={"wd": P.wd} if P.meta == "wd" else None,
                                      learn_init=P.meta == "init", progress=False)
        out[f"{name} J={J}"] = (make, lambda u, P=P: u.hypergradient(P.batches, P.val))
    for J, T in ((1, None), (1, 25), (5, 25)):
        P = tasks.TaskProblem("sinusoid", J, T or 1, torch.float32)
        support, query = (P.task(0) if T is None else (P.support, P.query))
        out[f"sinusoid J={J} T={T or 'one task per call'}"] = (
            lambda P=P, T=T: P.updater(T), lambda u, s=support, q=query, J=J: u.hypergradient([s] * J, q))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=11)
    args = p.parse_args()
    torch.set_num_threads(1)
    print("| problem | skipping (default) | always under the mode | ratio |\n|---|---:|---:|---:|")
    for name, (make, call) in cases().items():
        skip, always = make(), make()
        always._safe_mode = SafeModeLatch(learns=False)
        for u in (skip, always):
            call(u)
        times: dict[str, list[float]] = {"skip": [], "always": []}
        for _ in range(args.repeats):
            for key, u in (("skip", skip), ("always", always)):
                t = time.perf_counter()
                call(u)
                times[key].append(time.perf_counter() - t)
        a, b = statistics.median(times["skip"]), statistics.median(times["always"])
        print(f"| {name} | {a * 1e3:.2f} ms | {b * 1e3:.2f} ms | {a / b:.2f} |", flush=True)


if __name__ == "__main__":
    main()
