# SPDX-License-Identifier: Apache-2.0
"""Core engine vs a full autograd unroll: time and peak memory of one hypergradient.

Problem: per-group learning rates (one group per Linear layer) of ``torch.optim.SGD(momentum=0.9)``
on a tanh MLP ``64 -> H -> H -> 10`` with cross-entropy on random float32 data, unrolled for J
inner steps. Implementations, side by side:

- ``gimli rev``: ``GimliUpdater(..., hvp="rev").hypergradient()``: forward tape, hand-written
  reverse sweep, reverse-over-reverse Hessian-vector products.
- ``gimli fwd``: the same with forward-over-reverse Hessian-vector products.
- ``gimli keep_graphs``: ``hvp="rev", memory=Memory(keep_graphs=True)``: each step's gradient graph is kept from the
  forward tape, so the reverse sweep runs only the Hessian-vector products.
- ``autograd unroll``: ``gimli_bptt.testing.reference_hypergradients``: the plain full unroll on
  autograd's graph (``create_graph=True`` at every step), the baseline.
- ``plain training``: J steps of ``loss.backward(); opt.step()`` on a copy of the model, no
  hypergradient: the floor.

For each J, gimli's hypergradients are first compared with the autograd unroll (float32, the
numbers that are timed, and float64 via ``check_hypergradients``); an implementation whose
hypergradient does not match is not timed. Wall time is the median of ``--repeats`` runs after
one warm-up, in this process, with ``torch.set_num_threads`` fixed. Peak memory is measured in a
fresh subprocess per (implementation, J) (``--worker`` mode): the growth of
``getrusage(RUSAGE_SELF).ru_maxrss`` over one run, after model/data set-up and one warm-up run
with J=1 (which initialises the lazily allocated parts of torch).

Usage::

    python bench/bench_unroll.py                 # full run, writes bench/RESULTS.md
    python bench/bench_unroll.py --quick         # tiny smoke run, prints only
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable


def _fresh_rusage() -> None:
    """Forks once, the child carrying on: a fresh ``ru_maxrss`` for the ``--worker`` mode.

    On Linux a process started by fork+exec inherits the parent's peak RSS in
    ``getrusage(RUSAGE_SELF).ru_maxrss`` (kept across exec), so a worker launched by the big
    benchmark process would start at the benchmark's peak and report no growth. A process
    created by fork starts from zero and inherits the peak of its parent's (here tiny,
    pre-``import torch``) memory. The parent only waits and passes the exit status on.
    """
    sys.stdout.flush()
    pid = os.fork()
    if pid != 0:
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__" and "--worker" in sys.argv:
    _fresh_rusage()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import gimli_bptt  # noqa: E402
from gimli_bptt import GimliUpdater, Memory  # noqa: E402
from gimli_bptt.testing import check_hypergradients, reference_hypergradients, relative_error  # noqa: E402

import benchlib

IMPLS = ("gimli rev", "gimli fwd", "gimli keep_graphs", "autograd unroll", "plain training")
GIMLI = {"gimli rev": dict(hvp="rev"), "gimli fwd": dict(hvp="fwd"), "gimli keep_graphs": dict(hvp="rev", keep_graphs=True)}
SLUG = {"gimli rev": "gimli_rev", "gimli fwd": "gimli_fwd", "gimli keep_graphs": "gimli_keep",
        "autograd unroll": "autograd", "plain training": "floor"}
UNSLUG = {v: k for k, v in SLUG.items()}
SECTION = "## Core engine vs a full autograd unroll"
IN_DIM, CLASSES = 64, 10
LRS = (0.02, 0.01, 0.005)  # one learning rate per Linear layer (param group)
MOMENTUM = 0.9
TOL_F32 = 1e-3  # float32 hypergradient vs the float32 autograd unroll
TOL_F64 = 1e-8  # float64 (check_hypergradients)


# ----------------------------------------------------------------------------- problem
def loss_fn(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def build_problem(hidden: int, batch: int, J: int, seed: int = 0):
    """The model, its SGD optimizer (one param group per layer), J train batches and a val batch."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(IN_DIM, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, CLASSES)
    )
    linears = [m for m in model if isinstance(m, nn.Linear)]
    opt = torch.optim.SGD(
        [{"params": list(m.parameters()), "lr": lr} for m, lr in zip(linears, LRS)], lr=LRS[0], momentum=MOMENTUM
    )
    teacher = torch.randn(IN_DIM, CLASSES, generator=g)  # labels from a random linear teacher

    def draw():
        x = torch.randn(batch, IN_DIM, generator=g)
        return x, (x @ teacher).argmax(dim=1)

    train_batches = [draw() for _ in range(J)]
    return model, opt, train_batches, draw()


def make_updater(model: nn.Module, opt: torch.optim.Optimizer, J: int, hvp: str, keep_graphs: bool = False) -> GimliUpdater:
    return GimliUpdater(model, opt, loss_fn, loss_fn, unroll=J, learn={"lr": "group"}, hvp=hvp,
                        memory=Memory(keep_graphs=keep_graphs))


def plain_training(model: nn.Module, opt: torch.optim.Optimizer, batches) -> nn.Module:
    """The floor: J ordinary training steps on a copy of the model, no hypergradient."""
    twin = copy.deepcopy(model)
    params = dict(model.named_parameters())
    index = {id(p): n for n, p in params.items()}
    twin_params = dict(twin.named_parameters())
    groups = []
    for group in opt.param_groups:
        g = {k: v for k, v in group.items() if k != "params"}
        g["params"] = [twin_params[index[id(p)]] for p in group["params"]]
        groups.append(g)
    twin_opt = torch.optim.SGD(groups)
    for b in batches:
        twin_opt.zero_grad(set_to_none=True)
        loss_fn(twin, b).backward()
        twin_opt.step()
    return twin


def runner(impl: str, model, opt, batches, val) -> Callable[[], Any]:
    """A no-argument callable computing one hypergradient (or the floor) with ``impl``."""
    J = len(batches)
    if impl in GIMLI:
        upd = make_updater(model, opt, J, **GIMLI[impl])
        return lambda: upd.hypergradient(batches, val)
    if impl == "autograd unroll":
        upd = make_updater(model, opt, J, "rev")
        return lambda: reference_hypergradients(upd, batches, val)
    if impl == "plain training":
        return lambda: plain_training(model, opt, batches)
    raise ValueError(impl)


# ----------------------------------------------------------------------------- worker (memory)
def maxrss_mib() -> float:
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    scale = 1.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def vm_hwm_mib() -> float | None:
    """The peak RSS of this process's address space (``VmHWM``, Linux), for a cross-check."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    impl = UNSLUG[args.impl]
    model, opt, batches, val = build_problem(args.hidden, args.batch, args.J)
    # warm-up with J=1: lazy initialisation of torch (kernels, autograd engine, forward AD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner(impl, model, opt, batches[:1], val)()
        fn = runner(impl, model, opt, batches, val)
        gc.collect()
        hwm_before = vm_hwm_mib()
        before = maxrss_mib()
        out = fn()
        after = maxrss_mib()
        hwm_after = vm_hwm_mib()
    del out
    if hwm_before is not None and before > hwm_before + 1.0:
        raise RuntimeError(f"ru_maxrss ({before:.0f} MiB) was inherited from the parent "
                           f"(this address space peaked at {hwm_before:.0f} MiB): the growth would be wrong")
    print(json.dumps({"impl": impl, "J": args.J, "before_mib": before, "after_mib": after,
                      "growth_mib": after - before, "hwm_before_mib": hwm_before, "hwm_after_mib": hwm_after}))


def measure_memory(impl: str, J: int, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--impl", SLUG[impl], "--J", str(J),
           "--hidden", str(args.hidden), "--batch", str(args.batch), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {impl} J={J} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- checks and timing
def check(J: int, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Relative errors of gimli's hypergradients vs the autograd unroll, float32 and float64."""
    model, opt, batches, val = build_problem(args.hidden, args.batch, J)
    out: dict[str, dict[str, Any]] = {}
    ref_upd = make_updater(model, opt, J, "rev")
    _, ref = reference_hypergradients(ref_upd, batches, val)
    for impl, options in GIMLI.items():
        upd = make_updater(model, opt, J, **options)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = upd.hypergradient(batches, val)
            f64 = check_hypergradients(upd, batches, val)["lr"]
        err32 = relative_error(ours.hypergrads["lr"], ref["lr"])
        fallback = any("forward-mode AD failed" in str(w.message) for w in caught)
        ok = err32 <= TOL_F32 and f64 <= TOL_F64
        out[impl] = {"err32": err32, "err64": f64, "ok": ok, "fallback": fallback,
                     "hypergrad": [float(v) for v in ours.hypergrads["lr"]],
                     "reference": [float(v) for v in ref["lr"]]}
    return out


def time_all(impls: list[str], J: int, args: argparse.Namespace) -> dict[str, list[float]]:
    """Wall times of each implementation at one J: one warm-up each, then ``repeats`` rounds.

    The rounds interleave the implementations (round-robin), so that a burst of load from
    another process on the machine hits all of them rather than one.
    """
    model, opt, batches, val = build_problem(args.hidden, args.batch, J)
    fns = {impl: runner(impl, model, opt, batches, val) for impl in impls}
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for _ in range(args.repeats):
        for impl, fn in fns.items():
            gc.collect()
            t0 = time.perf_counter()
            out = fn()
            times[impl].append(time.perf_counter() - t0)
            del out
    return times


# ----------------------------------------------------------------------------- report
def fmt_time(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def fmt_err(x: float) -> str:
    return f"{x:.1e}"


def reading(rows: list[dict[str, Any]], unrolls: list[int]) -> list[str]:
    """Plain statements computed from the measured numbers."""
    by = {(r["impl"], r["J"]): r for r in rows}
    lines = []
    for J in unrolls:
        ref = by.get(("autograd unroll", J))
        floor = by.get(("plain training", J))
        parts = []
        for impl in GIMLI:
            r = by.get((impl, J))
            if r is None or r.get("median") is None or ref is None:
                parts.append(f"{impl}: not compared (hypergradient did not match)")
                continue
            t = ref["median"] / r["median"]
            speed = f"{t:.2f}x faster than" if t >= 1 else f"{1 / t:.2f}x slower than"
            mem = ""
            if r["mem"] > 0 and ref["mem"] > 0:
                m = ref["mem"] / r["mem"]
                mem = (f", peak memory growth {r['mem']:.0f} vs {ref['mem']:.0f} MiB "
                       f"({m:.1f}x {'less' if m >= 1 else 'more'})")
            else:
                mem = f", peak memory growth {r['mem']:.0f} vs {ref['mem']:.0f} MiB"
            parts.append(f"{impl} is {speed} the autograd unroll{mem}, "
                         f"{r['median'] / floor['median']:.1f}x the plain-training time")
        parts.append(f"the autograd unroll takes {ref['median'] / floor['median']:.1f}x the plain-training time")
        lines.append(f"- J={J}: " + "; ".join(parts) + ".")
    # growth with J
    if len(unrolls) >= 2:
        lo, hi = unrolls[0], unrolls[-1]
        seg = []
        for impl in IMPLS:
            a, b = by.get((impl, lo)), by.get((impl, hi))
            if a and b and a.get("median") and b.get("median"):
                seg.append(f"{impl} {b['median'] / a['median']:.1f}x time, "
                           f"{a['mem']:.0f} -> {b['mem']:.0f} MiB")
        lines.append(f"- From J={lo} to J={hi} ({hi / lo:.0f}x the steps): " + "; ".join(seg) + ".")
    return lines


def render(rows, unrolls, args, command, started, elapsed, loads) -> str:
    nparams = sum(p.numel() for p in build_problem(args.hidden, args.batch, 1)[0].parameters())
    out = [SECTION, ""]
    out.append(f"Command: `{command}`  ")
    out.append(f"Date: {started:%Y-%m-%d %H:%M} UTC; the whole run took {elapsed / 60:.1f} min  ")
    out.append(f"Machine: `{platform.platform()}`, {platform.machine()}, {os.cpu_count()} CPUs "
               f"(`{benchlib.cpu_model()}`), Python {platform.python_version()}, torch {torch.__version__}, "
               f"`torch.set_num_threads({args.threads})`, gimli_bptt {gimli_bptt.__version__}; "
               f"1-min load average at the start and after each J: {', '.join(f'{x:.1f}' for x in loads)}  ")
    out.append(f"Problem: MLP {IN_DIM} -> {args.hidden} -> {args.hidden} -> {CLASSES} (tanh, {nparams:,} parameters), "
               f"cross-entropy, batch {args.batch}, float32; SGD(momentum={MOMENTUM}) with 3 param groups "
               f"(lr {', '.join(map(str, LRS))}), meta-parameters: the 3 learning rates "
               f"(`learn={{\"lr\": \"group\"}}`); one hypergradient of the validation loss after J steps.  ")
    out.append(f"Time: median of {args.repeats} runs after one warm-up (min-max in brackets), in this process, the "
               f"implementations interleaved round-robin. "
               f"Memory: peak RSS growth (`ru_maxrss` after minus before one run) in a fresh subprocess per "
               f"row, after set-up and a J=1 warm-up. Ratio: median time / plain-training median at the same J. "
               f"Rel. error: max |gimli - autograd| / max |autograd| of the 3 hypergradients, float32 "
               f"(the timed computation) and float64 (`check_hypergradients`); tolerances {TOL_F32:g} / {TOL_F64:g}.")
    out.append("")
    out.append("| implementation | J | median time | ratio to floor | peak memory growth | rel. error f32 | rel. error f64 |")
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r.get("median") is None:
            t = "not timed (mismatch)"
            ratio = "-"
        else:
            t = f"{fmt_time(r['median'])} [{fmt_time(min(r['times']))}-{fmt_time(max(r['times']))}]"
            ratio = f"{r['ratio']:.1f}x"
        e32 = fmt_err(r["err32"]) if "err32" in r else ("reference" if r["impl"] == "autograd unroll" else "-")
        e64 = fmt_err(r["err64"]) if "err64" in r else ("reference" if r["impl"] == "autograd unroll" else "-")
        if r.get("fallback"):
            e32 += " (fell back to rev)"
        out.append(f"| {r['impl']} | {r['J']} | {t} | {ratio} | {r['mem']:.1f} MiB | {e32} | {e64} |")
    out.append("")
    out.append("Reading (computed from the numbers above):")
    out.append("")
    out.extend(reading(rows, unrolls))
    out.append(f"- The 1-min load average (other processes on this {os.cpu_count()}-CPU machine) went from "
               f"{loads[0]:.1f} to {loads[-1]:.1f} (max {max(loads):.1f}) during the run: absolute times, and "
               f"their growth with J, carry that noise; the implementations were interleaved round-robin at "
               f"each J, so the ratios at one J are less affected. Memory growth does not depend on load.")
    out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--unrolls", type=int, nargs="+", default=[10, 50, 200], help="values of J")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per row (after one warm-up)")
    p.add_argument("--hidden", type=int, default=256, help="hidden width H")
    p.add_argument("--batch", type=int, default=256, help="batch size")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: on a small machine shared with other processes, "
                        "2 threads on 2 cores made runs erratic and up to ~100x slower)")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run (J 2 4, H 32, batch 16, 2 repeats); prints, writes only with --out")
    p.add_argument("--out", type=Path, default=None,
                   help="Markdown file to write the section to (default bench/RESULTS.md; none with --quick)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--J", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    if args.quick:
        args.unrolls, args.hidden, args.batch, args.repeats = [2, 4], 32, 16, 2
    out_path = args.out if args.out is not None else (None if args.quick else Path(__file__).parent / "RESULTS.md")
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc)
    t_start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"H={args.hidden} batch={args.batch} J={args.unrolls} repeats={args.repeats}", flush=True)

    rows: list[dict[str, Any]] = []
    loads = [os.getloadavg()[0]]
    for J in args.unrolls:
        errs = check(J, args)
        for impl, e in errs.items():
            status = "ok" if e["ok"] else "MISMATCH"
            print(f"J={J:4d} {impl:16s} rel. error f32 {e['err32']:.2e} f64 {e['err64']:.2e} {status}"
                  + (" (fwd fell back to rev)" if e["fallback"] else ""), flush=True)
        timed = [impl for impl in ("plain training", "autograd unroll", *GIMLI)
                 if impl not in errs or errs[impl]["ok"]]
        times = time_all(timed, J, args)
        floor_median = statistics.median(times["plain training"])
        for impl in ("plain training", "autograd unroll", *GIMLI):
            row: dict[str, Any] = {"impl": impl, "J": J, "median": None}
            if impl in errs:
                row.update({k: errs[impl][k] for k in ("err32", "err64", "fallback")})
            if impl in times:
                row["times"] = times[impl]
                row["median"] = statistics.median(times[impl])
                row["ratio"] = row["median"] / floor_median
            mem = measure_memory(impl, J, args)
            row["mem"] = mem["growth_mib"]
            row["rss_before"] = mem["before_mib"]
            print(f"J={J:4d} {impl:16s} median {fmt_time(row['median']) if row['median'] else '-':>10s} "
                  f"ratio {row.get('ratio', float('nan')):6.1f}x  mem +{row['mem']:.1f} MiB "
                  f"(RSS before {mem['before_mib']:.0f} MiB)", flush=True)
            rows.append(row)
        loads.append(os.getloadavg()[0])
    rows.sort(key=lambda r: (IMPLS.index(r["impl"]), r["J"]))
    elapsed = time.perf_counter() - t_start
    section = render(rows, args.unrolls, args, command, started, elapsed, loads)
    benchlib.publish(out_path, SECTION, section)


if __name__ == "__main__":
    main()
