# SPDX-License-Identifier: Apache-2.0
"""How fast Algorithm 1 can be on bench_peers' a-sgd problem with no orchestration at all.

A hand-inlined ``keep_graphs`` hypergradient of the 3 per-group learning rates of SGD(momentum=0.9)
that keeps θ, G, the momentum buffer and their cotangents as single flat buffers ("flat leaves":
the model's per-tensor parameters are views taken inside the autograd graph, so G_j and H·Ḡ come
back flat), calls the fused ops directly and accumulates the lr cotangents with one
``index_add_``: no bucket plan, no gathers, no per-tensor views or dicts, no tape bookkeeping, no
checks. It is not library code (it handles exactly this problem) but the floor that a
flat-all-the-way redesign of the tape and the sweep could reach. It checks its hypergradient
against gimli's, then times it next to ``gimli default`` (no option set), ``gimli keep_graphs`` and the
torch.func unroll, each as a ratio to the floor::

    python bench/orchestration_floor.py [--unroll 50] [--repeats 12]
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import bench_peers as peers  # noqa: E402

from gimli_bptt.functional import ModuleSlots  # noqa: E402
from gimli_bptt.kernels import ops  # noqa: E402


def lean_hypergradient(P: peers.Problem):
    """The a-sgd hypergradient of the per-group lrs, flat all the way (see the module docstring)."""
    model = P.model
    names = [n for n, _ in model.named_parameters()]
    templates = [p.detach() for p in model.parameters()]
    offsets = torch.tensor([0] + list(itertools.accumulate(p.numel() for p in templates)))
    slots = ModuleSlots(model)
    unflatten = torch._C._nn.unflatten_dense_tensors
    step_op, vjp_op = torch.ops.gimli.sgd_step, torch.ops.gimli.sgd_step_vjp
    group_of = torch.tensor([g for g, idx in enumerate(P.groups) for _ in idx])
    lr = torch.tensor([P.lrs[g] for g in group_of.tolist()], dtype=torch.float64)
    momentum = torch.full_like(lr, peers.MOMENTUM)
    zero = torch.zeros_like(lr)
    hyper = [lr, momentum, zero, zero]

    def loss_at(leaf: torch.Tensor, batch) -> torch.Tensor:
        x, y = batch
        out = slots.call(model, dict(zip(names, unflatten(leaf, templates))), {}, (x,), {})
        return F.cross_entropy(out, y)

    def run() -> torch.Tensor:
        theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        buf = None
        tape = []
        for batch in P.batches:  # [Alg.1 L4-7], keeping each step's graph
            leaf = theta.detach().requires_grad_(True)
            with torch.enable_grad():
                (G,) = torch.autograd.grad(loss_at(leaf, batch), leaf, create_graph=True)
            G_value = G.detach()
            theta_next, buf_next = step_op(theta, G_value, buf, offsets, hyper, 0, False, False, True, False)
            tape.append((theta, G_value, buf, leaf, G))
            theta, buf = theta_next, buf_next
        leaf = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            (theta_bar,) = torch.autograd.grad(loss_at(leaf, P.val), leaf)  # [Alg.1 L9]
        buf_bar = None
        A = torch.zeros(len(P.lrs), dtype=torch.float64)
        for theta, G_value, buf, leaf, G in reversed(tape):  # [Alg.1 L10-15]
            tb, gb, bb, hyper_bar = vjp_op(theta, G_value, buf, theta_bar, buf_bar, offsets, hyper, 0, 1, False,
                                           False, True, False)
            A.index_add_(0, group_of, hyper_bar[0])
            (h,) = torch.autograd.grad(G, leaf, gb)
            theta_bar = tb + h
            buf_bar = bb if buf is not None else None
        return A

    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--unroll", type=int, default=50)
    p.add_argument("--repeats", type=int, default=12)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    assert ops.load(), "the compiled kernels are needed"
    P = peers.Problem("a-sgd", a.unroll, torch.float32, 128, 64)
    fns = {"orchestration floor": lean_hypergradient(P), "gimli default": peers.run_gimli(P, "gimli default"),
           "gimli keep_graphs": peers.run_gimli(P, "gimli keep_graphs"), "torch.func unroll": peers.run_func(P)}
    lean, ours = fns["orchestration floor"]().float(), fns["gimli keep_graphs"]()[0]
    err = float((lean - ours).abs().max() / ours.abs().max())
    print(f"hypergradient: floor {lean.tolist()}, gimli {ours.tolist()} (rel. diff {err:.1e})")
    assert err < 1e-5, "the floor computes something else"
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(a.repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    print(f"a-sgd, J={a.unroll}, {a.repeats} interleaved runs:")
    floor = statistics.median(times["orchestration floor"])
    for k, v in times.items():
        print(f"  {k:20s} median {statistics.median(v) * 1e3:7.1f} ms  min {min(v) * 1e3:7.1f} ms  "
              f"{statistics.median(v) / floor:.2f}x the floor")


if __name__ == "__main__":
    main()
