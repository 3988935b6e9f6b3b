# SPDX-License-Identifier: Apache-2.0
"""Long unrolls: peak memory and time of the full tape against the binomial checkpointed tape.

Each (J, schedule) configuration runs in a fresh subprocess, so its peak resident memory is
its own. Usage::

    python bench/bench_checkpoint.py                       # J = 100, 1000, 10000
    python bench/bench_checkpoint.py --unrolls 100 1000 --slots 4 16 --quick
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import benchlib

SECTION = "## Long unrolls: full tape vs binomial checkpointing"


def _rss_mib() -> float:
    """Peak resident memory of this process (VmHWM), in MiB.

    Not ``ru_maxrss``: a child inherits its parent's peak there, even across exec.
    """
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(J: int, slots: int, hidden: int, batch: int, threads: int) -> dict[str, Any]:
    """One configuration: build, warm up on a short unroll, then time one meta step of length J."""
    from gimli_bptt import GimliUpdater, Memory
    from gimli_bptt.reverse.schedule_costs import min_forward_steps

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 10))
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()},
                           {"params": model[4].parameters()}], lr=0.05, momentum=0.9)
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    data = [(torch.randn(batch, 32), torch.randint(0, 10, (batch,))) for _ in range(64)]
    batches = [data[j % 64] for j in range(J)]  # referenced, not copied: memory is the tape's
    val = (torch.randn(256, 32), torch.randint(0, 10, (256,)))
    memory = None if slots == 0 else Memory(slots=slots)
    warm = GimliUpdater(model, opt, loss, loss, unroll=8, learn={"lr": "group"}, memory=memory, progress=False)
    warm.hypergradient(batches[:8], val)
    up = GimliUpdater(model, opt, loss, loss, unroll=J, learn={"lr": "group"}, memory=memory, progress=False)
    before = _rss_mib()
    start = time.perf_counter()
    result = up.hypergradient(batches, val)
    seconds = time.perf_counter() - start
    peak = _rss_mib() - before
    state_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) * 2  # θ and the momentum buffer
    stats = up.last_tape_stats
    return {
        "J": J,
        "slots": slots,
        "seconds": seconds,
        "peak_mib": peak,
        "forward_steps": stats.forward_steps,
        "max_slots_used": stats.max_slots_used,
        "theory_forward_steps": J if slots == 0 or slots >= J else min_forward_steps(J, slots),
        "state_kib": state_bytes / 1024,
        "hypergrad": [float(x) for x in result.hypergrads["lr"]],
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for J in args.unrolls:
        for slots in [0] + args.slots:
            cmd = [sys.executable, __file__, "--worker", str(J), str(slots), "--hidden", str(args.hidden),
                   "--batch", str(args.batch), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                rows.append({"J": J, "slots": slots, "error": out.stderr.strip().splitlines()[-1]})
            else:
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1] if "error" in rows[-1] else
                  {k: rows[-1][k] for k in ("J", "slots", "seconds", "peak_mib", "forward_steps")}, flush=True)
    return rows


def _same(a: list[float], b: list[float]) -> bool:
    """Bit-identical lists, NaN matching NaN (a hypergradient can overflow on a long unroll)."""
    return len(a) == len(b) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| J | tape | time (s) | time / full | peak memory growth (MiB) | memory / full | forward steps "
             "(measured / optimal) | recompute factor | same hypergradient |",
             "|---|---|---|---|---|---|---|---|---|"]
    full = {r["J"]: r for r in rows if r.get("slots") == 0 and "error" not in r}
    for r in rows:
        name = "full" if r["slots"] == 0 else f"binomial, {r['slots']} slots"
        if "error" in r:
            lines.append(f"| {r['J']} | {name} | failed: {r['error']} | | | | | | |")
            continue
        f = full.get(r["J"])
        t_ratio = f"{r['seconds'] / f['seconds']:.2f}" if f else "-"
        m_ratio = f"{r['peak_mib'] / f['peak_mib']:.3f}" if f and f["peak_mib"] > 0 else "-"
        same = "-" if not f else ("yes" if _same(r["hypergrad"], f["hypergrad"]) else "NO")
        if f and not all(math.isfinite(x) for x in r["hypergrad"]):
            same += " (non-finite: " + ", ".join(f"{x:.3g}" for x in r["hypergrad"]) + ")"
        lines.append(
            f"| {r['J']} | {name} | {r['seconds']:.1f} | {t_ratio} | {r['peak_mib']:.1f} | {m_ratio} | "
            f"{r['forward_steps']} / {r['theory_forward_steps']} | {r['forward_steps'] / r['J']:.2f} | {same} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--unrolls", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--slots", type=int, nargs="+", default=[10, 30, 100])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="J = 50, 200 with 4 and 16 slots")
    p.add_argument("--out", default=None, help="write the section into this Markdown file (replacing its own)")
    p.add_argument("--worker", nargs=2, type=int, metavar=("J", "SLOTS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.hidden, args.batch, args.threads)))
        return
    if args.quick:
        args.unrolls, args.slots = [50, 200], [4, 16]
    rows = run(args)
    text = table(rows)
    print(text)
    if args.out:
        command = "python bench/bench_checkpoint.py " + " ".join(sys.argv[1:]).replace(f"--out {args.out}", "").strip()
        state_kib = next((r["state_kib"] for r in rows if "state_kib" in r), 0.0)
        benchlib.write_section(
            Path(args.out), SECTION,
            f"{SECTION}\n\n"
            f"Command: `{command.strip()} --out {args.out}`  \n"
            f"Date: {datetime.date.today()}; machine: {platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {args.threads} thread(s) per worker.  \n"
            f"Problem: per-group learning rates of SGD(momentum=0.9) on an MLP 32-{args.hidden}-{args.hidden}-10 "
            f"(float32), batch {args.batch}, hvp='rev'; one inner state (θ and the momentum buffer) is "
            f"{state_kib:.1f} KiB. Each row runs in a fresh subprocess; memory is the growth of peak resident "
            f"memory during `hypergradient()` after a warm-up; time is one call.\n\n{text}\n")


if __name__ == "__main__":
    main()
