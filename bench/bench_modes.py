# SPDX-License-Identifier: Apache-2.0
"""Approximate hypergradients: ``first_order=True`` and ``truncate=K`` against the exact reverse sweep.

What a user gives up and gains with each approximation, on ``bench_peers.py``'s problems
(float32, one hypergradient of the validation loss after J inner steps, J = 50 and 200):

- ``a-sgd``: the 3 per-group learning rates of ``SGD(momentum=0.9)`` on a tanh MLP;
- ``a-adam``: the 3 per-group learning rates of ``Adam`` on the same MLP;
- ``c-maml``: MAML (``learn_init=True``) of the 2-conv-layer net on one 5-way 5-shot digits
  task, inner SGD (every inner step on the support set).

Rows (:data:`MODES`, ``GimliUpdater`` options per J): ``exact`` (the default reverse sweep),
``first_order`` (``first_order=True``; FOMAML on c-maml), ``truncate=1``, ``truncate=5`` and
``truncate=J/4`` (``truncate=K``; not defined with ``learn_init``, so n/a on c-maml). For each:
the time, the peak memory (fresh process), and the cosine similarity and norm ratio of the
approximate hypergradient to the exact one at the same J.

Method (``bench_peers.py``'s): correctness first, every row against
``gimli_bptt.testing.reference_hypergradients`` with the same options (the autograd unroll
follows each approximation's definition) in float64 at a small J and in float32 at each timed J;
times are medians of interleaved repeats in one process (``torch.set_num_threads(1)``); peak
memory in a fresh process per row.

Extension point: :data:`FORWARD_IMPLS` holds the rows of the forward-mode group (an MLP with m
learned per-group rates, m = 1, 3, 11, at J = 100, 1,000, 10,000: time and peak memory of
forward mode against reverse and checkpointed reverse). The group runs when ``GimliUpdater``
accepts ``mode="forward"`` (probed at start-up; ``--forward on`` runs the reverse rows without it).

Usage::

    python bench/bench_modes.py                 # full run, writes its section of bench/RESULTS.md
    python bench/bench_modes.py --quick         # smoke run (< 3 min), prints only
    python bench/bench_modes.py --problems a-sgd --unrolls 50 --repeats 3 --forward off --out /tmp/modes.md
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

import benchlib
import bench_peers as peers
from gimli_bptt import GimliUpdater, Memory
from gimli_bptt.testing import reference_hypergradients, relative_error

SECTION = "## Hypergradient modes: first_order, truncate and forward mode against the exact reverse sweep"
PROBLEMS = ("a-sgd", "a-adam", "c-maml")
TOL_F64, TOL_F32 = 1e-8, 1e-3
Options = Callable[[int], dict[str, Any]]

#: The rows of the approximation tables: name -> the ``GimliUpdater`` options for an unroll of J.
MODES: dict[str, Options] = {
    "exact": lambda J: {},
    "first_order": lambda J: {"first_order": True},
    "truncate=1": lambda J: {"truncate": 1},
    "truncate=5": lambda J: {"truncate": min(5, J)},
    "truncate=J/4": lambda J: {"truncate": max(1, J // 4)},
}

# =============================================================================================
# EXTENSION POINT: the forward-mode rows.
#
# FORWARD_IMPLS maps a row name to the GimliUpdater options of that row for an unroll of J; the
# group runs every row on RatesProblem(m) (a tanh MLP whose inner SGD has m param groups, the m
# learned rates) for m in --forward-rates and J in --forward-unrolls, checks it (float64 at a
# small J against the autograd unroll, float32 against the reference up to
# --forward-check-max-J and against the "reverse" row above that), times it interleaved and
# measures its peak memory in a fresh process. A new row is one entry here; main() adds
# FORWARD_ROW when GimliUpdater accepts mode="forward" (forward_mode_accepted()).
# =============================================================================================
FORWARD_IMPLS: dict[str, Options] = {
    "reverse": lambda J: {},
    "reverse ckpt": lambda J: {"memory": Memory(slots=max(1, math.ceil(math.sqrt(J))))},
}
FORWARD_ROW: tuple[str, Options] = ("forward", lambda J: {"mode": "forward"})
FORWARD_DEPTH, FORWARD_POOL = 6, 64  # Linear layers of RatesProblem (12 tensors); distinct batches, reused cyclically


def register_forward_row() -> tuple[bool, str]:
    """Adds :data:`FORWARD_ROW` to :data:`FORWARD_IMPLS` when ``mode="forward"`` is accepted; returns the probe."""
    forward = forward_mode_accepted()
    if forward[0]:
        FORWARD_IMPLS.setdefault(*FORWARD_ROW)
    return forward


def forward_mode_accepted() -> tuple[bool, str]:
    """Whether ``GimliUpdater(..., mode="forward")`` can be constructed, and why not."""
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = lambda m, b: m(b).pow(2).mean()  # noqa: E731
    try:
        GimliUpdater(model, opt, loss, loss, unroll=1, learn={"lr": "group"}, progress=False, mode="forward")
    except (TypeError, ValueError) as e:
        return False, benchlib.short_error(e)
    return True, "GimliUpdater accepts mode='forward'"


class RatesProblem(peers.Problem):
    """``bench_peers``' a-sgd set-up on a deeper tanh MLP whose 12 tensors form m param groups (m learned rates)."""

    def __init__(self, m: int, J: int, dtype: torch.dtype, hidden: int, batch: int, seed: int = 0):
        self.name, self.J, self.dtype, self.wd = f"rates-{m}", J, dtype, None
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        dims = [peers.IN_DIM] + [hidden] * (FORWARD_DEPTH - 1) + [peers.CLASSES]
        layers: list[nn.Module] = []
        for k in range(FORWARD_DEPTH):
            layers.append(nn.Linear(dims[k], dims[k + 1]))
            if k < FORWARD_DEPTH - 1:
                layers.append(nn.Tanh())
        self.model = nn.Sequential(*layers).to(dtype)
        n = 2 * FORWARD_DEPTH
        if not 1 <= m <= n:
            raise ValueError(f"m must be between 1 and {n} (the MLP's tensors), got {m}")
        self.groups = [c.tolist() for c in torch.arange(n).tensor_split(m)]
        self.lrs = tuple(0.05 * 0.8 ** k for k in range(m))
        self.opt_kind, self.meta = "sgd", "lr"
        teacher = torch.randn(peers.IN_DIM, peers.CLASSES, generator=g, dtype=dtype)

        def draw() -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.randn(batch, peers.IN_DIM, generator=g, dtype=dtype)
            return x, (x @ teacher).argmax(dim=1)

        pool = [draw() for _ in range(min(J, FORWARD_POOL))]
        self.batches = [pool[j % len(pool)] for j in range(J)]  # referenced, not copied
        self.val = draw()
        self.names = [n for n, _ in self.model.named_parameters()]


def make_problem(problem: str, J: int, dtype: torch.dtype, args: argparse.Namespace) -> peers.Problem:
    if problem.startswith("rates-"):
        return RatesProblem(int(problem.split("-", 1)[1]), J, dtype, args.forward_hidden, args.batch)
    return peers.Problem(problem, J, dtype, args.hidden, args.batch)


def updater(P: peers.Problem, **options: Any) -> GimliUpdater:
    """A ``GimliUpdater`` for one of bench_peers' problems, with extra options."""
    return GimliUpdater(P.model, P.make_opt(P.model), P.gimli_train_loss, P.val_loss, unroll=P.J,
                        learn={"lr": "group"} if P.meta == "lr" else None,
                        loss_params={"wd": P.wd} if P.meta == "wd" else None,
                        learn_init=P.meta == "init", progress=False, **options)


def row_options(group: str, row: str, J: int) -> dict[str, Any]:
    return (MODES if group == "modes" else FORWARD_IMPLS)[row](J)


def runner(P: peers.Problem, options: dict[str, Any]) -> Callable[[], torch.Tensor]:
    upd = updater(P, **options)
    return lambda: P.flat(upd.hypergradient(P.batches, P.val).hypergrads)


def reference(P: peers.Problem, options: dict[str, Any]) -> torch.Tensor:
    """The autograd unroll of the same definition (``first_order`` and ``truncate`` included)."""
    return P.flat(reference_hypergradients(updater(P, **options), P.batches, P.val)[1])


def not_applicable(e: BaseException) -> Optional[str]:
    """The reason a row does not exist for a problem (the library's ValueError), else None."""
    msg = str(e)
    if isinstance(e, ValueError) and "truncate" in msg and "learn_init" in msg:
        return "n/a: truncate < J with learn_init (θ_0 is a constant of the window)"
    if isinstance(e, ValueError) and "mode='forward'" in msg:
        return "n/a: " + msg.split(":")[0][:100]
    return None


# ----------------------------------------------------------------------------- checks
def check(group: str, problem: str, J: int, rows: list[str], dtype: torch.dtype, args: argparse.Namespace,
          with_reference: bool = True) -> dict[str, dict[str, Any]]:
    """Each row's hypergradient, its error against its reference, and (row "exact"/"reverse") the exact one."""
    P = make_problem(problem, J, dtype, args)
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        opts = row_options(group, row, J)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hg = runner(P, opts)()
                ref = reference(P, {k: v for k, v in opts.items() if k != "mode"}) if with_reference else None
            out[row] = {"hg": hg, "err": None if ref is None else relative_error(hg, ref)}
        except Exception as e:  # noqa: BLE001
            na = not_applicable(e)
            out[row] = {"na": na} if na else {"error": benchlib.short_error(e)}
    return out


def verdict(e64: Optional[dict[str, Any]], e32: Optional[dict[str, Any]]) -> tuple[str, bool]:
    for e in (e64, e32):
        if e is not None and "na" in e:
            return e["na"], False
        if e is not None and "error" in e:
            return "error: " + e["error"], False
    for e, tol in ((e64, TOL_F64), (e32, TOL_F32)):
        if e is not None and e.get("err") is not None and not e["err"] <= tol:
            return "MISMATCH", False
    return "ok", True


# ----------------------------------------------------------------------------- memory (fresh process)
def measure_row(req: dict[str, Any]) -> dict[str, Any]:
    """In a forked child: warm up on J=1, then the peak RSS growth of one hypergradient of the row."""
    args = argparse.Namespace(**req["sizes"])
    group, problem, row, J = req["group"], req["problem"], req["row"], req["J"]
    runner(make_problem(problem, 1, torch.float32, args), row_options(group, row, 1))()
    fn = runner(make_problem(problem, J, torch.float32, args), row_options(group, row, J))
    return benchlib.peak_growth(fn)


# ----------------------------------------------------------------------------- the run
def measure_group(group: str, problems: list[str], unrolls: list[int], rows: list[str], args: argparse.Namespace,
                  log: benchlib.RunLog, server: benchlib.ForkServer) -> list[dict[str, Any]]:
    """Checks, times and measures every (problem, J, row) of one group ("modes" or "forward")."""
    base = "exact" if group == "modes" else "reverse"
    sizes = {"hidden": args.hidden, "batch": args.batch, "forward_hidden": args.forward_hidden}
    out: list[dict[str, Any]] = []
    for problem in problems:
        J64 = args.check_unroll
        e64 = check(group, problem, J64, rows, torch.float64, args)
        for J in unrolls:
            with_ref = group == "modes" or J <= args.forward_check_max_J
            e32 = check(group, problem, J, rows, torch.float32, args, with_reference=with_ref)
            exact = e32.get(base, {}).get("hg")
            if not with_ref and exact is not None:  # beyond the reference's reach: against the reverse row
                for r in rows:
                    if "hg" in e32[r]:
                        e32[r]["err"] = relative_error(e32[r]["hg"], exact)
            status = {r: verdict(e64.get(r), e32.get(r)) for r in rows}
            P = make_problem(problem, J, torch.float32, args)
            repeats = args.repeats if group == "modes" else args.forward_repeats
            times, terr = benchlib.interleaved(
                {r: (lambda r=r: runner(P, row_options(group, r, J))) for r in rows if status[r][1]}, repeats)
            for r in rows:
                st = status[r][0] if r not in terr else "error: " + terr[r]
                row: dict[str, Any] = {"group": group, "problem": problem, "row": r, "J": J, "status": st,
                                       "J64": J64, "ref32": "reference" if with_ref else base}
                if e64.get(r, {}).get("err") is not None:
                    row["err64"] = e64[r]["err"]
                if e32.get(r, {}).get("err") is not None:
                    row["err32"] = e32[r]["err"]
                hg = e32.get(r, {}).get("hg")
                if hg is not None and exact is not None:
                    row["cos"] = benchlib.cosine(hg, exact)
                    row["norm"] = (hg.double().norm() / exact.double().norm()).item()
                opts = row_options(group, r, J)
                if "truncate" in opts:
                    row["note"] = f"K={opts['truncate']}"
                if "memory" in opts and opts["memory"].slots:
                    row["note"] = f"{opts['memory'].slots} slots"
                if r in times:
                    row["times"], row["median"] = times[r], benchlib.median(times[r])
                    m = server.measure({"group": group, "problem": problem, "row": r, "J": J, "sizes": sizes})
                    row["mem"] = m.get("growth_mib", m.get("error"))
                out.append(row)
                print(f"{group:7s} {problem:8s} J={J:5d} {r:13s} {st[:44]:44s} "
                      f"{benchlib.fmt_time(row['median']) if 'median' in row else '-':>10s} "
                      f"cos {row.get('cos', float('nan')):.4f} mem {benchlib.fmt_mem(row.get('mem'))}", flush=True)
            log.mark()
    return out


# ----------------------------------------------------------------------------- report
def table(rows: list[dict[str, Any]], group: str, problem: str) -> list[str]:
    base = "exact" if group == "modes" else "reverse"
    ref = {r["J"]: r for r in rows if r["group"] == group and r["problem"] == problem and r["row"] == base}
    sim = "cosine to exact | norm / exact's" if group == "modes" else "cosine to reverse | norm / reverse's"
    out = [f"| row | J | median time [min-max] | time / {base} | peak RSS growth | memory / {base} | {sim} | "
           f"rel. err f64 (J small) | rel. err f32 | status |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["group"] != group or r["problem"] != problem:
            continue
        b = ref.get(r["J"], {})
        t = "-" if r.get("median") is None or b.get("median") is None else f"{r['median'] / b['median']:.2f}"
        mem_ratio = ("-" if not isinstance(r.get("mem"), float) or not isinstance(b.get("mem"), float) or b["mem"] <= 0
                     else f"{r['mem'] / b['mem']:.2f}")
        cos = "-" if r.get("cos") is None else f"{r['cos']:.4f}"
        norm = "-" if r.get("norm") is None else f"{r['norm']:.3f}"
        e32 = benchlib.fmt_err(r.get("err32")) + ("" if r.get("ref32") == "reference" or r.get("err32") is None
                                                  else f" (vs {r['ref32']})")
        status = r["status"] + (f"; {r['note']}" if r.get("note") and not r["status"].startswith("n/a") else "")
        out.append(f"| {r['row']} | {r['J']} | {benchlib.fmt_times(r.get('times'))} | {t} | "
                   f"{benchlib.fmt_mem(r.get('mem'))} | {mem_ratio} | {cos} | {norm} | "
                   f"{benchlib.fmt_err(r.get('err64'))} | {e32} | {status.replace('|', '/')} |")
    return out


def render(rows: list[dict[str, Any]], args: argparse.Namespace, command: str, log: benchlib.RunLog,
           forward: tuple[bool, str], forward_run: bool) -> str:
    mlp = peers.Problem("a-sgd", 1, torch.float32, args.hidden, args.batch).model
    n_mlp = sum(p.numel() for p in mlp.parameters())
    n_conv = sum(p.numel() for p in peers.Problem("c-maml", 1, torch.float32, 0, 0).model.parameters())
    out = [SECTION, ""]
    out += log.header(command, args.threads)
    out.append("")
    out.append("Problems (`bench_peers.py`'s; float32, one hypergradient of the validation loss after J inner steps):")
    out.append("")
    out.append(f"- **a-sgd**: MLP {peers.IN_DIM} -> {args.hidden} -> {args.hidden} -> {peers.CLASSES} (tanh, "
               f"{n_mlp:,} parameters), cross-entropy, batch {args.batch}, random data; `SGD(momentum="
               f"{peers.MOMENTUM})`, one param group per layer; meta-parameters: the 3 learning rates.")
    out.append(f"- **a-adam**: the same with `Adam(betas={peers.BETAS}, eps={peers.EPS:g})`.")
    out.append(f"- **c-maml**: the conv net ({n_conv:,} parameters) on one {peers.WAYS}-way {peers.SHOTS}-shot digits "
               f"task, inner SGD lr {peers.MAML_LR}, every inner step on the support set; meta-parameters: θ_0 "
               f"(`learn_init=True`). `truncate=K < J` is not defined with `learn_init` (θ_0 would be a constant of "
               f"the window): n/a.")
    out.append("")
    out.append("Rows: `exact` (`GimliUpdater` defaults: the full reverse sweep), `first_order` (`first_order=True`: "
               "H_j·Ḡ_j dropped; FOMAML on c-maml), `truncate=K` (only the last K of the J steps differentiated; "
               "K = 1, 5 and J/4). Cosine and norm ratio: of each row's float32 hypergradient to `exact`'s at the "
               "same J (what the approximation gives up).")
    out.append("")
    out.append(f"Method: correctness first: each row against `gimli_bptt.testing.reference_hypergradients` with the "
               f"same options (the autograd unroll follows `first_order`'s and `truncate`'s definitions) in float64 "
               f"at J={args.check_unroll} (tolerance {TOL_F64:g}) and in float32 at each timed J ({TOL_F32:g}); a "
               f"row outside the tolerance is not timed. Time: median of {args.repeats} runs after one warm-up "
               f"[min-max], all rows of one (problem, J) interleaved round-robin in one process. Memory: peak RSS "
               f"(`VmHWM`, reset through `/proc/self/clear_refs` just before the run) minus the RSS before it, in a "
               f"fresh process per row forked from a server that only imported the libraries, after set-up and a "
               f"J=1 warm-up.")
    out.append("")
    for problem in dict.fromkeys(r["problem"] for r in rows if r["group"] == "modes"):
        out.append(f"### {problem}")
        out.append("")
        out.extend(table(rows, "modes", problem))
        out.append("")
    out.append("### Forward mode against reverse and checkpointed reverse")
    out.append("")
    out.append(f"`mode=\"forward\"` probe: {forward[1]}.")
    if forward_run:
        out.append("")
        out.append(f"Problem `rates-m`: the a-sgd set-up on a tanh MLP {peers.IN_DIM} -> "
                   f"{' -> '.join([str(args.forward_hidden)] * (FORWARD_DEPTH - 1))} -> {peers.CLASSES} "
                   f"({2 * FORWARD_DEPTH} tensors split into m contiguous param groups of `SGD(momentum="
                   f"{peers.MOMENTUM})`; meta-parameters: the m learning rates), {FORWARD_POOL} distinct batches "
                   f"of {args.batch} reused cyclically. Rows: {', '.join(f'`{k}`' for k in FORWARD_IMPLS)} "
                   f"(`reverse ckpt`: `memory=Memory(slots=ceil(sqrt(J)))`), {args.forward_repeats} timed runs each. float32 "
                   f"errors against the autograd unroll up to J={args.forward_check_max_J}, against `reverse` above.")
        for problem in dict.fromkeys(r["problem"] for r in rows if r["group"] == "forward"):
            out.append("")
            out.append(f"#### {problem}")
            out.append("")
            out.extend(table(rows, "forward", problem))
    else:
        out.append("The forward-mode rows were not run (`--forward off`, or `mode=\"forward\"` not accepted).")
    out.append("")
    out.append(f"The 1-min load average went from {log.loads[0]:.1f} to {log.loads[-1]:.1f} (max {max(log.loads):.1f}); "
               f"ratios within one (problem, J) were measured interleaved and are less affected than absolute times.")
    out.append("")
    return "\n".join(out)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    p.add_argument("--unrolls", type=int, nargs="+", default=[50, 200], help="values of J")
    p.add_argument("--check-unroll", type=int, default=20, help="J of the float64 check")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row, after one warm-up")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--forward", choices=("auto", "on", "off"), default="auto",
                   help="the forward-mode group: auto (when mode='forward' is accepted), on (also without: the "
                        "reverse rows only), off")
    p.add_argument("--forward-unrolls", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--forward-rates", type=int, nargs="+", default=[1, 3, 11], help="values of m")
    p.add_argument("--forward-hidden", type=int, default=64)
    p.add_argument("--forward-repeats", type=int, default=3,
                   help="timed runs per forward-group row (J reaches 10,000 there)")
    p.add_argument("--forward-check-max-J", type=int, default=1000,
                   help="the float32 check against the autograd unroll up to this J, against reverse above")
    p.add_argument("--quick", action="store_true",
                   help="smoke run (J 8 16, H 16, batch 8, 2 repeats; forward J 10 30, m 1 11); prints only")
    p.add_argument("--out", type=Path, default=None, help="Markdown file (default bench/RESULTS.md; none with --quick)")
    p.add_argument("--zygote", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    forward = register_forward_row()  # in the memory server too: it builds the same rows
    if args.zygote:
        benchlib.serve(measure_row, args.threads, benchlib.preload_digits)
        return
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    if args.quick:
        args.unrolls, args.check_unroll, args.hidden, args.batch, args.repeats = [8, 16], 8, 16, 8, 2
        args.forward_unrolls, args.forward_rates, args.forward_hidden, args.forward_repeats = [10, 30], [1, 11], 16, 2
    if args.repeats < 1 or args.forward_repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    out_path = args.out if args.out is not None else (None if args.quick else Path(__file__).parent / "RESULTS.md")
    torch.set_num_threads(args.threads)
    log = benchlib.RunLog()
    print(log.banner(torch.get_num_threads()), flush=True)
    forward_run = args.forward == "on" or (args.forward == "auto" and forward[0])
    print(f"mode='forward': {forward[1]}; forward-mode group {'runs' if forward_run else 'skipped'}", flush=True)
    rows: list[dict[str, Any]] = []
    with benchlib.ForkServer(__file__, args.threads) as server:
        rows += measure_group("modes", list(args.problems), list(args.unrolls), list(args.modes), args, log, server)
        if forward_run:
            rows += measure_group("forward", [f"rates-{m}" for m in args.forward_rates], list(args.forward_unrolls),
                                  list(FORWARD_IMPLS), args, log, server)
    section = render(rows, args, command, log, forward, forward_run)
    benchlib.publish(out_path, SECTION, section)


if __name__ == "__main__":
    main()
