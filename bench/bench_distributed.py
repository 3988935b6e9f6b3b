# SPDX-License-Identifier: Apache-2.0
"""Data-parallel meta-updates: time per meta step with 1 and 2 gloo ranks on the same global batch.

Both configurations run as ranks of a gloo process group on loopback (1 rank: no
communication at all), started by fork from this script, one after the other and alternating
rounds. Each rank holds 1/world of every batch. Usage::

    python bench/bench_distributed.py                        # J = 10, MLP 64-256-256-10, batch 256
    python bench/bench_distributed.py --repeats 3 --rounds 1 --out bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import gimli_bptt.distributed as gd  # noqa: E402
from gimli_bptt import GimliUpdater  # noqa: E402

import benchlib

SECTION = "## Distributed meta-updates"


def _loss(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _problem(args: argparse.Namespace) -> tuple[nn.Module, list[Any], Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, args.hidden), nn.Tanh(), nn.Linear(args.hidden, args.hidden), nn.Tanh(),
                          nn.Linear(args.hidden, 10))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch, 64, generator=g), torch.randint(0, 10, (args.batch,), generator=g))
               for _ in range(args.unroll + 1)]
    return model, batches[:-1], batches[-1]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    comm = [0.0]
    real = gd.Reducer._all_reduce

    def timed(self: Any, buf: torch.Tensor, what: str, op: Any = None) -> None:
        t = time.perf_counter()
        real(self, buf, what, op)
        comm[0] += time.perf_counter() - t

    gd.Reducer._all_reduce = timed  # type: ignore[method-assign]
    model, batches, val = _problem(args)
    shard = lambda b: tuple(t.chunk(world)[rank] for t in b)  # noqa: E731
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()},
                           {"params": model[4].parameters()}], lr=0.02, momentum=0.9)
    u = GimliUpdater(model, opt, _loss, _loss, unroll=args.unroll, learn={"lr": "group"}, hvp=args.hvp,
                     meta_opt=functools.partial(torch.optim.SGD, lr=0.0), progress=False)
    my_batches, my_val = [shard(b) for b in batches], shard(val)
    first = u.hypergradient(my_batches, my_val).hypergrads["lr"].clone()  # warm-up, and the numbers to compare
    times, comms = [], []
    for _ in range(args.repeats):
        dist.barrier()
        comm[0] = 0.0
        t = time.perf_counter()
        u.step(my_batches, my_val)  # meta lr 0: every repeat is the same meta step
        times.append(time.perf_counter() - t)
        comms.append(comm[0])
    if rank == 0:
        queue.put({"world": world, "times": times, "comm": comms, "hypergrad": first.tolist()})
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace) -> dict[int, dict[str, Any]]:
    ctx = mp.get_context("fork")
    results: dict[int, dict[str, Any]] = {}
    for _ in range(args.rounds):
        for world in (1, 2):
            queue = ctx.SimpleQueue()
            mp.start_processes(_worker, args=(world, _free_port(), args, queue), nprocs=world, start_method="fork")
            r = queue.get()
            acc = results.setdefault(world, {"times": [], "comm": [], "hypergrad": r["hypergrad"]})
            acc["times"] += r["times"]
            acc["comm"] += r["comm"]
            print(f"world {world}: median {statistics.median(r['times']) * 1e3:.0f} ms", flush=True)
    return results


def _ms(x: float) -> str:
    return f"{x * 1e3:.0f} ms"


def table(results: dict[int, dict[str, Any]], args: argparse.Namespace) -> str:
    one = statistics.median(results[1]["times"])
    ref = torch.tensor(results[1]["hypergrad"])
    lines = ["| ranks | batch per rank | median time per meta step [min-max] | of which all-reduce (median) "
             "| speed-up vs 1 rank | hypergradient rel. diff vs 1 rank (float32) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for world in (1, 2):
        r = results[world]
        med = statistics.median(r["times"])
        diff = ((torch.tensor(r["hypergrad"]) - ref).abs().max() / ref.abs().max()).item()
        lines.append(f"| {world} | {args.batch // world} | {_ms(med)} [{_ms(min(r['times']))}-{_ms(max(r['times']))}] "
                     f"| {_ms(statistics.median(r['comm']))} | {one / med:.2f}x | "
                     f"{'reference' if world == 1 else f'{diff:.1e}'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--unroll", type=int, default=10)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=256, help="global batch (split over the ranks)")
    p.add_argument("--hvp", default="rev")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--repeats", type=int, default=7, help="timed meta steps per round")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of 1 rank, 2 ranks")
    p.add_argument("--out", default=None, help="write the section into this Markdown file (replacing its own)")
    args = p.parse_args()
    load0 = os.getloadavg()[0]
    start = time.time()
    results = run(args)
    load1 = os.getloadavg()[0]
    text = table(results, args)
    print(text)
    if args.out:
        argv = " ".join(a for a in sys.argv[1:])
        benchlib.write_section(
            Path(args.out), SECTION,
            f"{SECTION}\n\n"
            f"Command: `python bench/bench_distributed.py {argv}`  \n"
            f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; the run took "
            f"{time.time() - start:.0f} s  \n"
            f"Machine: `{platform.platform()}`, {os.cpu_count()} CPUs, torch {torch.__version__}, gloo on "
            f"loopback, {args.threads} torch thread(s) per rank; 1-min load average {load0:.1f} at the start, "
            f"{load1:.1f} at the end (other processes share the machine).  \n"
            f"Problem: MLP 64-{args.hidden}-{args.hidden}-10 (tanh, float32), cross-entropy, global batch "
            f"{args.batch} split evenly over the ranks, J = {args.unroll}, SGD(momentum=0.9) with 3 learned "
            f"per-group learning rates, hvp='{args.hvp}'. Time: one `step()` (meta lr 0, so every repeat is the "
            f"same step), median of {args.repeats * args.rounds} ({args.rounds} alternating rounds of "
            f"{args.repeats}) after a warm-up, measured on rank 0 after a barrier; all-reduce time is the time "
            f"rank 0 spent inside the collectives (waiting for the other rank included).\n\n{text}\n\n"
            f"The machine has {os.cpu_count()} cores shared by both ranks and by other processes: this measures "
            f"the overhead of the communication and the per-rank work on half the batch, not a scaling result. "
            f"On separate machines or GPUs each rank has its own device. NCCL on GPU runs the same code path; "
            f"it is not yet measured.\n")


if __name__ == "__main__":
    main()
