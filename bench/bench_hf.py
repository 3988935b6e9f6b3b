# SPDX-License-Identifier: Apache-2.0
"""gimli_bptt, higher 0.2.1, TorchOpt 0.7.3 and a plain autograd unroll on a tiny HuggingFace GPT-2.

Problem: the two per-group learning rates of ``torch.optim.Adam`` or ``SGD(momentum=0.9)`` on a
random-init GPT-2 from ``transformers`` (2 layers, width 16, 2 heads, vocabulary 32, 16 tokens,
batches of 4 sequences; groups: the first half of the tensors and the rest), after J inner steps
of next-token cross-entropy; meta-objective: the same loss on a validation batch. Float64
throughout, so that the errors measure the method, not float32's rounding.

Rows (each computes d L_val / d lr per group):

- ``gimli``: ``GimliUpdater(...).hypergradient``, with transformers' default attention (``sdpa``);
- ``gimli, eager attention``: the same with ``attn_implementation="eager"`` (math attention);
- ``higher``: ``higher.innerloop_ctx(model, opt, override={"lr": [...]})``, default attention;
- ``higher, eager attention``: the same on the math attention;
- ``TorchOpt``: TorchOpt's functional ``adam``/``sgd`` (``moment_requires_grad=True``) with
  ``functional_call`` and ``autograd.grad(create_graph=True)``, eager attention;
- ``autograd unroll``: the same loop with torch.optim's update written in torch ops
  (``v.sqrt()``), eager attention: what a user who unrolls torch.optim by hand gets;
- ``plain training``: J steps of ``loss.backward(); opt.step()`` (no hypergradient), the floor.

Error: max |hypergradient - fd| / max |fd|, where fd is the central difference of the
validation loss after J steps of real ``torch.optim`` training in each group's lr (step 1e-5 lr,
its own error estimated from the step it halves and printed beside it). A row that raises is
reported with the first line of its error. Time: median [min-max] of ``--repeats`` runs after one
warm-up, the rows interleaved round-robin in this process (``benchlib.interleaved``). Memory: the
growth of the peak RSS over one run (``benchlib.peak_growth``), in a fresh process per row forked
from a server that only imported the libraries (``benchlib.ForkServer``), the model and batches
built before the measured run.

Usage::

    python bench/bench_hf.py                   # writes its section of bench/RESULTS.md
    python bench/bench_hf.py --unroll 2 --repeats 1 --out /tmp/RESULTS.md   # smoke run
"""
from __future__ import annotations

import argparse
import copy
import math
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import benchlib
from gimli_bptt import GimliUpdater

higher, HIGHER_ERR = benchlib.import_optional("higher")  # benchmark-only: pip install -e ".[bench]"
torchopt, TORCHOPT_ERR = benchlib.import_optional("torchopt")

SECTION = "## A HuggingFace GPT-2: gimli, higher and TorchOpt"
D = torch.float64
VOCAB, SEQ, BATCH = 32, 16, 4
LRS = {"adam": (1e-2, 3e-3), "sgd": (0.1, 0.05)}
BETAS, EPS, MOMENTUM = (0.9, 0.999), 1e-8, 0.9
ROWS = ("gimli", "gimli, eager attention", "higher", "higher, eager attention", "TorchOpt", "autograd unroll",
        "plain training")


# ----------------------------------------------------------------------------- the problem
def gpt2(attention: Optional[str]) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    extra = {} if attention is None else {"attn_implementation": attention}
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **extra)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(D).train()


def lm_loss(model: Any, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy of the logits, in float64 (transformers' labels= loss upcasts to float32 only)."""
    logits = model(input_ids=tokens).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def groups(model: nn.Module) -> list[list[nn.Parameter]]:
    params = list(model.parameters())
    return [params[: len(params) // 2], params[len(params) // 2:]]


def make_opt(kind: str, model: nn.Module, lrs: tuple[float, float]) -> torch.optim.Optimizer:
    param_groups = [{"params": g, "lr": lr} for g, lr in zip(groups(model), lrs)]
    if kind == "adam":
        return torch.optim.Adam(param_groups, betas=BETAS, eps=EPS)
    return torch.optim.SGD(param_groups, momentum=MOMENTUM)


def data(J: int) -> tuple[list[Tensor], Tensor]:
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(J + 1)]
    return batches[:J], batches[J]


def torch_val_loss(kind: str, model: nn.Module, batches: list[Tensor], val: Tensor, lrs: tuple[float, float]) -> float:
    """The validation loss after real torch.optim training (the finite differences' function)."""
    m = copy.deepcopy(model)
    opt = make_opt(kind, m, lrs)
    for tokens in batches:
        opt.zero_grad()
        lm_loss(m, tokens).backward()
        opt.step()
    with torch.no_grad():
        return float(lm_loss(m, val))


def finite_differences(kind: str, model: nn.Module, batches: list[Tensor], val: Tensor) -> tuple[Tensor, float]:
    """Central differences in each group's lr, and their error estimated from the step they halve."""
    base = LRS[kind]
    out, err = [], 0.0
    for k in range(2):
        def f(v: float) -> float:
            lrs = list(base)
            lrs[k] = v
            return torch_val_loss(kind, model, batches, val, (lrs[0], lrs[1]))

        h = 1e-5 * base[k]  # truncation ~(h/lr)^2, round-off 1e-16 |L| / h: both near 1e-9 relative
        d = [(f(base[k] + s) - f(base[k] - s)) / (2 * s) for s in (h, h / 2)]
        out.append(d[1])
        err = max(err, abs(d[1] - d[0]) / 3)
    fd = torch.tensor(out, dtype=D)
    return fd, err / float(fd.abs().max())


# ----------------------------------------------------------------------------- the rows
def lr_leaves(kind: str) -> list[Tensor]:
    return [torch.tensor(lr, dtype=D, requires_grad=True) for lr in LRS[kind]]


def run_gimli(kind: str, model: nn.Module, batches: list[Tensor], val: Tensor) -> Callable[[], Tensor]:
    updater = GimliUpdater(model, make_opt(kind, model, LRS[kind]), lm_loss, lm_loss, unroll=len(batches),
                           learn={"lr": "group"}, progress=False)
    return lambda: updater.hypergradient(batches, val).hypergrads["lr"].detach()


def run_higher(kind: str, model: nn.Module, batches: list[Tensor], val: Tensor) -> Callable[[], Tensor]:
    if higher is None:
        raise RuntimeError(f"higher not importable: {HIGHER_ERR}")

    def fn() -> Tensor:
        lrs = lr_leaves(kind)
        opt = make_opt(kind, model, LRS[kind])
        with higher.innerloop_ctx(model, opt, copy_initial_weights=True, override={"lr": lrs}) as (fm, dopt):
            for tokens in batches:
                dopt.step(lm_loss(fm, tokens))
            L = lm_loss(fm, val)
            return torch.stack(torch.autograd.grad(L, lrs))
    return fn


def _unroll(kind: str, model: nn.Module, batches: list[Tensor], val: Tensor,
            update: Callable[[list[Tensor], tuple[Tensor, ...], list[Any], list[Tensor], int], list[Tensor]],
            state: list[Any]) -> Tensor:
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    lrs = lr_leaves(kind)

    def call(ps: list[Tensor]) -> Callable[..., Any]:
        return lambda **kw: torch.func.functional_call(model, dict(zip(names, ps)), (), kw)

    for t, tokens in enumerate(batches, start=1):
        grads = torch.autograd.grad(lm_loss(call(params), tokens), params, create_graph=True)
        params = update(params, grads, state, lrs, t)
    return torch.stack(torch.autograd.grad(lm_loss(call(params), val), lrs))


def run_torchopt(kind: str, model: nn.Module, batches: list[Tensor], val: Tensor) -> Callable[[], Tensor]:
    if torchopt is None:
        raise RuntimeError(f"torchopt not importable: {TORCHOPT_ERR}")
    index = [[i for i, p in enumerate(model.parameters()) if any(p is q for q in g)] for g in groups(model)]

    def update(params: list[Tensor], grads: tuple[Tensor, ...], state: list[Any], lrs: list[Tensor],
               t: int) -> list[Tensor]:
        if not state:
            for k, idx in enumerate(index):
                o = (torchopt.adam(lr=lrs[k], betas=BETAS, eps=EPS, moment_requires_grad=True) if kind == "adam"
                     else torchopt.sgd(lr=lrs[k], momentum=MOMENTUM, moment_requires_grad=True))
                state.append([o, o.init(tuple(params[i] for i in idx))])
        new = list(params)
        for (o, s), idx, entry in zip(state, index, state):
            upd, entry[1] = o.update(tuple(grads[i] for i in idx), s, inplace=False)
            for i, p in zip(idx, torchopt.apply_updates(tuple(params[i] for i in idx), upd, inplace=False)):
                new[i] = p
        return new

    return lambda: _unroll(kind, model, batches, val, update, [])


def run_autograd(kind: str, model: nn.Module, batches: list[Tensor], val: Tensor) -> Callable[[], Tensor]:
    group_of = [k for k, g in enumerate(groups(model)) for _ in g]
    b1, b2 = BETAS

    def update(params: list[Tensor], grads: tuple[Tensor, ...], state: list[Any], lrs: list[Tensor],
               t: int) -> list[Tensor]:
        if not state:
            state.extend([None] * len(params))
        new = []
        for i, (p, g) in enumerate(zip(params, grads)):
            lr = lrs[group_of[i]]
            if kind == "adam":  # torch.optim.Adam's for-loop update, in torch ops
                m, v = state[i] if state[i] is not None else (torch.zeros_like(p), torch.zeros_like(p))
                m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
                state[i] = (m, v)
                new.append(p - lr / (1 - b1**t) * m / (v.sqrt() / math.sqrt(1 - b2**t) + EPS))
            else:
                buf = g if state[i] is None else MOMENTUM * state[i] + g
                state[i] = buf
                new.append(p - lr * buf)
        return new

    return lambda: _unroll(kind, model, batches, val, update, [])


def run_floor(kind: str, model: nn.Module, batches: list[Tensor], val: Tensor) -> Callable[[], None]:
    def fn() -> None:
        twin = copy.deepcopy(model)
        opt = make_opt(kind, twin, LRS[kind])
        for tokens in batches:
            opt.zero_grad(set_to_none=True)
            lm_loss(twin, tokens).backward()
            opt.step()
    return fn


RUNNERS: dict[str, tuple[Callable[..., Callable[[], Any]], Optional[str]]] = {
    "gimli": (run_gimli, None), "gimli, eager attention": (run_gimli, "eager"), "higher": (run_higher, None),
    "higher, eager attention": (run_higher, "eager"), "TorchOpt": (run_torchopt, "eager"),
    "autograd unroll": (run_autograd, "eager"), "plain training": (run_floor, "eager"),
}


# ----------------------------------------------------------------------------- the run
def measure_memory(req: dict[str, Any]) -> dict[str, Any]:
    """The fork server's answer: the peak RSS growth of one run of one row (``--zygote``)."""
    batches, val = data(req["J"])
    build, attention = RUNNERS[req["row"]]
    fn = build(req["kind"], gpt2(attention), batches, val)
    return benchlib.peak_growth(fn)


def preload() -> None:
    """transformers' GPT-2 imported (and one model built) before the server forks."""
    gpt2("eager")


def measure(kind: str, J: int, repeats: int, server: benchlib.ForkServer) -> list[dict[str, Any]]:
    batches, val = data(J)
    fd, fd_err = finite_differences(kind, gpt2("eager"), batches, val)
    rows: list[dict[str, Any]] = []
    factories: dict[str, Callable[[], Callable[[], Any]]] = {}
    for name in ROWS:
        build, attention = RUNNERS[name]
        row: dict[str, Any] = {"row": name}
        rows.append(row)
        try:
            model = gpt2(attention)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn = build(kind, model, batches, val)
                out = fn()
        except Exception as e:  # noqa: BLE001 - recorded in the table
            row["error"] = benchlib.short_error(e).splitlines()[0]
            continue
        if out is not None:
            if not torch.isfinite(out).all():
                row["result"] = f"non-finite hypergradient: {out.tolist()}"
            else:
                row["err"] = float((out - fd).abs().max() / fd.abs().max())
        factories[name] = (lambda fn=fn: fn)
        mem = server.measure({"kind": kind, "J": J, "row": name})
        row["mem"] = mem.get("growth_mib", mem.get("error"))
    times, errors = benchlib.interleaved(factories, repeats=repeats)
    for row in rows:
        row["times"] = times.get(row["row"])
        if row["row"] in errors:
            row["error"] = errors[row["row"]]
    rows.append({"row": "finite differences", "err": fd_err})
    return rows


def table(kind: str, J: int, rows: list[dict[str, Any]]) -> list[str]:
    lines = [f"### {'Adam' if kind == 'adam' else 'SGD(momentum=0.9)'}, J = {J}, lr = {LRS[kind]}", "",
             "| implementation | error against finite differences | time | peak RSS growth |", "|---|---|---|---|"]
    for r in rows:
        if r["row"] == "finite differences":
            lines.append(f"| (the finite differences' own error, estimated) | {benchlib.fmt_err(r['err'])} | - | - |")
        elif "error" in r:
            lines.append(f"| {r['row']} | raises `{r['error'][:160]}` | - | - |")
        else:
            result = r.get("result") or ("- (no hypergradient)" if "err" not in r else benchlib.fmt_err(r["err"]))
            lines.append(f"| {r['row']} | {result} | {benchlib.fmt_times(r.get('times'))} | "
                         f"{benchlib.fmt_mem(r.get('mem'))} |")
    return lines + [""]


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--unroll", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--optimizers", nargs="+", default=["adam", "sgd"], choices=["adam", "sgd"])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    ap.add_argument("--zygote", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.zygote:
        benchlib.serve(measure_memory, args.threads, preload)
        return
    torch.set_num_threads(args.threads)
    log = benchlib.RunLog()
    print(log.banner(args.threads), flush=True)
    body = []
    with benchlib.ForkServer(__file__, args.threads) as server:
        for kind in args.optimizers:
            rows = measure(kind, args.unroll, args.repeats, server)
            log.mark()
            body += table(kind, args.unroll, rows)
            print("\n".join(table(kind, args.unroll, rows)), flush=True)
    command = "python bench/bench_hf.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    section = [SECTION, "", *log.header(command.strip(), args.threads), "",
               "A random-init GPT-2 from `transformers` (2 layers, width 16, 2 heads, vocabulary 32, 16 tokens, "
               "batches of 4), float64; the hypergradient of the validation loss with respect to the two "
               "per-group learning rates, against central differences of real `torch.optim` training (see "
               "`bench/bench_hf.py`'s docstring for each row). Rows without `eager` run transformers' default "
               "attention (`sdpa`).", "", *body]
    benchlib.write_section(args.out, SECTION, "\n".join(section))


if __name__ == "__main__":
    main()
