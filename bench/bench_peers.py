# SPDX-License-Identifier: Apache-2.0
"""gimli_bptt side by side with higher 0.2.1, TorchOpt 0.7.3 and a torch.func unroll.

Problems (one hypergradient of a validation loss after J inner steps, float32, random or
sklearn-digits data):

- ``a-sgd``: the 3 per-group learning rates of ``SGD(momentum=0.9)`` on a tanh MLP;
- ``a-adam``: the 3 per-group learning rates of ``Adam`` on the same MLP;
- ``b-wd``: 3 per-layer weight-decay coefficients inside the training loss (``loss_params``),
  inner ``SGD(momentum=0.9)``, same MLP;
- ``c-maml``: MAML (``learn_init=True``) of a 2-conv-layer net, 5-way 5-shot on sklearn digits
  upsampled to 14x14, inner SGD, J=5 only.

Implementations: gimli (the default options, ``GimliUpdater(...)`` with nothing set: ``memory="auto"``;
``hvp="rev"`` with ``memory=Memory()``, every state and no kept graph, with the kernels ``"auto"`` picks
and with the fused kernels' pure-PyTorch twin (``kernels="reference"``), ``hvp="fwd"``, ``memory=Memory(keep_graphs=True)``, ``memory=Memory(slots=ceil(sqrt(J)))``),
higher 0.2.1 (``innerloop_ctx`` with ``override``), TorchOpt 0.7.3 (functional API, with and
without ``use_accelerated_op``; the op exists for Adam only), a plain torch.func unroll
(``functional_call`` + ``autograd.grad(create_graph=True)`` + the optimizer written in torch
ops) and plain training (``loss.backward(); opt.step()``, no hypergradient) as the floor.

Every hypergradient is first compared with ``gimli_bptt.testing.reference_hypergradients`` (the
autograd unroll of ``torch.optim``'s update) in float64 at the smallest J and in float32 at each
J. A peer whose inner trajectory θ_J already differs from ``torch.optim``'s in float64 runs a
different optimizer: it is timed, in a row marked so. One whose θ_J agrees but whose
hypergradient does not is not timed. A peer that raises is reported with its error.

Usage::

    python bench/bench_peers.py                 # full run, writes bench/RESULTS.md and bench/img/peers_*.png
    python bench/bench_peers.py --quick         # tiny smoke run, prints only
"""
from __future__ import annotations

import argparse
import cProfile
import copy
import datetime
import gc
import io
import json
import math
import os
import platform
import pstats
import re
import shlex
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import gimli_bptt
from gimli_bptt import GimliUpdater, Memory
from gimli_bptt.testing import reference_hypergradients, relative_error

import benchlib
from benchlib import cpu_model, cpu_times, fmt_time, reset_peak, short_error, vm_hwm_mib

higher, HIGHER_ERR = benchlib.import_optional("higher")  # benchmark-only: pip install -e ".[bench]"
torchopt, TORCHOPT_ERR = benchlib.import_optional("torchopt")

SECTION = "## Side by side with higher and TorchOpt"
PROBLEMS = ("a-sgd", "a-adam", "b-wd", "c-maml")
IMPLS = ("gimli default", "gimli rev", "gimli rev no-kernels", "gimli fwd", "gimli keep_graphs", "gimli ckpt", "higher", "torchopt",
         "torchopt accel", "torch.func unroll", "plain training")
GIMLI = {"gimli default": {}, "gimli rev": dict(hvp="rev", memory=Memory()),
         "gimli rev no-kernels": dict(hvp="rev", memory=Memory(), kernels="reference"),
         "gimli fwd": dict(hvp="fwd", memory=Memory()),
         "gimli keep_graphs": dict(hvp="rev", memory=Memory(keep_graphs=True)), "gimli ckpt": dict(hvp="rev")}
SLUG = {i: re.sub(r"[^a-z0-9]+", "_", i) for i in IMPLS}
UNSLUG = {v: k for k, v in SLUG.items()}
IN_DIM, CLASSES = 32, 10
LRS_SGD = (0.05, 0.03, 0.02)
LRS_ADAM = (0.003, 0.002, 0.001)
MOMENTUM, BETAS, EPS = 0.9, (0.9, 0.999), 1e-8
WD = (1e-2, 2e-2, 5e-3)
MAML_LR, WAYS, SHOTS, QUERIES, MAML_J = 0.1, 5, 5, 15, 5
TOL_F32, TOL_F64, TOL_THETA = 1e-3, 1e-8, 1e-10


# ----------------------------------------------------------------------------- problems
class Problem:
    """One instance: model, optimizer settings, batches, meta-parameters, losses."""

    def __init__(self, name: str, J: int, dtype: torch.dtype, hidden: int, batch: int, seed: int = 0):
        self.name, self.J, self.dtype = name, J, dtype
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.wd: torch.Tensor | None = None
        if name == "c-maml":
            self.model = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(16 * 3 * 3, WAYS)).to(dtype)
            self.opt_kind, self.meta = "sgd0", "init"
            params = list(self.model.parameters())
            self.groups, self.lrs = [list(range(len(params)))], (MAML_LR,)
            support, query = maml_task(g, dtype)
            self.batches, self.val = [support] * J, query
        else:
            self.model = nn.Sequential(nn.Linear(IN_DIM, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                       nn.Linear(hidden, CLASSES)).to(dtype)
            self.groups = [[0, 1], [2, 3], [4, 5]]  # one param group per Linear layer
            self.opt_kind = "adam" if name == "a-adam" else "sgd"
            self.lrs = LRS_ADAM if name == "a-adam" else LRS_SGD
            self.meta = "wd" if name == "b-wd" else "lr"
            if self.meta == "wd":
                self.wd = torch.tensor(WD, dtype=dtype, requires_grad=True)
            teacher = torch.randn(IN_DIM, CLASSES, generator=g, dtype=dtype)

            def draw():
                x = torch.randn(batch, IN_DIM, generator=g, dtype=dtype)
                return x, (x @ teacher).argmax(dim=1)

            self.batches = [draw() for _ in range(J)]
            self.val = draw()
        self.names = [n for n, _ in self.model.named_parameters()]

    def make_opt(self, model: nn.Module) -> torch.optim.Optimizer:
        params = list(model.parameters())
        groups = [{"params": [params[i] for i in idx], "lr": lr} for idx, lr in zip(self.groups, self.lrs)]
        if self.opt_kind == "adam":
            return torch.optim.Adam(groups, betas=BETAS, eps=EPS)
        return torch.optim.SGD(groups, momentum=MOMENTUM if self.opt_kind == "sgd" else 0.0)

    # the loss of every implementation: logits, labels and the current parameter list
    def train_core(self, out: torch.Tensor, y: torch.Tensor, params, wd) -> torch.Tensor:
        loss = F.cross_entropy(out, y)
        if wd is not None:  # per-layer weight decay of the weight matrices, inside the loss
            loss = loss + 0.5 * sum(wd[k] * params[2 * k].pow(2).sum() for k in range(3))
        return loss

    def gimli_train_loss(self, model, batch):
        x, y = batch
        return self.train_core(model(x), y, list(model.parameters()), self.wd)

    @staticmethod
    def val_loss(model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    def flat(self, hg: dict[str, Any]) -> torch.Tensor:
        """gimli's hypergradient dict as one flat vector in the canonical order."""
        if self.meta == "lr":
            return hg["lr"].detach().reshape(-1)
        if self.meta == "wd":
            return hg["loss.wd"].detach().reshape(-1)
        return torch.cat([hg[f"init.{n}"].detach().reshape(-1) for n in self.names])


def maml_task(g: torch.Generator, dtype: torch.dtype):
    """A 5-way 5-shot task from sklearn's bundled digits (8x8, upsampled to 14x14); 15 queries per class."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(14, 14), mode="bilinear", align_corners=False).to(dtype)
    y = torch.tensor(d.target)
    classes = torch.randperm(10, generator=g)[:WAYS]
    sx, sy, qx, qy = [], [], [], []
    for k, c in enumerate(classes.tolist()):
        idx = (y == c).nonzero().reshape(-1)
        idx = idx[torch.randperm(len(idx), generator=g)[: SHOTS + QUERIES]]
        sx.append(x[idx[:SHOTS]]), qx.append(x[idx[SHOTS:]])
        sy.append(torch.full((SHOTS,), k)), qy.append(torch.full((QUERIES,), k))
    return (torch.cat(sx), torch.cat(sy)), (torch.cat(qx), torch.cat(qy))


# ----------------------------------------------------------------------------- implementations
# each runner returns a no-argument callable giving (flat hypergradient, θ_J or None)
def run_gimli(P: Problem, impl: str) -> Callable[[], Any]:
    opts = dict(GIMLI[impl])
    if impl == "gimli ckpt":
        opts["memory"] = Memory(slots=max(1, math.ceil(math.sqrt(P.J))))
    upd = GimliUpdater(P.model, P.make_opt(P.model), P.gimli_train_loss, P.val_loss, unroll=P.J,
                       learn={"lr": "group"} if P.meta == "lr" else None,
                       loss_params={"wd": P.wd} if P.meta == "wd" else None,
                       learn_init=P.meta == "init", progress=False, **opts)
    return lambda: (P.flat(upd.hypergradient(P.batches, P.val).hypergrads), None)


def meta_leaves(P: Problem):
    """Fresh meta-parameter leaves for the peers: per-group lrs, the wd tensor, or None (init)."""
    if P.meta == "lr":
        return [torch.tensor(lr, dtype=P.dtype, requires_grad=True) for lr in P.lrs]
    if P.meta == "wd":
        return [P.wd]
    return None


def run_higher(P: Problem) -> Callable[[], Any]:
    if higher is None:
        raise RuntimeError(f"higher not importable: {HIGHER_ERR}")

    def fn():
        lrs = meta_leaves(P)
        opt = P.make_opt(P.model)
        override = {"lr": lrs} if P.meta == "lr" else None
        with higher.innerloop_ctx(P.model, opt, copy_initial_weights=P.meta != "init", override=override) as (fm, dopt):
            for x, y in P.batches:
                dopt.step(P.train_core(fm(x), y, fm.fast_params, P.wd))
            L = P.val_loss(fm, P.val)
            wrt = list(P.model.parameters()) if P.meta == "init" else lrs
            g = torch.autograd.grad(L, wrt)
            theta = [t.detach() for t in fm.fast_params]
        return torch.cat([t.reshape(-1) for t in g]), theta
    return fn


def _torchopt_opt(P: Problem, lr, accel: bool):
    if P.opt_kind == "adam":
        return torchopt.adam(lr=lr, betas=BETAS, eps=EPS, moment_requires_grad=True, use_accelerated_op=accel)
    if accel:
        raise NotImplementedError("TorchOpt 0.7.3 has an accelerated op for Adam only")
    return torchopt.sgd(lr=lr, momentum=MOMENTUM if P.opt_kind == "sgd" else 0.0, moment_requires_grad=True)


def run_torchopt(P: Problem, accel: bool) -> Callable[[], Any]:
    if torchopt is None:
        raise RuntimeError(f"torchopt not importable: {TORCHOPT_ERR}")
    if accel and P.opt_kind != "adam":
        raise NotImplementedError("TorchOpt 0.7.3 has an accelerated op for Adam only")
    names, base = P.names, list(P.model.parameters())

    def fn():
        lrs = meta_leaves(P)
        if P.meta == "init":
            params = list(base)
        else:
            params = [p.detach().clone().requires_grad_(True) for p in base]
        opts = [_torchopt_opt(P, lrs[k] if P.meta == "lr" else lr, accel) for k, lr in enumerate(P.lrs)]
        states = [o.init(tuple(params[i] for i in idx)) for o, idx in zip(opts, P.groups)]
        for x, y in P.batches:
            out = torch.func.functional_call(P.model, dict(zip(names, params)), (x,))
            grads = torch.autograd.grad(P.train_core(out, y, params, P.wd), params, create_graph=True)
            new = list(params)
            for k, (o, idx) in enumerate(zip(opts, P.groups)):
                upd, states[k] = o.update(tuple(grads[i] for i in idx), states[k], inplace=False)
                for i, p in zip(idx, torchopt.apply_updates(tuple(params[i] for i in idx), upd, inplace=False)):
                    new[i] = p
            params = new
        L = P.val_loss(lambda x: torch.func.functional_call(P.model, dict(zip(names, params)), (x,)), P.val)
        g = torch.autograd.grad(L, base if P.meta == "init" else lrs)
        return torch.cat([t.reshape(-1) for t in g]), [t.detach() for t in params]
    return fn


def run_func(P: Problem) -> Callable[[], Any]:
    """The plain unroll: functional_call, autograd.grad(create_graph=True), torch.optim's update in torch ops."""
    names, base = P.names, list(P.model.parameters())
    b1, b2 = BETAS

    def fn():
        lrs = meta_leaves(P)
        params = list(base) if P.meta == "init" else [p.detach().clone().requires_grad_(True) for p in base]
        lr_of = {}
        for k, idx in enumerate(P.groups):
            for i in idx:
                lr_of[i] = lrs[k] if P.meta == "lr" else P.lrs[k]
        state: list[Any] = [None] * len(params)
        for t, (x, y) in enumerate(P.batches, start=1):
            out = torch.func.functional_call(P.model, dict(zip(names, params)), (x,))
            grads = torch.autograd.grad(P.train_core(out, y, params, P.wd), params, create_graph=True)
            new = []
            for i, (p, gr) in enumerate(zip(params, grads)):
                lr = lr_of[i]
                if P.opt_kind == "adam":
                    m, v = state[i] if state[i] is not None else (torch.zeros_like(p), torch.zeros_like(p))
                    m = b1 * m + (1 - b1) * gr
                    v = b2 * v + (1 - b2) * gr * gr
                    state[i] = (m, v)
                    denom = v.sqrt() / math.sqrt(1 - b2 ** t) + EPS
                    new.append(p - (lr / (1 - b1 ** t)) * m / denom)
                elif P.opt_kind == "sgd":
                    buf = gr if state[i] is None else MOMENTUM * state[i] + gr
                    state[i] = buf
                    new.append(p - lr * buf)
                else:
                    new.append(p - lr * gr)
            params = new
        L = P.val_loss(lambda x: torch.func.functional_call(P.model, dict(zip(names, params)), (x,)), P.val)
        g = torch.autograd.grad(L, base if P.meta == "init" else lrs)
        return torch.cat([t.reshape(-1) for t in g]), [t.detach() for t in params]
    return fn


def run_floor(P: Problem) -> Callable[[], Any]:
    def fn():
        twin = copy.deepcopy(P.model)
        opt = P.make_opt(twin)
        wd = None if P.wd is None else P.wd.detach()
        for x, y in P.batches:
            opt.zero_grad(set_to_none=True)
            P.train_core(twin(x), y, list(twin.parameters()), wd).backward()
            opt.step()
        return None, [p.detach() for p in twin.parameters()]
    return fn


def runner(impl: str, P: Problem) -> Callable[[], Any]:
    if impl in GIMLI:
        return run_gimli(P, impl)
    if impl == "higher":
        return run_higher(P)
    if impl in ("torchopt", "torchopt accel"):
        return run_torchopt(P, accel=impl == "torchopt accel")
    if impl == "torch.func unroll":
        return run_func(P)
    if impl == "plain training":
        return run_floor(P)
    raise ValueError(impl)


def reference(P: Problem) -> torch.Tensor:
    upd = GimliUpdater(P.model, P.make_opt(P.model), P.gimli_train_loss, P.val_loss, unroll=P.J,
                       learn={"lr": "group"} if P.meta == "lr" else None,
                       loss_params={"wd": P.wd} if P.meta == "wd" else None, learn_init=P.meta == "init")
    return P.flat(reference_hypergradients(upd, P.batches, P.val)[1])


# ----------------------------------------------------------------------------- checks
def check(problem: str, J: int, impls: list[str], args, f64: bool) -> dict[str, dict[str, Any]]:
    """Each implementation's hypergradient vs the autograd reference at J, in float32 or float64."""
    dtype = torch.float64 if f64 else torch.float32
    P = Problem(problem, J, dtype, args.hidden, args.batch)
    ref = reference(P)
    _, theta_ref = run_floor(P)()
    out: dict[str, dict[str, Any]] = {}
    for impl in impls:
        if impl == "plain training":
            continue
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                hg, theta = runner(impl, P)()
            err = relative_error(hg, ref)
            dtheta = None if theta is None else max(relative_error(a, b) for a, b in zip(theta, theta_ref))
            fallback = any("forward-mode" in str(w.message) for w in caught)
            out[impl] = {"err": err, "dtheta": dtheta, "fallback": fallback}
        except Exception as e:  # noqa: BLE001
            out[impl] = {"error": short_error(e), "trace": traceback.format_exc(limit=3)}
    return out


def verdict(e64: dict[str, Any] | None, e32: dict[str, Any] | None) -> tuple[str, bool]:
    """(status, timed): "ok", "different optimizer", "MISMATCH" or "error: ..."."""
    for e in (e64, e32):
        if e is not None and "error" in e:
            if e["error"].startswith("NotImplementedError"):
                return "n/a: " + e["error"].split(": ", 1)[1], False
            return "error: " + e["error"], False
    different = e64 is not None and e64.get("dtheta") is not None and e64["dtheta"] > TOL_THETA
    if different:
        return "different optimizer", True
    if (e64 is not None and not e64["err"] <= TOL_F64) or (e32 is not None and not e32["err"] <= TOL_F32):
        return "MISMATCH", False
    return "ok", True


# ----------------------------------------------------------------------------- memory (fresh subprocess)
def measure_in_child(req: dict[str, Any], args) -> dict[str, Any]:
    impl, problem, J = UNSLUG[req["impl"]], req["problem"], req["J"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner(impl, Problem(problem, 1, torch.float32, args.hidden, args.batch))()  # lazy init of torch
        P = Problem(problem, J, torch.float32, args.hidden, args.batch)
        fn = runner(impl, P)
        gc.collect()
        # the peak over this run alone: reset VmHWM to the current RSS (else the warm-up's peak would hide it)
        reset = reset_peak()
        before = vm_hwm_mib("VmRSS") if reset else vm_hwm_mib()
        out = fn()
        after = vm_hwm_mib()
    del out
    return {"before_mib": before, "after_mib": after, "growth_mib": after - before, "reset": reset}


def zygote(args) -> None:
    """Serves memory measurements: a fresh child process, forked from here, per request line on stdin.

    This process only imports the libraries (it never runs a benchmark), so each child starts
    with no allocator cache, no autograd state and no lazily initialised kernels from another
    row; forking saves the ~seconds of importing torch, higher and TorchOpt per row on the
    loaded machine. A forked child's ``VmHWM`` starts at its RSS at the fork; the row's
    memory is its growth over one run, measured inside the child.
    """
    def preload() -> None:
        from sklearn.datasets import load_digits  # noqa: F401  (import once, before forking)

    benchlib.serve(lambda req: measure_in_child(req, args), args.threads, preload)


class MemoryServer:
    """The zygote subprocess (``--zygote``), started once per benchmark run."""

    def __init__(self, args):
        cmd = [sys.executable, os.path.abspath(__file__), "--zygote", "--hidden", str(args.hidden),
               "--batch", str(args.batch), "--threads", str(args.threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def measure(self, problem: str, impl: str, J: int) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"problem": problem, "impl": SLUG[impl], "J": J}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {"error": "memory server died"}

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


# ----------------------------------------------------------------------------- timing
def time_all(problem: str, impls: list[str], J: int, args) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Median-ready wall times: one warm-up each, then ``repeats`` round-robin rounds."""
    P = Problem(problem, J, torch.float32, args.hidden, args.batch)
    fns, errors = {}, {}
    for impl in impls:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fns[impl] = runner(impl, P)
                fns[impl]()  # warm-up
        except Exception as e:  # noqa: BLE001
            errors[impl] = short_error(e)
            fns.pop(impl, None)
    times: dict[str, list[float]] = {impl: [] for impl in fns}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(args.repeats):
            for impl, fn in fns.items():
                gc.collect()
                t0 = time.perf_counter()
                out = fn()
                times[impl].append(time.perf_counter() - t0)
                del out
    return times, errors


def profile_gimli(args, J: int = 50, top: int = 14) -> str:
    """cProfile of one ``gimli default`` hypergradient on a-sgd: the top functions by cumulative time."""
    P = Problem("a-sgd", J, torch.float32, args.hidden, args.batch)
    fn = run_gimli(P, "gimli default")
    fn()
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).strip_dirs().sort_stats("cumulative").print_stats(top)
    lines = [ln for ln in s.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if "function calls" in ln)
    return "\n".join(lines[start:])


# ----------------------------------------------------------------------------- report
def label(impl: str, r: dict[str, Any]) -> str:
    return impl + (" (different optimizer)" if r.get("status") == "different optimizer" else "")


def table(rows: list[dict[str, Any]], problem: str) -> list[str]:
    out = ["| implementation | J | median time | ratio to floor | peak RSS growth | rel. err f64 (J small) | rel. err f32 | status |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["problem"] != problem:
            continue
        t = "-" if r.get("median") is None else f"{fmt_time(r['median'])} [{fmt_time(min(r['times']))}-{fmt_time(max(r['times']))}]"
        ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.1f}x"
        mem = r.get("mem")
        mem = "-" if mem is None else (mem if isinstance(mem, str) else f"{mem:.1f} MiB")
        e64 = "-" if r.get("err64") is None else f"{r['err64']:.1e}"
        if r.get("dtheta64") is not None and r.get("status") == "different optimizer":
            e64 += f" (θ_J differs by {r['dtheta64']:.1e})"
        e32 = "-" if r.get("err32") is None else f"{r['err32']:.1e}"
        if r.get("fallback"):
            e32 += " (fell back to rev)"
        status = r.get("status", "")
        if r.get("note"):
            status += f"; {r['note']}"
        out.append(f"| {label(r['impl'], r)} | {r['J']} | {t} | {ratio} | {mem} | {e64} | {e32} | {status.replace('|', '/')} |")
    return out


def reading(rows: list[dict[str, Any]]) -> list[str]:
    """Plain statements computed from the measured numbers: gimli default / keep_graphs vs each peer."""
    by = {(r["problem"], r["impl"], r["J"]): r for r in rows}
    lines = []
    for problem in dict.fromkeys(r["problem"] for r in rows):
        for J in sorted({r["J"] for r in rows if r["problem"] == problem}):
            parts = []
            for mine in ("gimli default", "gimli keep_graphs"):
                m = by.get((problem, mine, J))
                if not m or m.get("median") is None:
                    continue
                cmp = []
                for peer in ("higher", "torchopt", "torchopt accel", "torch.func unroll"):
                    p = by.get((problem, peer, J))
                    if not p or p.get("median") is None:
                        continue
                    t = p["median"] / m["median"]
                    s = f"{t:.2f}x faster" if t >= 1 else f"{1 / t:.2f}x slower"
                    if isinstance(m.get("mem"), float) and isinstance(p.get("mem"), float):
                        s += f", {m['mem']:.0f} vs {p['mem']:.0f} MiB"
                    cmp.append(f"{s} than {label(peer, p)}")
                if cmp:
                    parts.append(f"{mine} ({fmt_time(m['median'])}, {m['ratio']:.1f}x the floor) is " + "; ".join(cmp))
            if parts:
                lines.append(f"- {problem}, J={J}: " + ". ".join(parts) + ".")
    return lines


def plots(rows: list[dict[str, Any]], img_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = [p for p in ("a-sgd", "a-adam") if any(r["problem"] == p for r in rows)]
    paths: list[Path] = []
    if not probs:
        return paths
    for key, ylabel, fname in (("median", "median time per hypergradient [s]", "peers_time.png"),
                               ("mem", "peak RSS growth [MiB]", "peers_memory.png")):
        fig, axes = plt.subplots(1, len(probs), figsize=(6 * len(probs), 4.5), squeeze=False)
        for ax, prob in zip(axes[0], probs):
            for impl in IMPLS:
                pts = sorted((r["J"], r[key]) for r in rows if r["problem"] == prob and r["impl"] == impl
                             and isinstance(r.get(key), float) and r[key] > 0 and r.get("median") is not None)
                if pts:
                    mark = next(label(impl, r) for r in rows if r["problem"] == prob and r["impl"] == impl)
                    ax.plot(*zip(*pts), marker="o", label=mark, color=f"C{IMPLS.index(impl)}",
                            linestyle="--" if impl == "plain training" else "-")
            ax.set_xscale("log"), ax.set_yscale("log")
            ax.set_xlabel("J (inner steps)"), ax.set_ylabel(ylabel)
            ax.set_title(f"problem {prob}"), ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        img_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(img_dir / fname, dpi=110)
        plt.close(fig)
        paths.append(img_dir / fname)
    return paths


def versions() -> str:
    """:func:`benchlib.versions`, with the reason a peer library that is installed does not import."""
    failed = {"higher": None if higher is not None else HIGHER_ERR,
              "torchopt": None if torchopt is not None else TORCHOPT_ERR}
    notes = [f"{name} not importable ({err})" for name, err in failed.items()
             if err is not None and not err.startswith("ModuleNotFoundError")]
    return "; ".join([benchlib.versions()] + notes)


def accel_note() -> str:
    if torchopt is None:
        return "TorchOpt not importable"
    try:
        from torchopt._C import adam_op  # noqa: F401
        return "TorchOpt's compiled accelerated Adam op loads"
    except Exception as e:  # noqa: BLE001
        return (f"TorchOpt's compiled accelerated Adam op (`torchopt._C`) does not load against torch "
                f"{torch.__version__} (`{short_error(e)[:110]}`); with `use_accelerated_op=True` TorchOpt falls back "
                f"to its pure-Python implementation of the fused op, which is what the `torchopt accel` rows time")


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    p.add_argument("--unrolls", type=int, nargs="+", default=[10, 50, 200], help="values of J (c-maml: always 5)")
    p.add_argument("--big-J", type=int, default=1000, help="the extra long unroll, run on --big-J-problems only (0: none)")
    p.add_argument("--big-J-problems", nargs="*", default=["a-sgd", "a-adam", "b-wd"], choices=PROBLEMS)
    p.add_argument("--big-J-impls", nargs="+", choices=IMPLS,
                   default=[i for i in IMPLS if i not in ("gimli fwd", "gimli rev no-kernels")],
                   help="implementations run at --big-J (default: all but gimli fwd, the slowest in every row, and "
                        "gimli rev no-kernels, for time)")
    p.add_argument("--big-J-cap-mib", type=float, default=1500.0,
                   help="skip an implementation at --big-J when its J=200 memory growth, scaled linearly, exceeds this")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row, after one warm-up")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--no-profile", action="store_true", help="skip the cProfile of gimli default at J=50")
    p.add_argument("--quick", action="store_true", help="smoke run (J 3 6, H 16, batch 8, 2 repeats, no J=1000); prints only")
    p.add_argument("--out", type=Path, default=None, help="Markdown file (default bench/RESULTS.md; none with --quick)")
    p.add_argument("--img-dir", type=Path, default=None, help="plot folder (default bench/img; none with --quick)")
    p.add_argument("--zygote", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.zygote:
        zygote(args)
        return
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    here = Path(__file__).parent
    if args.quick:
        args.unrolls, args.hidden, args.batch, args.repeats, args.big_J = [3, 6], 16, 8, 2, 0
    out_path = args.out if args.out is not None else (None if args.quick else here / "RESULTS.md")
    img_dir = args.img_dir if args.img_dir is not None else (None if args.quick else here / "img")
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc)
    t_start = time.perf_counter()
    print(f"{versions()}; {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; load {os.getloadavg()}", flush=True)
    loads = [os.getloadavg()[0]]
    steal0 = cpu_times()
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    mem_server = MemoryServer(args)
    for problem in args.problems:
        unrolls = [MAML_J] if problem == "c-maml" else list(args.unrolls)
        e64 = check(problem, min(unrolls), list(args.impls), args, f64=True)
        big = args.big_J if problem in args.big_J_problems and args.big_J and problem != "c-maml" else 0
        for J in unrolls + ([big] if big else []):
            impls = list(args.impls)
            if J == big:  # only where the measured J=200-scale memory says it fits
                keep = []
                for impl in impls:
                    if impl not in args.big_J_impls:
                        skipped.append(f"{problem} {impl} at J={big}: left out for time (--big-J-impls)")
                        continue
                    prev = [r for r in rows if r["problem"] == problem and r["impl"] == impl and r["J"] == max(unrolls)]
                    mem = prev[0].get("mem") if prev else None
                    if prev and prev[0].get("median") is None:
                        if prev[0]["status"].startswith("n/a"):
                            continue
                        skipped.append(f"{problem} {impl} at J={big}: not timed at J={max(unrolls)} ({prev[0]['status']})")
                        continue
                    pred = mem * big / max(unrolls) if isinstance(mem, float) else None
                    if pred is not None and pred > args.big_J_cap_mib:
                        skipped.append(f"{problem} {impl} at J={big}: predicted {pred:.0f} MiB "
                                       f"(J={max(unrolls)} growth x {big / max(unrolls):g}) > cap {args.big_J_cap_mib:.0f} MiB")
                        continue
                    keep.append(impl)
                impls = keep
            e32 = check(problem, J, impls, args, f64=False)
            status = {i: verdict(e64.get(i), e32.get(i)) for i in impls if i != "plain training"}
            status["plain training"] = ("floor", True)
            timed = [i for i in impls if status[i][1]]
            times, terr = time_all(problem, timed, J, args)
            floor = statistics.median(times["plain training"])
            for impl in impls:
                st = status[impl][0]
                if impl in terr:
                    st = "error: " + terr[impl]
                row: dict[str, Any] = {"problem": problem, "impl": impl, "J": J, "status": st, "median": None}
                if impl in e64 and "err" in e64[impl]:
                    row.update(err64=e64[impl]["err"], dtheta64=e64[impl]["dtheta"])
                if impl in e32 and "err" in e32[impl]:
                    row.update(err32=e32[impl]["err"], fallback=e32[impl]["fallback"])
                if impl == "gimli ckpt":
                    row["note"] = f"checkpoint={max(1, math.ceil(math.sqrt(J)))} slots"
                if impl in times:
                    row.update(times=times[impl], median=statistics.median(times[impl]))
                    row["ratio"] = row["median"] / floor
                    m = mem_server.measure(problem, impl, J)
                    row["mem"] = m.get("growth_mib", m.get("error"))
                rows.append(row)
                print(f"{problem:7s} J={J:5d} {impl:18s} {st[:60]:60s} "
                      f"{fmt_time(row['median']) if row['median'] else '-':>10s} "
                      f"{row.get('ratio', float('nan')):6.1f}x mem {row.get('mem', '-')}", flush=True)
            loads.append(os.getloadavg()[0])
    mem_server.close()
    if out_path is not None:  # the raw rows first: a failure while rendering loses nothing
        (here / "peers_rows.json").write_text(json.dumps(rows, indent=1, default=str))
    prof = None if args.no_profile or args.quick else profile_gimli(args)
    elapsed = time.perf_counter() - t_start
    steal1 = cpu_times()
    steal = (steal1[0] - steal0[0]) / max(1, steal1[1] - steal0[1])
    section = render(rows, args, command, started, elapsed, loads, skipped, prof, steal)
    print()
    print(section)
    if img_dir is not None:
        print("plots:", [str(p) for p in plots(rows, img_dir)])
    if out_path is not None:
        benchlib.write_section(out_path, SECTION, section)
        print(f"written to {out_path}")


def render(rows, args, command, started, elapsed, loads, skipped, prof, steal: float = 0.0) -> str:
    mlp = Problem("a-sgd", 1, torch.float32, args.hidden, args.batch).model
    conv = Problem("c-maml", 1, torch.float32, args.hidden, args.batch).model
    n_mlp, n_conv = (sum(p.numel() for p in m.parameters()) for m in (mlp, conv))
    out = [SECTION, ""]
    out.append(f"Command: `{command}`  ")
    out.append(f"Date: {started:%Y-%m-%d %H:%M} UTC; the whole run took {elapsed / 60:.1f} min  ")
    out.append(f"Machine: `{platform.platform()}`, {os.cpu_count()} CPUs (`{cpu_model()}`), shared with other "
               f"processes; Python {platform.python_version()}, `torch.set_num_threads({args.threads})`  ")
    out.append(f"Versions: {versions()}  ")
    out.append(f"1-min load average at the start and after each (problem, J): {', '.join(f'{x:.1f}' for x in loads)}; "
               f"CPU time taken by the hypervisor (steal, /proc/stat) during the run: {100 * steal:.0f}%")
    out.append("")
    out.append("Problems (float32; one hypergradient of the validation loss after J inner steps):")
    out.append("")
    out.append(f"- **a-sgd**: MLP {IN_DIM} -> {args.hidden} -> {args.hidden} -> {CLASSES} (tanh, {n_mlp:,} parameters), "
               f"cross-entropy, batch {args.batch}, random data; `SGD(momentum={MOMENTUM})`, one param group per layer "
               f"(lr {', '.join(map(str, LRS_SGD))}); meta-parameters: the 3 learning rates.")
    out.append(f"- **a-adam**: the same with `Adam(betas={BETAS}, eps={EPS:g})` (lr {', '.join(map(str, LRS_ADAM))}).")
    out.append("- **b-wd**: the a-sgd set-up; the training loss adds `0.5 * wd[l] * ||W_l||^2` for the 3 weight "
               "matrices; meta-parameters: `wd` (3 values, `loss_params`).")
    out.append(f"- **c-maml**: conv net (2x [conv 3x3 16 ch, ReLU, max-pool 2], linear; {n_conv:,} parameters), "
               f"{WAYS}-way {SHOTS}-shot tasks from sklearn's digits upsampled to 14x14, {QUERIES} queries per class; "
               f"inner SGD lr {MAML_LR}, J={MAML_J} steps on the support set; meta-parameters: all initial weights "
               f"(`learn_init=True`). Only J={MAML_J} is reported (one task; no J axis).")
    out.append("")
    out.append("Implementations: `gimli default` (`GimliUpdater(...)` with no option set: `memory=\"auto\"`, the graphs "
               "that fit in half the available memory kept, `kernels=\"auto\"`); `gimli rev`/`fwd` (`hvp=`, with "
               "`memory=Memory()`: every state, no graph kept, each step's graph recomputed before its HVP), "
               "`gimli rev no-kernels` (the same with `kernels=\"reference\"`: the fused kernels' pure-PyTorch twin), `gimli keep_graphs` (`memory=Memory(keep_graphs=True)`), `gimli ckpt` "
               "(`memory=Memory(slots=ceil(sqrt(J)))`, binomial schedule); `higher` (`innerloop_ctx(..., override={'lr': "
               "[...]})`, its differentiable optimizers); `torchopt` (functional `torchopt.sgd/adam(lr=<tensor>, "
               "moment_requires_grad=True)`, one per param group, `update(..., inplace=False)` + `apply_updates`); "
               "`torchopt accel` (the same with `use_accelerated_op=True`; Adam only); `torch.func unroll` "
               "(`torch.func.functional_call` + `autograd.grad(create_graph=True)` + torch.optim's update written in "
               "torch ops); `plain training` (`loss.backward(); opt.step()` on a copy: the floor). "
               f"Note: {accel_note()}.")
    out.append("")
    out.append(f"Method: correctness first: each hypergradient vs `gimli_bptt.testing.reference_hypergradients` "
               f"(the autograd unroll of torch.optim's update) in float64 at the smallest J (tolerance {TOL_F64:g}) and "
               f"in float32 at each timed J ({TOL_F32:g}); a peer whose θ_J differs from torch.optim's in float64 "
               f"(relative > {TOL_THETA:g}) implements a different optimizer: its row is marked and still timed. "
               f"Time: median of {args.repeats} runs after one warm-up [min-max], all implementations of one "
               f"(problem, J) interleaved round-robin in one process. Memory: peak RSS (`VmHWM`, reset to the current RSS through `/proc/self/clear_refs` just before the run) minus the RSS before one run, "
               f"in a fresh process per row (forked from a server that only imported the libraries), after set-up and a J=1 warm-up. Ratio: median / the "
               f"plain-training median at the same (problem, J).")
    out.append("")
    for problem in dict.fromkeys(r["problem"] for r in rows):
        out.append(f"### {problem}")
        out.append("")
        out.extend(table(rows, problem))
        out.append("")
    if skipped:
        out.append("Not run at the long unroll:")
        out.append("")
        out.extend(f"- {s}" for s in skipped)
        out.append("")
    out.append("Reading (computed from the numbers above; >1x faster means gimli takes less time):")
    out.append("")
    out.extend(reading(rows))
    out.append(f"- The 1-min load average went from {loads[0]:.1f} to {loads[-1]:.1f} (max {max(loads):.1f}); "
               f"ratios within one (problem, J) were measured interleaved and are less affected than absolute times.")
    out.append("")
    if prof:
        out.append("Profile: one `gimli default` hypergradient, a-sgd, J=50 (cProfile, top functions by cumulative time; "
                   "cProfile's own overhead inflates Python-heavy code):")
        out.append("")
        out.append("```")
        out.append(prof)
        out.append("```")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
