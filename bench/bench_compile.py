# SPDX-License-Identifier: Apache-2.0
"""Compiled meta-steps: ``GimliUpdater(compile=True)`` beside eager gimli, a torch.func unroll
(eager and under ``torch.compile``), higher and TorchOpt, side by side in one process.

Cases (one hypergradient each, CPU, ``torch.set_num_threads(1)``):

- ``sine``: K-shot sinusoid MAML, MLP 1-40-40-1 (ReLU), T=25 tasks of K=10 points, learned θ_0
  and learned per-tensor inner SGD rates, MSE, J=1 and J=5;
- ``sine-j50``: the first call (compilation included) of gimli compile at J=50 against its own
  first call at J=5, and of the compiled torch.func unroll at J=50 (in a subprocess, capped);
- ``mlp``: a compute-bound MLP 64-256-256-256-1 (ReLU), batch 512 regression, SGD momentum 0.9,
  learned per-tensor lr, J=50; the compiled torch.func unroll at J=10 (and at J=50 if it compiles
  within the cap, in a subprocess);
- ``a-adam``: ``bench_peers.Problem("a-adam")`` (3 per-layer Adam rates of a tanh MLP) at J=50;
- ``cli``: the wall clock of ``python -m gimli_bptt sine`` with and without ``--compile``.

Every hypergradient is first compared in float64 with the autograd unroll of
``gimli_bptt.testing.reference_hypergradients`` (relative error in the table), then timed in float32,
every implementation warmed up once and interleaved round-robin (``benchlib.interleaved``).

The first call of a compiled row is measured once, on a fresh updater or a fresh ``torch.compile``
after ``torch._dynamo.reset()``. Inductor's FX-graph and AOT-autograd caches on disk are switched
off for the whole run (``--inductor-cache`` keeps them), and its cache of compiled C++ kernels starts
empty in a directory of the run's own: a kernel compiled by an earlier row of the run is not compiled
again, none from an earlier run is reused.

Usage::

    python bench/bench_compile.py                       # all cases, writes bench/RESULTS.md
    python bench/bench_compile.py --cases sine --repeats 3 --no-write
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gimli_bptt import GimliUpdater
from gimli_bptt.experiments.sine import make_mlp, sample_tasks
from gimli_bptt.testing import reference_hypergradients

import benchlib
from benchlib import fmt_time, median, short_error

higher, HIGHER_ERR = benchlib.import_optional("higher")  # benchmark-only: pip install -e ".[bench]"
torchopt, TORCHOPT_ERR = benchlib.import_optional("torchopt")

SECTION = "## Compiled meta-steps"
CASES = ("sine", "sine-j50", "mlp", "a-adam", "cli")
BASELINE = "torch.func unroll compiled"
MOMENTUM, BETAS, EPS = 0.9, (0.9, 0.999), 1e-8
SINE_TASKS, SINE_SHOTS, SINE_LR = 25, 10, 0.01
MLP_WIDTHS, MLP_BATCH, MLP_LR = (64, 256, 256, 256, 1), 512, 0.01


# ----------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One hypergradient problem, written once for every implementation.

    ``groups[k]`` are the parameter indices of learned rate ``k`` (``rates[k]`` its value);
    gimli learns them as ``learn`` says (per tensor from one param group, or per group).
    """

    name: str
    J: int
    model: nn.Module
    opt_kind: str  # "sgd", "sgdm" (momentum 0.9) or "adam"
    groups: list[list[int]]
    rates: tuple[float, ...]
    granularity: str  # gimli's learn={"lr": granularity}: "tensor" (one param group) or "group"
    learn_init: bool
    tasks: Optional[int]
    batches: list[tuple[Tensor, Tensor]]  # J batches; with tasks, every tensor has a leading task dimension
    val: tuple[Tensor, Tensor]
    loss: Callable[[Tensor, Tensor], Tensor]  # (output, target) -> scalar

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.model.named_parameters()]

    def rate_of(self) -> list[int]:
        """The index of the learned rate of every parameter tensor."""
        out = [0] * len(self.names)
        for k, idx in enumerate(self.groups):
            for i in idx:
                out[i] = k
        return out

    def make_opt(self, model: nn.Module, per_group: bool) -> torch.optim.Optimizer:
        """torch.optim's optimizer: one param group per learned rate, or (gimli, per tensor) one group."""
        params = list(model.parameters())
        if per_group:
            spec: list[dict[str, Any]] = [{"params": [params[i] for i in idx], "lr": lr}
                                          for idx, lr in zip(self.groups, self.rates)]
        else:
            spec = [{"params": params, "lr": self.rates[0]}]
        if self.opt_kind == "adam":
            return torch.optim.Adam(spec, betas=BETAS, eps=EPS)
        return torch.optim.SGD(spec, momentum=MOMENTUM if self.opt_kind == "sgdm" else 0.0)

    def gimli_loss(self, model: Any, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return self.loss(model(x), y)

    def flat(self, hg: dict[str, Any]) -> Tensor:
        """gimli's hypergradients as one vector: θ_0's (parameter order), then the rates'."""
        parts = [hg[f"init.{n}"].detach().reshape(-1) for n in self.names] if self.learn_init else []
        return torch.cat(parts + [hg["lr"].detach().reshape(-1)])

    def task_slice(self, t: int) -> tuple[list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
        """Task ``t``'s batches and validation batch (the whole problem without tasks)."""
        if self.tasks is None:
            return self.batches, self.val
        return [(x[t], y[t]) for x, y in self.batches], (self.val[0][t], self.val[1][t])


def sine_case(J: int, dtype: torch.dtype, seed: int = 0) -> Case:
    """MAML on 25 sinusoid tasks of 10 shots (the ``gimli-bptt sine`` model and task distribution)."""
    torch.manual_seed(seed)
    model = make_mlp().to(dtype)
    tasks = sample_tasks(SINE_TASKS, SINE_SHOTS, torch.Generator().manual_seed(seed + 1))
    support = tuple(t.to(dtype) for t in tasks.support)
    query = tuple(t.to(dtype) for t in tasks.query)
    n = len(list(model.parameters()))
    return Case("sine", J, model, "sgd", [[i] for i in range(n)], (SINE_LR,) * n, "tensor", True, SINE_TASKS,
                [support] * J, query, F.mse_loss)  # type: ignore[arg-type]


def mlp_case(J: int, dtype: torch.dtype, seed: int = 0) -> Case:
    """A compute-bound regression MLP 64-256-256-256-1, batch 512, SGD momentum 0.9, per-tensor rates."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(MLP_WIDTHS[:-1], MLP_WIDTHS[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    teacher = torch.randn(MLP_WIDTHS[0], 1, generator=g, dtype=dtype) / math.sqrt(MLP_WIDTHS[0])

    def draw() -> tuple[Tensor, Tensor]:
        x = torch.randn(MLP_BATCH, MLP_WIDTHS[0], generator=g, dtype=dtype)
        return x, torch.sin(3 * x @ teacher)

    n = len(list(model.parameters()))
    return Case("mlp", J, model, "sgdm", [[i] for i in range(n)], (MLP_LR,) * n, "tensor", False, None,
                [draw() for _ in range(J)], draw(), F.mse_loss)


def adam_case(J: int, dtype: torch.dtype) -> Case:
    """bench_peers' ``a-adam``: the 3 per-layer rates of Adam on a tanh MLP, cross-entropy."""
    import bench_peers

    P = bench_peers.Problem("a-adam", J, dtype, hidden=128, batch=64)
    return Case("a-adam", J, P.model, "adam", P.groups, P.lrs, "group", False, None, P.batches, P.val,
                F.cross_entropy)


def make_case(name: str, J: int, dtype: torch.dtype) -> Case:
    return {"sine": sine_case, "mlp": mlp_case, "a-adam": adam_case}[name](J, dtype)


# ----------------------------------------------------------------------------- implementations
# each returns a no-argument callable that gives the flat hypergradient (θ_0's, then the rates')
def run_gimli(case: Case, compile: bool) -> Callable[[], Tensor]:
    """``GimliUpdater`` with its default options, eager or ``compile=True``."""
    updater = GimliUpdater(case.model, case.make_opt(case.model, per_group=case.granularity == "group"),
                           case.gimli_loss, case.gimli_loss, unroll=case.J, learn={"lr": case.granularity},
                           learn_init=case.learn_init, tasks=case.tasks, progress=False, compile=compile)
    return lambda: case.flat(updater.hypergradient(case.batches, case.val).hypergrads)


def reference(case: Case) -> Tensor:
    """The autograd unroll of torch.optim's update (``gimli_bptt.testing``), the mean of every task's."""
    total = None
    for t in range(case.tasks or 1):
        batches, val = case.task_slice(t)
        updater = GimliUpdater(case.model, case.make_opt(case.model, per_group=case.granularity == "group"),
                               case.gimli_loss, case.gimli_loss, unroll=case.J, learn={"lr": case.granularity},
                               learn_init=case.learn_init, progress=False)
        hg = case.flat(reference_hypergradients(updater, batches, val)[1]) / (case.tasks or 1)
        total = hg if total is None else total + hg
    assert total is not None
    return total


def fresh_rates(case: Case) -> list[Tensor]:
    return [torch.tensor(lr, dtype=case.val[0].dtype, requires_grad=True) for lr in case.rates]


def torch_ops_step(case: Case, j: int, p: Tensor, g: Tensor, s: Any, lr: Tensor) -> tuple[Tensor, Any]:
    """torch.optim's update of one tensor at step ``j`` (0-based) in out-of-place torch ops; ``s`` its state."""
    if case.opt_kind == "adam":
        b1, b2 = BETAS
        m, v = s if s is not None else (torch.zeros_like(p), torch.zeros_like(p))
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        denom = v.sqrt() / math.sqrt(1 - b2 ** (j + 1)) + EPS
        return p - (lr / (1 - b1 ** (j + 1))) * m / denom, (m, v)
    if case.opt_kind == "sgdm":
        buf = g if s is None else MOMENTUM * s + g
        return p - lr * buf, buf
    return p - lr * g, None


def func_hypergradient(case: Case) -> Callable[..., tuple[Tensor, ...]]:
    """The expert's torch.func unroll: ``torch.func.grad`` of the loss on ``functional_call`` for every
    inner gradient (differentiable by the outer autograd), ``vmap`` over the tasks, then one
    ``torch.autograd.grad`` of the mean validation loss with respect to θ_0 and the rates."""
    model, names, rate_of = case.model, case.names, case.rate_of()

    def loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return case.loss(torch.func.functional_call(model, params, (x,)), y)

    def unroll(theta0: list[Tensor], rates: list[Tensor], batches: list[tuple[Tensor, Tensor]],
               val: tuple[Tensor, Tensor]) -> Tensor:
        params, state = dict(zip(names, theta0)), [None] * len(names)
        for j, (x, y) in enumerate(batches):
            grads = torch.func.grad(loss)(params, x, y)
            new = [torch_ops_step(case, j, params[n], grads[n], state[i], rates[rate_of[i]])
                   for i, n in enumerate(names)]
            params, state = {n: p for n, (p, _) in zip(names, new)}, [s for _, s in new]
        return loss(params, *val)

    def hypergradient(theta0: list[Tensor], rates: list[Tensor], batches: list[tuple[Tensor, Tensor]],
                      val: tuple[Tensor, Tensor]) -> tuple[Tensor, ...]:
        if case.tasks is None:
            L = unroll(theta0, rates, batches, val)
        else:
            L = torch.func.vmap(unroll, in_dims=(None, None, 0, 0))(theta0, rates, batches, val).mean()
        return torch.autograd.grad(L, (list(theta0) if case.learn_init else []) + list(rates))

    return hypergradient


def run_func(case: Case, compiled: bool) -> Callable[[], Tensor]:
    """The torch.func unroll, as it is or under ``torch.compile`` (the same function)."""
    hypergradient = func_hypergradient(case)
    if compiled:
        hypergradient = torch.compile(hypergradient)
    base = list(case.model.parameters())

    def fn() -> Tensor:
        theta0 = base if case.learn_init else [p.detach() for p in base]
        g = hypergradient(theta0, fresh_rates(case), case.batches, case.val)
        return torch.cat([t.reshape(-1) for t in g])
    return fn


def run_higher(case: Case) -> Callable[[], Tensor]:
    """higher 0.2.1: ``innerloop_ctx`` with the rates as ``override``, one task after the other."""
    if higher is None:
        raise RuntimeError(f"higher not importable: {HIGHER_ERR}")
    tasks = case.tasks or 1

    def fn() -> Tensor:
        rates = fresh_rates(case)
        opt = case.make_opt(case.model, per_group=True)
        wrt = (list(case.model.parameters()) if case.learn_init else []) + rates
        total: Optional[list[Tensor]] = None
        for t in range(tasks):
            batches, val = case.task_slice(t)
            with higher.innerloop_ctx(case.model, opt, copy_initial_weights=not case.learn_init,
                                      override={"lr": rates}) as (fmodel, dopt):
                for x, y in batches:
                    dopt.step(case.loss(fmodel(x), y))
                g = torch.autograd.grad(case.loss(fmodel(val[0]), val[1]) / tasks, wrt)
            total = list(g) if total is None else [a + b for a, b in zip(total, g)]
        assert total is not None
        return torch.cat([t.reshape(-1) for t in total])
    return fn


def run_torchopt(case: Case) -> Callable[[], Tensor]:
    """TorchOpt 0.7.3's functional API (one optimizer per learned rate), one task after the other."""
    if torchopt is None:
        raise RuntimeError(f"torchopt not importable: {TORCHOPT_ERR}")
    names, base, tasks = case.names, list(case.model.parameters()), case.tasks or 1

    def make(lr: Tensor) -> Any:
        if case.opt_kind == "adam":
            return torchopt.adam(lr=lr, betas=BETAS, eps=EPS, moment_requires_grad=True)
        return torchopt.sgd(lr=lr, momentum=MOMENTUM if case.opt_kind == "sgdm" else 0.0, moment_requires_grad=True)

    def fn() -> Tensor:
        rates = fresh_rates(case)
        theta0 = base if case.learn_init else [p.detach().clone().requires_grad_(True) for p in base]
        wrt = (list(theta0) if case.learn_init else []) + rates
        total: Optional[list[Tensor]] = None
        for t in range(tasks):
            batches, val = case.task_slice(t)
            params = list(theta0)
            opts = [make(lr) for lr in rates]
            states = [o.init(tuple(params[i] for i in idx)) for o, idx in zip(opts, case.groups)]
            for x, y in batches:
                out = torch.func.functional_call(case.model, dict(zip(names, params)), (x,))
                grads = torch.autograd.grad(case.loss(out, y), params, create_graph=True)
                new = list(params)
                for k, (o, idx) in enumerate(zip(opts, case.groups)):
                    upd, states[k] = o.update(tuple(grads[i] for i in idx), states[k], inplace=False)
                    for i, p in zip(idx, torchopt.apply_updates(tuple(params[i] for i in idx), upd, inplace=False)):
                        new[i] = p
                params = new
            out = torch.func.functional_call(case.model, dict(zip(names, params)), (val[0],))
            g = torch.autograd.grad(case.loss(out, val[1]) / tasks, wrt)
            total = list(g) if total is None else [a + b for a, b in zip(total, g)]
        assert total is not None
        return torch.cat([t.reshape(-1) for t in total])
    return fn


RUNNERS: dict[str, Callable[[Case], Callable[[], Tensor]]] = {
    "gimli": lambda c: run_gimli(c, compile=False),
    "gimli compile": lambda c: run_gimli(c, compile=True),
    "torch.func unroll": lambda c: run_func(c, compiled=False),
    BASELINE: lambda c: run_func(c, compiled=True),
    "higher": run_higher,
    "torchopt": run_torchopt,
}
COMPILED = ("gimli compile", BASELINE)
#: gimli's warning when a step function cannot be compiled (Note [Compile fallback] in gimli_bptt/compiled.py)
FALLBACK = re.compile(r"the '(\w+)' step function could not be compiled")


# ----------------------------------------------------------------------------- measuring
def f64_errors(name: str, J: int, impls: list[str]) -> dict[str, str]:
    """Each implementation's relative error against the autograd unroll, in float64 (or its error)."""
    case = make_case(name, J, torch.float64)
    ref = reference(case)
    out: dict[str, str] = {}
    for impl in impls:
        try:
            hg = RUNNERS[impl](case)()
            out[impl] = f"{((hg - ref).norm() / ref.norm()).item():.1e}"
        except Exception as e:  # noqa: BLE001 - a row says why it has no number
            out[impl] = "failed: " + short_error(e)
    return out


def first_call(make: Callable[[], Callable[[], Tensor]]) -> tuple[Optional[Callable[[], Tensor]], float, str]:
    """``(fn, seconds, note)``: a fresh implementation's first call, compilation included, after
    ``torch._dynamo.reset()`` (so no compiled code of an earlier row is reused). ``note`` is the
    error (``fn`` None), or the functions gimli could not compile and runs eagerly (Note [Compile fallback])."""
    torch._dynamo.reset()
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn = make()
            fn()
        except Exception as e:  # noqa: BLE001
            return None, time.perf_counter() - t0, short_error(e)
    seconds = time.perf_counter() - t0
    eager = sorted({m.group(1) for w in caught if (m := FALLBACK.search(str(w.message)))})
    return fn, seconds, f"runs eagerly: {', '.join(eager)}" if eager else ""


def measure(name: str, J: int, impls: list[str], args: argparse.Namespace,
            log: benchlib.RunLog) -> list[dict[str, Any]]:
    """One case at one J: the float64 check, the compiled rows' first calls, then interleaved float32 timing."""
    print(f"[{name} J={J}] float64 check of {', '.join(impls)}", flush=True)
    errors = f64_errors(name, J, impls)
    case = make_case(name, J, torch.float32)
    rows = {impl: {"impl": impl, "J": J, "f64": errors[impl]} for impl in impls}
    built: dict[str, Callable[[], Tensor]] = {}
    for impl in impls:
        if impl in COMPILED:
            print(f"[{name} J={J}] first call of {impl}", flush=True)
            fn, seconds, err = first_call(lambda impl=impl: RUNNERS[impl](case))
            rows[impl]["first"] = (fmt_time(seconds) + (f" ({err})" if err else "") if fn is not None
                                   else f"failed after {fmt_time(seconds)}: {err}")
            if fn is not None:
                built[impl] = fn
    factories = {impl: (lambda impl=impl: built[impl] if impl in built else RUNNERS[impl](case))
                 for impl in impls if impl not in COMPILED or impl in built}
    print(f"[{name} J={J}] timing {', '.join(factories)} ({args.repeats} rounds)", flush=True)
    times, terr = benchlib.interleaved(factories, args.repeats)
    log.mark()
    base = median(times[BASELINE]) if times.get(BASELINE) else None
    for impl, row in rows.items():
        if impl in times:
            row["median"] = median(times[impl])
            row["times"] = times[impl]
            row["ratio"] = f"{row['median'] / base:.2f}" if base else "-"
        elif impl in terr:
            row["status"] = "failed: " + terr[impl]
    return list(rows.values())


def probe_func_first_call(name: str, J: int, repeats: int, cap_s: float) -> dict[str, Any]:
    """The compiled torch.func unroll's first call at J in a fresh process, killed after ``cap_s`` seconds."""
    cmd = [sys.executable, os.path.abspath(__file__), "--probe", json.dumps({"case": name, "J": J, "repeats": repeats})]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    t0 = time.perf_counter()
    try:
        out, err = proc.communicate(timeout=cap_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and inductor's compile workers
        proc.communicate()
        return {"first": f"> {cap_s:.0f} s (cap)"}
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"first": f"failed after {fmt_time(time.perf_counter() - t0)}: "
                         + (err.strip().splitlines() or ["no output"])[-1][:160]}
    return json.loads(lines[-1])


def probe(spec: str) -> None:
    """``--probe``: the child of :func:`probe_func_first_call` (prints one JSON line)."""
    req = json.loads(spec)
    torch.set_num_threads(1)
    case = make_case(req["case"], req["J"], torch.float32)
    t0 = time.perf_counter()
    fn = run_func(case, compiled=True)
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(req["repeats"]):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"first": fmt_time(first), "median": median(times)}))


# ----------------------------------------------------------------------------- tables
def table(rows: list[dict[str, Any]], note: str = "") -> list[str]:
    lines = ["| implementation | J | float64 rel. error vs autograd unroll | median per hypergradient [min-max] "
             f"| ratio to {BASELINE} | first call (compile included) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        timing = benchlib.fmt_times(r.get("times")) if r.get("times") else r.get("status", "-")
        lines.append(f"| {r['impl']} | {r['J']} | {r.get('f64', '-')} | {timing} | {r.get('ratio', '-')} "
                     f"| {r.get('first', '-')} |")
    return lines + ([f"\n{note}"] if note else [])


def available(impls: list[str]) -> list[str]:
    """The implementations whose library imports (the others get a row saying why)."""
    return [i for i in impls if not (i == "higher" and higher is None) and not (i == "torchopt" and torchopt is None)]


def missing_rows(impls: list[str], J: int) -> list[dict[str, Any]]:
    why = {"higher": HIGHER_ERR, "torchopt": TORCHOPT_ERR}
    return [{"impl": i, "J": J, "status": f"not installed: {why[i]}"} for i in impls if i not in available(impls)]


# ----------------------------------------------------------------------------- cases
ALL_IMPLS = ["gimli", "gimli compile", "torch.func unroll", BASELINE, "higher", "torchopt"]


def case_sine(args: argparse.Namespace, log: benchlib.RunLog) -> list[str]:
    rows: list[dict[str, Any]] = []
    for J in (1, 5):
        rows += measure("sine", J, available(ALL_IMPLS), args, log) + missing_rows(ALL_IMPLS, J)
    return [f"### sine: MAML on {SINE_TASKS} sinusoid tasks of K={SINE_SHOTS} (MLP 1-40-40-1), learned θ_0 and "
            "per-tensor SGD rates", ""] + table(rows)


def case_sine_j50(args: argparse.Namespace, log: benchlib.RunLog) -> list[str]:
    seconds: dict[int, Optional[float]] = {}
    cells: dict[int, str] = {}
    for J in (5, 50):
        case = sine_case(J, torch.float32)
        print(f"[sine-j50] first call of gimli compile at J={J}", flush=True)
        fn, s, note = first_call(lambda case=case: run_gimli(case, compile=True))
        seconds[J] = s if fn is not None else None
        cells[J] = (fmt_time(s) + (f" ({note})" if note else "")) if fn is not None else f"failed: {note}"
    log.mark()
    print(f"[sine-j50] first call of {BASELINE} at J=50 (subprocess, cap {args.compile_cap_s:.0f} s)", flush=True)
    func = probe_func_first_call("sine", 50, 1, args.compile_cap_s)
    log.mark()
    j5, j50 = seconds[5], seconds[50]
    ratio = f"{j50 / j5:.2f}" if j5 and j50 else "-"
    lines = ["### sine: first call at J=50 (compilation included)", "",
             "| implementation | first call J=5 | first call J=50 | ratio J=50 / J=5 (target <= 2) |",
             "|---|---|---|---|", f"| gimli compile | {cells[5]} | {cells[50]} | {ratio} |"]
    lines.append(f"| {BASELINE} | - | {func['first']} (fresh process) | - |")
    return lines + ["", "J=5 runs first, in this process: the C++ kernels it compiles are reused by J=50 from "
                        "inductor's kernel cache (the same graphs at another J). The compiled torch.func unroll's "
                        "J=5 first call is in the sine table."]


def case_mlp(args: argparse.Namespace, log: benchlib.RunLog) -> list[str]:
    impls = ["gimli", "gimli compile", "torch.func unroll", "higher", "torchopt"]
    rows = measure("mlp", 50, available(impls), args, log) + missing_rows(impls, 50)
    rows += measure("mlp", 10, [BASELINE, "torch.func unroll"], args, log)
    print(f"[mlp] first call of {BASELINE} at J=50 (subprocess, cap {args.compile_cap_s:.0f} s)", flush=True)
    func = probe_func_first_call("mlp", 50, args.repeats, args.compile_cap_s)
    log.mark()
    note = (f"{BASELINE} at J=50, in a fresh process: first call {func['first']}"
            + (f", then median {fmt_time(func['median'])} over {args.repeats} calls (not interleaved)"
               if "median" in func else "") + ". The ratio column compares with the J=10 compiled row.")
    title = "### mlp: MLP 64-256-256-256-1, batch 512, SGD momentum 0.9, learned per-tensor rates"
    return [title, ""] + table(rows, note)


def case_adam(args: argparse.Namespace, log: benchlib.RunLog) -> list[str]:
    impls = ["gimli", "gimli compile", "torch.func unroll", "higher", "torchopt"]
    print(f"[a-adam] first call of {BASELINE} at J=50 (subprocess, cap {args.compile_cap_s:.0f} s)", flush=True)
    func = probe_func_first_call("a-adam", 50, args.repeats, args.compile_cap_s)
    if "median" in func:
        impls.append(BASELINE)
    rows = measure("a-adam", 50, available(impls), args, log) + missing_rows(impls, 50)
    note = (f"{BASELINE} at J=50, in a fresh process: first call {func['first']}"
            + ("; compiled within the cap, so it is in the table" if "median" in func else "; not in the table")
            + ". higher and TorchOpt step a different Adam than torch.optim's (bench_peers: their θ_J differs in "
              "float64), hence their float64 column.")
    title = "### a-adam: bench_peers' a-adam (3 per-layer Adam rates, tanh MLP 32-128-128-10, batch 64)"
    return [title, ""] + table(rows, note)


def case_cli(args: argparse.Namespace, log: benchlib.RunLog) -> list[str]:
    extra = shlex.split(args.cli_args)
    # as a user runs it: inductor's caches on (as by default), in this run's empty cache directory
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")
    walls: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for label, flags in (("eager", []), ("--compile", ["--compile"])):
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "gimli_bptt", "sine", *extra, *flags, "--no-progress", "--out", out]
            print(f"[cli] {' '.join(cmd[1:])}", flush=True)
            t0 = time.perf_counter()
            run = subprocess.run(cmd, env=env, capture_output=True, text=True)
            seconds[label] = time.perf_counter() - t0
            walls[label] = (fmt_time(seconds[label]) if run.returncode == 0 else
                            f"failed (exit {run.returncode}): {(run.stderr.strip().splitlines() or [''])[-1][:160]}")
        log.mark()
    speedup = seconds["eager"] / seconds["--compile"] if all(w[0].isdigit() for w in walls.values()) else None
    shortened = f" {args.cli_args}" if args.cli_args else ""
    return ["### cli: `python -m gimli_bptt sine" + shortened + "`, with and without `--compile`", "",
            "| run | wall clock |", "|---|---|", f"| eager | {walls['eager']} |",
            f"| --compile | {walls['--compile']} |",
            "", f"Speed-up with --compile: {speedup:.2f}x (target >= 3x)." if speedup else "Speed-up: -",
            ("" if not args.cli_args else
             f"Both runs with `{args.cli_args}` (the default run: K = 5, 10, 20, 4 methods, 1500 iterations); "
             "the compilation of each run's first meta step weighs more in a shorter run.")]


CASE_FUNCS: dict[str, Callable[[argparse.Namespace, benchlib.RunLog], list[str]]] = {
    "sine": case_sine, "sine-j50": case_sine_j50, "mlp": case_mlp, "a-adam": case_adam, "cli": case_cli}


# ----------------------------------------------------------------------------- main
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per row, after one warm-up")
    p.add_argument("--compile-cap-s", type=float, default=300.0,
                   help="seconds the compiled torch.func unroll may take at J=50 (in a subprocess) before it is "
                        "reported as '> cap'")
    p.add_argument("--cli-args", default="",
                   help="flags added to both `gimli-bptt sine` runs, e.g. to shorten both equally "
                        "(default: none, the default run)")
    p.add_argument("--inductor-cache", action="store_true",
                   help="keep inductor's FX-graph and AOT-autograd caches on disk (off by default, so first calls "
                        "compile)")
    p.add_argument("--no-write", action="store_true", help="print only; do not write bench/RESULTS.md")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS.md")
    p.add_argument("--probe", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if not args.inductor_cache:  # read by this process and inherited by the subprocesses
        # a cache directory of this run's own: no kernel compiled by an earlier run is reused
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench_compile_inductor."))
        os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"
        os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"
        torch._inductor.config.fx_graph_cache = False
        torch._functorch.config.enable_autograd_cache = False
    if args.probe:
        probe(args.probe)
        return
    torch.set_num_threads(1)
    log = benchlib.RunLog()
    print(log.banner(1), flush=True)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    parts: list[str] = []
    for name in args.cases:
        parts += CASE_FUNCS[name](args, log) + [""]
    cache = ("Inductor's FX-graph and AOT-autograd caches kept (`--inductor-cache`): first calls may reuse "
             "graphs compiled by earlier runs." if args.inductor_cache else
             "Inductor's FX-graph and AOT-autograd caches were off, and its cache of compiled C++ kernels started "
             "empty (a directory of this run's own): a kernel compiled by an earlier row of this run is not "
             "compiled again, none from an earlier run is reused.")
    section = "\n".join([SECTION, "", *log.header(command, 1), "",
                         "One hypergradient per call, float32, CPU, one thread, all rows of a table interleaved "
                         f"in one process ({args.repeats} rounds after a warm-up). The float64 column: relative "
                         "error against the autograd unroll of `gimli_bptt.testing.reference_hypergradients`. "
                         "First call: a fresh updater or a fresh `torch.compile` after `torch._dynamo.reset()`. "
                         + cache, "", *parts])
    benchlib.publish(None if args.no_write else args.out, SECTION, section)


if __name__ == "__main__":
    main()
