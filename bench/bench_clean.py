# SPDX-License-Identifier: Apache-2.0
"""Data hyper-cleaning's hypergradient through long unrolls: gimli against a plain autograd unroll.

The problem of ``gimli-bptt clean`` at its defaults (``gimli_bptt/experiments/clean.py``):
softmax regression on 800 digits with half the labels corrupted, J full-batch SGD steps (lr 1)
from zero weights, the weighted mean of the per-example cross-entropies with one weight per
example (the sigmoid of a logit: 800 loss parameters), the mean cross-entropy on 200 clean
validation digits at θ_J. One hypergradient (d L_val / d logits) per timed call, by:

- ``gimli auto``: ``GimliUpdater(..., loss_params={"logits": ...}).hypergradient()`` with the
  default ``memory="auto"`` (the plan it chose is reported: it keeps the steps' graphs while
  they fit in half the available memory);
- ``gimli 16 MiB``: the same with ``memory=16 MiB``, a budget: graphs while they fit, then every
  state, then binomial checkpointing;
- ``gimli states``: the same with ``memory=None``: every inner state on the tape, no graph
  (each step's graph is recomputed in the reverse sweep), memory O(J · |θ|) with a tiny |θ|;
- ``autograd unroll``: a hand-written unroll on autograd's graph, ``torch.autograd.grad(...,
  create_graph=True)`` at every step and one backward from L_val(θ_J) to the logits: the graph of
  all J steps is held at once.

Method (``CONTRIBUTING.md``, Benchmarks): correctness first (at every J the gimli rows'
hypergradient in float32 against the autograd unroll's, and once in float64 at the smallest J);
times are medians of ``--repeats`` interleaved runs in this process after one warm-up each
(``benchlib.interleaved``, ``torch.set_num_threads(1)``); peak memory is the peak-RSS growth of
one run in a fresh process forked from a server that only imported the libraries
(``benchlib.ForkServer``, ``benchlib.peak_growth``), after a warm-up at J = 1.

Usage::

    python bench/bench_clean.py                   # J = 100, 1000, 3000; writes its section of bench/RESULTS.md
    python bench/bench_clean.py --quick           # smoke run, prints only
    python bench/bench_clean.py --unrolls 100 1000 --repeats 3 --out /tmp/clean.md
"""
from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

import benchlib
from gimli_bptt import GimliUpdater
from gimli_bptt.experiments.clean import make_model, noisy_digits, val_loss, weighted_loss
from gimli_bptt.experiments.data import load_digits_tensors

SECTION = "## Data hyper-cleaning: gimli against an autograd unroll through J = 100 to 1000s"
ROWS = ("gimli auto", "gimli 16 MiB", "gimli states", "autograd unroll")
BUDGET = 16 * 2**20
LR = 1.0
TOL_F32, TOL_F64 = 1e-3, 1e-8


@dataclass
class Problem:
    model: nn.Module
    logits: Tensor
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    J: int


def make_problem(J: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> Problem:
    """``gimli-bptt clean``'s default problem for seed ``seed``, with the logits drawn around 0 (a
    meta step part-way through, so the weights differ)."""
    x, y = load_digits_tensors()
    data = noisy_digits(x.to(dtype), y, seed, 800, 200, 0.5)
    model = make_model("linear", 32, seed).to(dtype)
    logits = (0.5 * torch.randn(800, generator=torch.Generator().manual_seed(seed), dtype=dtype)).requires_grad_()
    return Problem(model, logits, data.train, data.val, J)


def gimli_runner(P: Problem, memory: Any) -> tuple[Callable[[], Tensor], GimliUpdater]:
    opt = torch.optim.SGD(P.model.parameters(), lr=LR)
    updater = GimliUpdater(P.model, opt, lambda m, b: weighted_loss(m, b, torch.sigmoid(P.logits)), val_loss,
                           unroll=P.J, loss_params={"logits": P.logits}, memory=memory, progress=False)
    batches = [P.train] * P.J

    def run() -> Tensor:
        return updater.hypergradient(batches, P.val).hypergrads["loss.logits"]  # type: ignore[return-value]
    return run, updater


def autograd_runner(P: Problem) -> Callable[[], Tensor]:
    """J SGD steps on autograd's graph (create_graph), then d L_val(θ_J) / d logits."""
    names = [n for n, _ in P.model.named_parameters()]
    theta0 = [p.detach().clone().requires_grad_() for p in P.model.parameters()]

    def call(theta: list[Tensor]) -> Callable[[Tensor], Tensor]:
        return lambda x: functional_call(P.model, dict(zip(names, theta)), (x,))

    def run() -> Tensor:
        theta = theta0
        weights = torch.sigmoid(P.logits)
        for _ in range(P.J):
            grads = torch.autograd.grad(weighted_loss(call(theta), P.train, weights), theta, create_graph=True)
            theta = [t - LR * g for t, g in zip(theta, grads)]
        (hg,) = torch.autograd.grad(val_loss(call(theta), P.val), P.logits)
        return hg
    return run


def runner(row: str, P: Problem) -> Callable[[], Tensor]:
    if row == "gimli auto":
        return gimli_runner(P, "auto")[0]
    if row == "gimli 16 MiB":
        return gimli_runner(P, BUDGET)[0]
    if row == "gimli states":
        return gimli_runner(P, None)[0]
    return autograd_runner(P)


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def measure_row(req: dict[str, Any]) -> dict[str, Any]:
    """In a forked child: warm up at J = 1, then the peak RSS growth of one hypergradient at J."""
    runner(req["row"], make_problem(1))()
    return benchlib.peak_growth(runner(req["row"], make_problem(req["J"])))


def plan_of(updater: GimliUpdater) -> str:
    s = updater.last_tape_stats
    if s is None:
        return "-"
    if s.schedule == "graphs":
        return f"graphs of {s.graphs_kept} steps kept"
    return f"{s.schedule}, {s.max_slots_used} states held, {s.forward_steps} forward steps"


def render(rows: list[dict[str, Any]], plans: dict[tuple[str, int], str], f64: dict[str, float], command: str,
           log: benchlib.RunLog, threads: int) -> str:
    out = [SECTION, "", *log.header(command, threads), "",
           "One hypergradient of the clean validation loss with respect to the 800 per-example logits of "
           "`gimli-bptt clean` (softmax regression, 800 digits, half the labels corrupted, J full-batch SGD steps, "
           "lr 1). Time: median [min-max] of interleaved runs in one process; memory: peak-RSS growth of one run in "
           "a fresh process. `gimli auto` is the default `memory=\"auto\"` (a budget of half the available memory, "
           "spent on keeping graphs first: fastest); `gimli 16 MiB` is `memory=16 * 2**20`; `gimli states` is "
           "`memory=None` (every state, no graph); `autograd unroll` holds the graph of all J steps.", "",
           "| row | J | median time [min-max] | time / autograd's | peak RSS growth | memory / autograd's | "
           "rel. err f32 vs autograd | gimli's plan |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
    ref = {r["J"]: r for r in rows if r["row"] == "autograd unroll"}
    for r in rows:
        b = ref.get(r["J"], {})
        t = "-" if r.get("median") is None or b.get("median") is None else f"{r['median'] / b['median']:.2f}"
        m = ("-" if not isinstance(r.get("mem"), float) or not isinstance(b.get("mem"), float) or b["mem"] <= 0
             else f"{r['mem'] / b['mem']:.2f}")
        plan = plans.get((r["row"], r["J"]), "-")
        out.append(f"| {r['row']} | {r['J']} | {benchlib.fmt_times(r.get('times'))} | {t} | "
                   f"{benchlib.fmt_mem(r.get('mem'))} | {m} | {benchlib.fmt_err(r.get('err32'))} | {plan} |")
    out += ["", "Float64 check at the smallest J, relative error against the autograd unroll: "
            + ", ".join(f"{k} {v:.1e}" for k, v in f64.items()) + "."]
    return "\n".join(out) + "\n"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--unrolls", type=int, nargs="+", default=[100, 1000, 3000], help="values of J")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row, after one warm-up")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="J = 5, 20 and one repeat: checks that the script runs")
    p.add_argument("--out", type=Path, default=None, help="Markdown file (default bench/RESULTS.md; none with --quick)")
    p.add_argument("--zygote", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.zygote:
        benchlib.serve(measure_row, args.threads, benchlib.preload_digits)
        return
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    if args.quick:
        args.unrolls, args.repeats = [5, 20], 1
    out_path = args.out if args.out is not None else (None if args.quick else Path(__file__).parent / "RESULTS.md")
    torch.set_num_threads(args.threads)
    log = benchlib.RunLog()
    print(log.banner(torch.get_num_threads()), flush=True)
    J0 = min(args.unrolls)
    P64 = make_problem(J0, torch.float64)
    exact64 = autograd_runner(P64)()
    f64 = {row: rel_err(runner(row, P64)(), exact64) for row in ROWS if row != "autograd unroll"}
    bad = {k: v for k, v in f64.items() if not v <= TOL_F64}
    if bad:
        raise SystemExit(f"float64 hypergradients differ from the autograd unroll at J={J0}: {bad}")
    rows: list[dict[str, Any]] = []
    plans: dict[tuple[str, int], str] = {}
    with benchlib.ForkServer(__file__, args.threads) as server:
        for J in args.unrolls:
            P = make_problem(J)
            exact = autograd_runner(P)()
            errs = {}
            for row, memory in (("gimli auto", "auto"), ("gimli 16 MiB", BUDGET), ("gimli states", None)):
                run, updater = gimli_runner(P, memory)
                errs[row] = rel_err(run(), exact)
                plans[(row, J)] = plan_of(updater)
            ok = {row: errs.get(row, 0.0) <= TOL_F32 for row in ROWS}
            times, terr = benchlib.interleaved({row: (lambda row=row: runner(row, P)) for row in ROWS if ok[row]},
                                               args.repeats)
            for row in ROWS:
                r: dict[str, Any] = {"row": row, "J": J, "err32": errs.get(row)}
                if row in times:
                    r["times"], r["median"] = times[row], benchlib.median(times[row])
                    m = server.measure({"row": row, "J": J})
                    r["mem"] = m.get("growth_mib", m.get("error"))
                else:
                    r["mem"] = "error: " + terr[row] if row in terr else "not timed (mismatch)"
                rows.append(r)
                print(f"J={J:5d} {row:16s} {benchlib.fmt_time(r['median']) if 'median' in r else '-':>10s} "
                      f"mem {benchlib.fmt_mem(r.get('mem'))} err {benchlib.fmt_err(r.get('err32'))}", flush=True)
            log.mark()
    section = render(rows, plans, f64, command, log, args.threads)
    benchlib.publish(out_path, SECTION, section)


if __name__ == "__main__":
    main()
