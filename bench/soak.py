# SPDX-License-Identifier: Apache-2.0
"""Soak: thousands of consecutive meta steps; resident memory must not grow (no graph survives a step).

Usage::

    python bench/soak.py                 # 2,000 meta steps, bound 20 MiB after 100 warm-up steps
    python bench/soak.py --steps 200 --bound 50
"""
from __future__ import annotations

import argparse
import functools
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from gimli_bptt import GimliUpdater, Memory


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("needs /proc/self/status")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--bound", type=float, default=20.0, help="allowed growth in MiB after warm-up")
    p.add_argument("--unroll", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    w = torch.tensor(1e-3, requires_grad=True)

    def train_loss(m, b):  # type: ignore[no-untyped-def]
        return F.cross_entropy(m(b[0]), b[1]) + w * sum((q**2).sum() for q in m.parameters())

    val_loss = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    up = GimliUpdater(model, opt, train_loss, val_loss, unroll=args.unroll, learn={"lr": "tensor", "beta1": "group"},
                      loss_params={"w": w}, commit=True, memory=Memory(slots=2),
                      meta_opt=functools.partial(torch.optim.Adam, lr=1e-4), progress=False)
    data = [(torch.randn(32, 16), torch.randint(0, 4, (32,))) for _ in range(16)]
    start = time.perf_counter()
    base = None
    samples = []
    for i in range(args.steps):
        batches = [data[(i + j) % 16] for j in range(args.unroll)]
        up.step(batches, data[(i + 7) % 16])
        if i + 1 == args.warmup:
            base = rss_mib()
        if base is not None and (i + 1) % max(1, args.steps // 10) == 0:
            samples.append((i + 1, rss_mib() - base))
    growth = rss_mib() - (base if base is not None else 0.0)
    print(f"{args.steps} meta steps (J={args.unroll}) in {time.perf_counter() - start:.1f} s; resident memory growth "
          f"after {args.warmup} warm-up steps: {growth:.2f} MiB (bound {args.bound} MiB)")
    print("growth by step: " + ", ".join(f"{s}: {g:+.2f}" for s, g in samples))
    return 0 if growth < args.bound else 1


if __name__ == "__main__":
    sys.exit(main())
