# SPDX-License-Identifier: Apache-2.0
"""One inner step and its HVP on a compute-bound MLP, three ways: why compiled steps recompute.

- ``eager``: G_j with ``create_graph=True``, then the HVP through the kept graph (eager gimli's
  default plan when the graphs fit its budget);
- ``compiled_recompute``: the compiled gradient (no graph), then one compiled ``torch.func.vjp`` of the
  gradient that recomputes it (``compile=True`` step by step: the inner call and the reverse call);
- ``compiled_kept``: the compiled gradient with θ requiring grad, its HVP by ``autograd.grad`` through
  AOTAutograd's compiled backward (keeping the compiled forward's graph).

MLP 64-256-256-256-1 (ReLU), batch 512, MSE, float32, one thread, interleaved medians.

Usage::

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/ab_compiled_kept_graph.py --repeats 15
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256),
                          nn.ReLU(), nn.Linear(256, 1))
    names = [n for n, _ in model.named_parameters()]
    x, y = torch.randn(512, 64), torch.randn(512, 1)
    theta0 = [q.detach().clone() for q in model.parameters()]

    def loss_of(theta: list[Tensor]) -> Tensor:
        return ((functional_call(model, dict(zip(names, theta)), (x,)) - y) ** 2).mean()

    def gradient(theta: list[Tensor]) -> list[Tensor]:
        return list(grad(loss_of)(theta))

    def hvp(theta: list[Tensor], v: list[Tensor]) -> tuple:
        return torch.func.vjp(gradient, theta)[1](v)

    compiled_gradient = torch.compile(gradient, fullgraph=True, dynamic=False)
    compiled_hvp = torch.compile(hvp, fullgraph=True, dynamic=False)

    def eager() -> tuple:
        theta = [t.clone().requires_grad_() for t in theta0]
        G = torch.autograd.grad(loss_of(theta), theta, create_graph=True)
        return torch.autograd.grad(G, theta, [torch.ones_like(g) for g in G])

    def compiled_kept() -> tuple:
        theta = [t.clone().requires_grad_() for t in theta0]
        G = compiled_gradient(theta)
        return torch.autograd.grad(G, theta, [torch.ones_like(g) for g in G])

    def compiled_recompute() -> tuple:
        theta = [t.clone() for t in theta0]
        G = compiled_gradient(theta)
        return compiled_hvp(theta, [torch.ones_like(g) for g in G])[0]

    rows: dict[str, Callable[[], tuple]] = {"eager": eager, "compiled_recompute": compiled_recompute,
                                           "compiled_kept": compiled_kept}
    reference = eager()
    for name, fn in rows.items():
        out = fn()
        err = max(float((a - b).abs().max()) for a, b in zip(out, reference))
        print(f"{name}: max difference to eager {err:.2e}")
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, fn in rows.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        print(f"{name}: {statistics.median(ts) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
