# SPDX-License-Identifier: Apache-2.0
"""Meta-batches of tasks: ``GimliUpdater(tasks=T)`` against per-task loops and a vmap unroll.

Problems (the MAML objective: the mean over T tasks of the query loss after J inner SGD steps
on each task's support set, from a shared θ_0; float32):

- ``sinusoid``: K-shot sinusoid regression (Finn et al., 2017): amplitude in [0.1, 5], phase in
  [0, π], inputs uniform in [-5, 5]; MLP 1-40-40-1 with ReLU, MSE; K = 10 support and 10 query
  points per task; T = 25 tasks; inner SGD (lr 0.01); meta-parameters: θ_0 (``learn_init=True``)
  and one learning rate per parameter tensor (``learn={"lr": "tensor"}``); J = 1, 5, 20.
- ``c-maml``: ``bench_peers.py``'s conv task (5-way 5-shot digits, 2x [conv 3x3 16 ch, ReLU,
  max-pool 2], linear; inner SGD lr 0.1; ``learn_init=True``) at T = 4, 16, 32 tasks, J = 5.

Implementations, each giving the mean over the tasks of the hypergradient:

- ``gimli tasks``: one ``GimliUpdater(..., tasks=T).hypergradient()`` over the stacked tasks
  (default options: ``memory="auto"`` keeps the graphs that fit); ``gimli tasks tape``: the same
  with ``memory=Memory()`` (every state, no graph across or within steps kept: each step's graph
  is recomputed before its HVP); ``gimli tasks ckpt``: with ``memory=Memory(slots=ceil(sqrt(J)))``
  (binomial checkpointing); the last two at the largest J only;
- ``gimli loop``: one ``GimliUpdater`` without ``tasks``, T ``hypergradient()`` calls, averaged;
- ``higher loop``: ``higher.innerloop_ctx`` per task (one param group per tensor and
  ``override={"lr": [...]}`` for the learned rates), one ``autograd.grad`` per task, averaged;
- ``torchopt loop``: TorchOpt's functional ``torchopt.sgd`` per task (one per tensor for learned
  rates), ``functional_call`` + ``autograd.grad(create_graph=True)``, averaged;
- ``vmap unroll``: hand-written ``torch.func``: ``functional_call`` + ``torch.func.grad`` for
  the inner steps of one task, ``torch.func.vmap`` over the tasks, then one
  ``torch.autograd.grad`` of the mean query loss with respect to θ_0 and the rates (faster than
  an outer ``torch.func.grad`` here).

Method (``bench_peers.py``'s): correctness first, every hypergradient against the mean over
the tasks of ``gimli_bptt.testing.reference_hypergradients`` (the autograd unroll of each task)
in float64 at a small size and in float32 at each timed size, and against each other; times are
medians of interleaved repeats in one process (``torch.set_num_threads(1)``); peak memory is
measured in a fresh process per row. The project's targets (ratios of these numbers) are
computed and printed at the end.

Usage::

    python bench/bench_tasks.py                  # full run, writes its section of bench/RESULTS.md
    python bench/bench_tasks.py --quick          # smoke run (< 3 min), prints only
    python bench/bench_tasks.py --problems sinusoid --sin-unrolls 1 5 --repeats 3 --out /tmp/tasks.md
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
import torch.nn.functional as F
from torch import nn

import benchlib
import bench_peers as peers
from gimli_bptt import GimliUpdater, Memory
from gimli_bptt.testing import reference_hypergradients, relative_error

SECTION = "## Meta-batches of tasks: tasks=T against per-task loops and a vmap unroll"
PROBLEMS = ("sinusoid", "c-maml")
IMPLS = ("gimli tasks", "gimli tasks tape", "gimli tasks ckpt", "gimli loop", "higher loop", "torchopt loop", "vmap unroll")
SIN_LR, SIN_K, SIN_HIDDEN = 0.01, 10, 40
SIN_AMP, SIN_PHASE, SIN_X = (0.1, 5.0), (0.0, math.pi), (-5.0, 5.0)
TOL_F64, TOL_F32 = 1e-8, 1e-3
MEM_FLOOR_MIB = 1.0  # a memory ratio needs at least this much growth in its denominator
CHECK64_T, CHECK64_SIN_J = 4, 3  # the float64 check: T tasks; the sinusoid's J (c-maml: its J)


# ----------------------------------------------------------------------------- problems
def mse_loss(model: Callable[[torch.Tensor], torch.Tensor], batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


class TaskProblem:
    """T tasks of one kind, stacked along a leading dimension, and the model they share.

    Attributes:
        support, query: The stacked batches ``(x, y)``, every tensor of shape ``(T, ...)``.
        model: θ_0 (float ``dtype``), left unchanged by every implementation.
        learn: gimli's ``learn=`` (per-tensor rates for the sinusoid, none for c-maml).
        lr: The inner SGD learning rate (the learned rates' initial value).
    """

    def __init__(self, name: str, J: int, T: int, dtype: torch.dtype, seed: int = 0):
        self.name, self.J, self.T, self.dtype = name, J, T, dtype
        g = torch.Generator().manual_seed(seed + 1)
        if name == "sinusoid":
            torch.manual_seed(seed)
            self.model = nn.Sequential(nn.Linear(1, SIN_HIDDEN), nn.ReLU(), nn.Linear(SIN_HIDDEN, SIN_HIDDEN),
                                       nn.ReLU(), nn.Linear(SIN_HIDDEN, 1)).to(dtype)
            self.lr, self.learn = SIN_LR, {"lr": "tensor"}
            self.loss: Callable[..., torch.Tensor] = mse_loss

            def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
                return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=dtype)

            amp, phase = u(*SIN_AMP, T, 1, 1), u(*SIN_PHASE, T, 1, 1)
            sx, qx = u(*SIN_X, T, SIN_K, 1), u(*SIN_X, T, SIN_K, 1)
            self.support = (sx, amp * torch.sin(sx - phase))
            self.query = (qx, amp * torch.sin(qx - phase))
        elif name == "c-maml":
            self.model = peers.Problem("c-maml", 1, dtype, 0, 0, seed).model  # bench_peers' conv net
            self.lr, self.learn = peers.MAML_LR, None
            self.loss = peers.Problem.val_loss
            tasks = [peers.maml_task(g, dtype) for _ in range(T)]
            self.support = tuple(torch.stack([t[0][i] for t in tasks]) for i in range(2))
            self.query = tuple(torch.stack([t[1][i] for t in tasks]) for i in range(2))
        else:
            raise ValueError(f"unknown problem {name!r}")
        self.names = [n for n, _ in self.model.named_parameters()]
        self.learn_lr = self.learn is not None

    def task(self, t: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Task t's ``(support, query)``."""
        return tuple(x[t] for x in self.support), tuple(x[t] for x in self.query)

    def make_opt(self, model: nn.Module, per_tensor: bool = False) -> torch.optim.SGD:
        """Inner SGD over ``model``: one param group, or one per tensor (for higher's per-tensor rates)."""
        if per_tensor:
            return torch.optim.SGD([{"params": [p]} for p in model.parameters()], lr=self.lr)
        return torch.optim.SGD(model.parameters(), lr=self.lr)

    def updater(self, tasks: Optional[int], **options: Any) -> GimliUpdater:
        return GimliUpdater(self.model, self.make_opt(self.model), self.loss, self.loss, unroll=self.J,
                            learn=self.learn, learn_init=True, tasks=tasks, progress=False, **options)

    def flat(self, hg: dict[str, Any]) -> torch.Tensor:
        """gimli's hypergradients as one vector: the rates (if learned), then θ_0 in parameter order."""
        parts = [hg["lr"].detach().reshape(-1)] if self.learn_lr else []
        return torch.cat(parts + [hg[f"init.{n}"].detach().reshape(-1) for n in self.names])

    def rate_leaves(self) -> list[torch.Tensor]:
        """Fresh 0-d leaves for the peers' learned per-tensor rates (empty for c-maml)."""
        if not self.learn_lr:
            return []
        return [torch.tensor(self.lr, dtype=self.dtype, requires_grad=True) for _ in self.names]


# ----------------------------------------------------------------------------- implementations
# each runner returns a no-argument callable giving the flat mean hypergradient (P.flat's order)
def run_gimli_tasks(P: TaskProblem, memory: Optional[Memory] = None) -> Callable[[], torch.Tensor]:
    upd = P.updater(P.T, **({} if memory is None else {"memory": memory}))
    batches = [P.support] * P.J
    return lambda: P.flat(upd.hypergradient(batches, P.query).hypergrads)


def run_gimli_loop(P: TaskProblem) -> Callable[[], torch.Tensor]:
    upd = P.updater(None)
    tasks = [P.task(t) for t in range(P.T)]

    def fn() -> torch.Tensor:
        total = None
        for support, query in tasks:
            g = P.flat(upd.hypergradient([support] * P.J, query).hypergrads)
            total = g if total is None else total + g
        assert total is not None
        return total / P.T
    return fn


def _accumulate(total: Optional[list[torch.Tensor]], grads: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    if total is None:
        return list(grads)
    return [a + b for a, b in zip(total, grads)]


def _flat_peer(P: TaskProblem, total: list[torch.Tensor]) -> torch.Tensor:
    """The peers' gradients (θ_0 tensors, then the per-tensor rates) in P.flat's order."""
    n = len(P.names)
    theta, rates = total[:n], total[n:]
    parts = [torch.stack(rates).reshape(-1)] if rates else []
    return torch.cat(parts + [t.detach().reshape(-1) for t in theta])


def run_higher_loop(P: TaskProblem) -> Callable[[], torch.Tensor]:
    if peers.higher is None:
        raise RuntimeError(f"higher not importable: {peers.HIGHER_ERR}")
    higher = peers.higher
    opt = P.make_opt(P.model, per_tensor=P.learn_lr)
    base = list(P.model.parameters())
    tasks = [P.task(t) for t in range(P.T)]

    def fn() -> torch.Tensor:
        rates = P.rate_leaves()
        override = {"lr": rates} if rates else None
        total = None
        for support, query in tasks:
            with higher.innerloop_ctx(P.model, opt, copy_initial_weights=False, override=override) as (fm, dopt):
                for _ in range(P.J):
                    dopt.step(P.loss(fm, support))
                L = P.loss(fm, query) / P.T
                total = _accumulate(total, torch.autograd.grad(L, base + rates))
        assert total is not None
        return _flat_peer(P, total)
    return fn


def run_torchopt_loop(P: TaskProblem) -> Callable[[], torch.Tensor]:
    if peers.torchopt is None:
        raise RuntimeError(f"torchopt not importable: {peers.TORCHOPT_ERR}")
    torchopt = peers.torchopt
    names, base = P.names, list(P.model.parameters())
    tasks = [P.task(t) for t in range(P.T)]

    def fn() -> torch.Tensor:
        rates = P.rate_leaves()
        total = None
        for support, query in tasks:
            params = list(base)
            if rates:  # one optimizer per tensor, each with its learned rate
                opts = [torchopt.sgd(lr=r, moment_requires_grad=True) for r in rates]
                states = [o.init((p,)) for o, p in zip(opts, params)]
            else:
                opts = [torchopt.sgd(lr=P.lr, moment_requires_grad=True)]
                states = [opts[0].init(tuple(params))]
            for _ in range(P.J):
                model = lambda x, p=params: torch.func.functional_call(P.model, dict(zip(names, p)), (x,))  # noqa: E731
                grads = torch.autograd.grad(P.loss(model, support), params, create_graph=True)
                if rates:
                    new = []
                    for k, (o, p, gr) in enumerate(zip(opts, params, grads)):
                        upd, states[k] = o.update((gr,), states[k], inplace=False)
                        new.extend(torchopt.apply_updates((p,), upd, inplace=False))
                    params = new
                else:
                    upd, states[0] = opts[0].update(grads, states[0], inplace=False)
                    params = list(torchopt.apply_updates(tuple(params), upd, inplace=False))
            model = lambda x, p=params: torch.func.functional_call(P.model, dict(zip(names, p)), (x,))  # noqa: E731
            L = P.loss(model, query) / P.T
            total = _accumulate(total, torch.autograd.grad(L, base + rates))
        assert total is not None
        return _flat_peer(P, total)
    return fn


def run_vmap(P: TaskProblem) -> Callable[[], torch.Tensor]:
    """The torch.func unroll: inner steps by ``torch.func.grad``, vmapped over tasks, one outer autograd.grad."""
    from torch.func import functional_call, grad, vmap

    names, base = P.names, list(P.model.parameters())
    theta0 = dict(zip(names, base))

    def loss_at(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return P.loss(lambda inp: functional_call(P.model, params, (inp,)), (x, y))

    inner_grad = grad(loss_at)

    def one_task(theta: dict[str, torch.Tensor], lrs: Optional[torch.Tensor], sx: torch.Tensor, sy: torch.Tensor,
                 qx: torch.Tensor, qy: torch.Tensor) -> torch.Tensor:
        params = theta
        for _ in range(P.J):
            g = inner_grad(params, sx, sy)
            if lrs is None:
                params = {n: params[n] - P.lr * g[n] for n in names}
            else:
                params = {n: params[n] - lrs[k] * g[n] for k, n in enumerate(names)}
        return loss_at(params, qx, qy)

    batched = vmap(one_task, in_dims=(None, None, 0, 0, 0, 0))

    def fn() -> torch.Tensor:
        lrs = torch.full((len(names),), P.lr, dtype=P.dtype, requires_grad=True) if P.learn_lr else None
        L = batched(theta0, lrs, *P.support, *P.query).mean()
        wrt = base + ([lrs] if lrs is not None else [])
        grads = torch.autograd.grad(L, wrt)
        n = len(names)
        parts = [grads[n].reshape(-1)] if lrs is not None else []
        return torch.cat(parts + [g.reshape(-1) for g in grads[:n]])
    return fn


def slots_for(J: int) -> int:
    return max(1, math.ceil(math.sqrt(J)))


def runner(impl: str, P: TaskProblem) -> Callable[[], torch.Tensor]:
    if impl == "gimli tasks":
        return run_gimli_tasks(P)
    if impl == "gimli tasks tape":
        return run_gimli_tasks(P, Memory())
    if impl == "gimli tasks ckpt":
        return run_gimli_tasks(P, Memory(slots=slots_for(P.J)))
    if impl == "gimli loop":
        return run_gimli_loop(P)
    if impl == "higher loop":
        return run_higher_loop(P)
    if impl == "torchopt loop":
        return run_torchopt_loop(P)
    if impl == "vmap unroll":
        return run_vmap(P)
    raise ValueError(impl)


def reference(P: TaskProblem) -> torch.Tensor:
    """The mean over the tasks of each task's autograd-unroll hypergradient."""
    upd = P.updater(None)
    total = None
    for t in range(P.T):
        support, query = P.task(t)
        g = P.flat(reference_hypergradients(upd, [support] * P.J, query)[1])
        total = g if total is None else total + g
    assert total is not None
    return total / P.T


# ----------------------------------------------------------------------------- checks
def check(problem: str, J: int, T: int, impls: list[str], dtype: torch.dtype) -> dict[str, dict[str, Any]]:
    """Each implementation's hypergradient against the reference, and the largest difference to another one."""
    P = TaskProblem(problem, J, T, dtype)
    ref = reference(P)
    out: dict[str, dict[str, Any]] = {}
    got: dict[str, torch.Tensor] = {}
    for impl in impls:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hg = runner(impl, P)()
            got[impl] = hg
            out[impl] = {"err": relative_error(hg, ref)}
        except Exception as e:  # noqa: BLE001
            out[impl] = {"error": benchlib.short_error(e)}
    for impl, hg in got.items():
        others = [relative_error(hg, o) for k, o in got.items() if k != impl]
        out[impl]["pairwise"] = max(others, default=0.0)
        twin = "gimli tasks" if impl == "vmap unroll" else "vmap unroll"
        if impl in VECTORISED and twin in got:
            out[impl]["to_twin"] = relative_error(hg, got[twin])
    return out


#: The implementations that vectorise the tasks (torch.func.vmap), each with a twin among them:
#: gimli's rows and the vmap unroll check each other in float32 (see :func:`verdict`).
VECTORISED = ("gimli tasks", "gimli tasks tape", "gimli tasks ckpt", "vmap unroll")


def verdict(e64: Optional[dict[str, Any]], e32: Optional[dict[str, Any]]) -> tuple[str, bool]:
    """(status, timed).

    A vectorised row that is exact in float64 but outside the float32 tolerance of the per-task
    reference, while within it of its vectorised twin (gimli tasks <-> the vmap unroll), is timed
    and marked: that float32 difference is torch's batched kernels (at c-maml T=32, both
    vectorised rows differ from the per-task loops by 1.4e-3 and from each other by 2.5e-7; in
    float64 all agree to 5e-16), not the hypergradient.
    """
    for e in (e64, e32):
        if e is not None and "error" in e:
            return "error: " + e["error"], False
    if e64 is not None and not e64["err"] <= TOL_F64:
        return "MISMATCH", False
    if e32 is not None and not e32["err"] <= TOL_F32:
        if e32.get("to_twin", float("inf")) <= TOL_F32:
            return "ok; float32 as the other vmapped row's, not the per-task loops'", True
        return "MISMATCH", False
    return "ok", True


# ----------------------------------------------------------------------------- memory (fresh process)
def measure_row(req: dict[str, Any]) -> dict[str, Any]:
    """In a forked child: warm up on J=1, then the peak RSS growth of one run of the row."""
    impl, problem, J, T = req["impl"], req["problem"], req["J"], req["T"]
    runner(impl, TaskProblem(problem, 1, T, torch.float32))()  # lazy initialisation of torch
    fn = runner(impl, TaskProblem(problem, J, T, torch.float32))
    return benchlib.peak_growth(fn)


# ----------------------------------------------------------------------------- the run
def check64_size(problem: str, args: argparse.Namespace) -> tuple[int, int]:
    """The (T, J) of the float64 check: 4 tasks (2 with --quick), J = 3 for the sinusoid (2 with --quick),
    c-maml's own J."""
    T = 2 if args.quick else CHECK64_T
    if problem == "sinusoid":
        return T, 2 if args.quick else CHECK64_SIN_J
    return T, args.maml_unroll


def sizes(problem: str, args: argparse.Namespace) -> list[tuple[int, int]]:
    """The timed (J, T) of a problem."""
    if problem == "sinusoid":
        return [(J, args.sin_tasks) for J in args.sin_unrolls]
    return [(args.maml_unroll, T) for T in args.maml_tasks]


def impls_at(problem: str, J: int, args: argparse.Namespace) -> list[str]:
    """The implementations of one size: the tape and checkpointed rows only at the sinusoid's largest J
    (the checkpointed one with slots < J)."""
    out = []
    for impl in args.impls:
        largest = problem == "sinusoid" and J == max(args.sin_unrolls)
        if impl == "gimli tasks ckpt" and not (largest and slots_for(J) < J):
            continue
        if impl == "gimli tasks tape" and not largest:
            continue
        out.append(impl)
    return out


def run(args: argparse.Namespace, log: benchlib.RunLog) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    server = benchlib.ForkServer(__file__, args.threads)
    try:
        for problem in args.problems:
            T64, J64 = check64_size(problem, args)
            e64 = check(problem, J64, T64, list(args.impls), torch.float64)
            for J, T in sizes(problem, args):
                impls = impls_at(problem, J, args)
                e32 = check(problem, J, T, impls, torch.float32)
                status = {i: verdict(e64.get(i), e32.get(i)) for i in impls}
                timed = [i for i in impls if status[i][1]]
                P = TaskProblem(problem, J, T, torch.float32)
                times, terr = benchlib.interleaved({i: (lambda i=i: runner(i, P)) for i in timed}, args.repeats)
                for impl in impls:
                    st = status[impl][0] if impl not in terr else "error: " + terr[impl]
                    row: dict[str, Any] = {"problem": problem, "impl": impl, "J": J, "T": T, "status": st}
                    for key, e in (("64", e64.get(impl)), ("32", e32.get(impl))):
                        if e and "err" in e:
                            row["err" + key], row["pair" + key] = e["err"], e["pairwise"]
                    if impl == "gimli tasks ckpt":
                        row["note"] = f"{slots_for(J)} slots"
                    if impl in times:
                        row["times"] = times[impl]
                        row["median"] = benchlib.median(times[impl])
                        m = server.measure({"problem": problem, "impl": impl, "J": J, "T": T})
                        row["mem"] = m.get("growth_mib", m.get("error"))
                    rows.append(row)
                    print(f"{problem:8s} J={J:3d} T={T:3d} {impl:17s} {st[:40]:40s} "
                          f"{benchlib.fmt_time(row['median']) if 'median' in row else '-':>10s} "
                          f"mem {benchlib.fmt_mem(row.get('mem'))}", flush=True)
                log.mark()
    finally:
        server.close()
    return rows


# ----------------------------------------------------------------------------- report
def table(rows: list[dict[str, Any]], problem: str) -> list[str]:
    base = {(r["J"], r["T"]): r for r in rows if r["problem"] == problem and r["impl"] == "gimli tasks"}
    out = ["| implementation | J | T | median time [min-max] | time / gimli tasks | peak RSS growth | "
           "rel. err f64 (small) | rel. err f32 | max rel. diff to the others f32 | status |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["problem"] != problem:
            continue
        b = base.get((r["J"], r["T"]))
        ratio = "-" if r.get("median") is None or not b or b.get("median") is None else f"{r['median'] / b['median']:.2f}"
        status = r["status"] + (f"; {r['note']}" if r.get("note") else "")
        out.append(f"| {r['impl']} | {r['J']} | {r['T']} | {benchlib.fmt_times(r.get('times'))} | {ratio} | "
                   f"{benchlib.fmt_mem(r.get('mem'))} | {benchlib.fmt_err(r.get('err64'))} | "
                   f"{benchlib.fmt_err(r.get('err32'))} | {benchlib.fmt_err(r.get('pair32'))} | "
                   f"{status.replace('|', '/')} |")
    return out


def targets(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """The project's targets, computed from the rows (at the sizes this run measured)."""
    by = {(r["problem"], r["impl"], r["J"], r["T"]): r for r in rows}

    def val(problem: str, impl: str, J: int, T: int, key: str) -> Optional[float]:
        r = by.get((problem, impl, J, T))
        v = None if r is None else r.get(key)
        return v if isinstance(v, float) else None

    out = ["| ratio | size | measured | target | met |", "|---|---|---:|---:|---|"]

    def add(what: str, size: str, num: Optional[float], den: Optional[float], target: float, below: bool,
            speedup: bool = False, floor: float = 0.0) -> None:
        bound = f"{'≤' if below else '≥'} {'1/3' if target == 1 / 3 else f'{target:g}'}"
        if num is None or den is None or den <= floor:
            why = "not measured" if num is None or den is None else f"not comparable (under {floor:g} MiB)"
            out.append(f"| {what} | {size} | - | {bound} | {why} |")
            return
        x = num / den
        met = x <= target if below else x >= target
        shown = f"{x:.2f}x" if speedup else f"{x:.2f}"
        out.append(f"| {what} | {size} | {shown} | {bound} | {'yes' if met else 'NO'} |")

    if "sinusoid" in args.problems:
        T = args.sin_tasks
        Js = sorted(args.sin_unrolls)
        for J in Js:
            add("time: gimli tasks / vmap unroll", f"sinusoid T={T} J={J}", val("sinusoid", "gimli tasks", J, T, "median"),
                val("sinusoid", "vmap unroll", J, T, "median"), 1.2 if J == min(Js) else 1.0, True)
        for J in Js[:2]:
            add("speed-up: gimli loop / gimli tasks", f"sinusoid T={T} J={J}", val("sinusoid", "gimli loop", J, T, "median"),
                val("sinusoid", "gimli tasks", J, T, "median"), 8.0, False, speedup=True)
        J = max(Js)
        # the target is for a plan without a graph across steps: the tape of states and checkpointing
        for impl in ("gimli tasks tape", "gimli tasks ckpt"):
            add(f"peak memory: {impl} / vmap unroll", f"sinusoid T={T} J={J}", val("sinusoid", impl, J, T, "mem"),
                val("sinusoid", "vmap unroll", J, T, "mem"), 1 / 3, True, floor=MEM_FLOOR_MIB)
        num, den = val("sinusoid", "gimli tasks", J, T, "mem"), val("sinusoid", "vmap unroll", J, T, "mem")
        if num is not None and den is not None and den > MEM_FLOOR_MIB:
            out.append(f"| peak memory: gimli tasks / vmap unroll | sinusoid T={T} J={J} | {num / den:.2f} | "
                       "(none: memory='auto' keeps the graphs that fit, as the unroll does) | - |")
    if "c-maml" in args.problems:
        Ts = sorted(args.maml_tasks)
        T = 16 if 16 in Ts else Ts[len(Ts) // 2]
        add("speed-up: gimli loop / gimli tasks", f"c-maml T={T} J={args.maml_unroll}",
            val("c-maml", "gimli loop", args.maml_unroll, T, "median"),
            val("c-maml", "gimli tasks", args.maml_unroll, T, "median"), 4.0, False, speedup=True)
    return out


def render(rows: list[dict[str, Any]], args: argparse.Namespace, command: str, log: benchlib.RunLog) -> str:
    n_sin = sum(p.numel() for p in TaskProblem("sinusoid", 1, 1, torch.float32).model.parameters())
    n_conv = sum(p.numel() for p in peers.Problem("c-maml", 1, torch.float32, 0, 0).model.parameters())
    out = [SECTION, ""]
    out += log.header(command, args.threads)
    out.append("")
    out.append("Problems (float32; the mean over T tasks of the query loss after J inner SGD steps on each task's "
               "support set, from a shared θ_0):")
    out.append("")
    out.append(f"- **sinusoid**: K-shot sinusoid regression (MAML, Finn et al. 2017): amplitude in [{SIN_AMP[0]:g}, "
               f"{SIN_AMP[1]:g}], phase in [0, π], inputs uniform in [{SIN_X[0]:g}, {SIN_X[1]:g}]; MLP 1-{SIN_HIDDEN}-"
               f"{SIN_HIDDEN}-1 with ReLU ({n_sin:,} parameters), MSE; {SIN_K} support and {SIN_K} query points per "
               f"task; inner SGD lr {SIN_LR}; meta-parameters: θ_0 (`learn_init=True`) and one learning rate per "
               f"parameter tensor (`learn={{\"lr\": \"tensor\"}}`).")
    out.append(f"- **c-maml**: `bench_peers.py`'s conv net (2x [conv 3x3 16 ch, ReLU, max-pool 2], linear; "
               f"{n_conv:,} parameters) on {peers.WAYS}-way {peers.SHOTS}-shot tasks from sklearn's digits (14x14, "
               f"{peers.QUERIES} queries per class); inner SGD lr {peers.MAML_LR}; meta-parameters: θ_0.")
    out.append("")
    out.append("Implementations (each gives the mean over the tasks of the hypergradient): `gimli tasks` "
               "(`GimliUpdater(..., tasks=T)`, default options, one `hypergradient()` over the stacked tasks); "
               "`gimli tasks tape` (the same with `memory=Memory()`: every state, each step's graph recomputed "
               "before its HVP, none kept) and `gimli tasks ckpt` (with `memory=Memory(slots=ceil(sqrt(J)))`), both "
               "at the largest J; "
               "`gimli loop` (one updater without `tasks`, T `hypergradient()` calls averaged); `higher loop` "
               "(`higher.innerloop_ctx` per task, one param group per tensor and `override={'lr': [...]}` for the "
               "rates, one `autograd.grad` per task); `torchopt loop` (functional `torchopt.sgd` per task, one per "
               "tensor for the rates, `functional_call` + `autograd.grad(create_graph=True)`); `vmap unroll` "
               "(hand-written `torch.func`: `functional_call` + `torch.func.grad` for one task's inner steps, "
               "`torch.func.vmap` over the tasks, one `torch.autograd.grad` of the mean query loss with respect to "
               "θ_0 and the rates).")
    out.append("")
    out.append(f"Method: correctness first: every hypergradient against the mean over the tasks of "
               f"`gimli_bptt.testing.reference_hypergradients` (each task's autograd unroll) in float64 at a small "
               f"size ({'; '.join(f'{p} T={check64_size(p, args)[0]} J={check64_size(p, args)[1]}' for p in args.problems)}; "
               f"tolerance {TOL_F64:g}) and in float32 at each timed size ({TOL_F32:g}), "
               f"and against every other implementation (the largest relative difference is shown); a row outside "
               f"the tolerance is not timed, except a vectorised one exact in float64 whose float32 result is within "
               f"the tolerance of the other vectorised implementation's (gimli tasks and the vmap unroll: torch's "
               f"batched kernels round otherwise than its per-task ones), which is timed and marked. Time: median "
               f"of {args.repeats} runs after one warm-up [min-max], all "
               f"implementations of one size interleaved round-robin in one process. Memory: peak RSS (`VmHWM`, "
               f"reset through `/proc/self/clear_refs` just before the run) minus the RSS before it, in a fresh "
               f"process per row forked from a server that only imported the libraries, after set-up and a J=1 "
               f"warm-up.")
    out.append("")
    for problem in dict.fromkeys(r["problem"] for r in rows):
        out.append(f"### {problem}")
        out.append("")
        out.extend(table(rows, problem))
        out.append("")
    out.append("### Targets")
    out.append("")
    out.extend(targets(rows, args))
    out.append("")
    out.append(f"The 1-min load average went from {log.loads[0]:.1f} to {log.loads[-1]:.1f} (max {max(log.loads):.1f}); "
               f"ratios within one size were measured interleaved and are less affected than absolute times.")
    out.append("")
    return "\n".join(out)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--sin-unrolls", type=int, nargs="+", default=[1, 5, 20], help="sinusoid: values of J")
    p.add_argument("--sin-tasks", type=int, default=25, help="sinusoid: T")
    p.add_argument("--maml-tasks", type=int, nargs="+", default=[4, 16, 32], help="c-maml: values of T")
    p.add_argument("--maml-unroll", type=int, default=5, help="c-maml: J")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row, after one warm-up")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true",
                   help="smoke run (sinusoid J 1 3, T 6; c-maml T 2 4, J 2; 2 repeats); prints only")
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
        args.sin_unrolls, args.sin_tasks, args.maml_tasks, args.maml_unroll, args.repeats = [1, 3], 6, [2, 4], 2, 2
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    out_path = args.out if args.out is not None else (None if args.quick else Path(__file__).parent / "RESULTS.md")
    torch.set_num_threads(args.threads)
    log = benchlib.RunLog()
    print(log.banner(torch.get_num_threads()), flush=True)
    rows = run(args, log)
    section = render(rows, args, command, log)
    benchlib.publish(out_path, SECTION, section)


if __name__ == "__main__":
    main()
