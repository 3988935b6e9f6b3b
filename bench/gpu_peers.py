# SPDX-License-Identifier: Apache-2.0
"""Side by side on a GPU: gimli_bptt, higher, TorchOpt and the torch.func unroll on bench_peers' problems.

Run: ``python bench/gpu_peers.py [--device cuda] [--unroll 50] [--repeats 5] [--out FILE]`` (also the
last part of ``GIMLI_GPU_PEERS=1 bash bench/gpu_check.sh``). The problems, implementations and
losses are ``bench_peers.py``'s, moved to ``--device``; each hypergradient is first compared with
the torch.func unroll's on the same device (float32; for Adam, higher and TorchOpt implement a
different update, so their rows are marked, as in bench_peers). Then, interleaved round-robin in
one process: the median of ``--repeats`` timed runs after two warm-ups, each bracketed by
``torch.cuda.synchronize()``; the peak of ``torch.cuda.max_memory_allocated`` over one run above
what was allocated before it; and the host-device synchronisations of one run, counted with
``torch.cuda.set_sync_debug_mode("warn")`` (each blocks the CPU until the GPU catches up).

``--device cpu`` runs the same code on the CPU (timings there are ``bench_peers.py``'s job; this
is how the script itself is tested without a GPU). Not collected by pytest.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_peers as peers  # noqa: E402

IMPLS = ("gimli rev", "gimli keep_graphs", "gimli rev no-kernels", "higher", "torchopt", "torch.func unroll")


def to_device(P: peers.Problem, device: torch.device) -> peers.Problem:
    """Moves a problem's model, batches and loss meta-parameters to ``device`` (in place)."""
    P.model.to(device)
    P.batches = [(x.to(device), y.to(device)) for x, y in P.batches]
    P.val = tuple(t.to(device) for t in P.val)
    if P.wd is not None:
        P.wd = P.wd.detach().to(device).requires_grad_(True)
    return P


def runner(P: peers.Problem, impl: str) -> Callable[[], Any]:
    if impl.startswith("gimli"):
        return peers.run_gimli(P, impl)
    if impl == "higher":
        return peers.run_higher(P)
    if impl == "torchopt":
        return peers.run_torchopt(P, False)
    return peers.run_func(P)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_syncs(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Host-device synchronisations during one call (None off CUDA)."""
    if device.type != "cuda":
        return None
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def run_problem(name: str, J: int, repeats: int, device: torch.device, hidden: int, batch: int) -> list[dict[str, Any]]:
    J = 5 if name == "c-maml" else J
    P = to_device(peers.Problem(name, J, torch.float32, hidden, batch), device)
    rows: dict[str, dict[str, Any]] = {}
    fns: dict[str, Callable[[], Any]] = {}
    for impl in IMPLS:
        row: dict[str, Any] = {"problem": name, "J": J, "impl": impl, "times": []}
        rows[impl] = row
        try:
            fns[impl] = runner(P, impl)
            for _ in range(2):
                out = fns[impl]()
            sync(device)
            row["hg"] = out[0].detach().double().cpu()
            row["theta"] = None if out[1] is None else torch.cat([t.reshape(-1) for t in out[1]]).double().cpu()
        except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not dropped
            row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            fns.pop(impl, None)
            traceback.print_exc(limit=2)
    ref = rows["torch.func unroll"]
    for impl, row in rows.items():
        if "status" in row:
            continue
        if "hg" in ref:
            row["rel_err"] = (row["hg"] - ref["hg"]).abs().max().item() / max(ref["hg"].abs().max().item(), 1e-30)
            if row.get("theta") is not None and ref.get("theta") is not None:
                dtheta = (row["theta"] - ref["theta"]).abs().max().item() / max(ref["theta"].abs().max().item(), 1e-30)
                if dtheta > 1e-4:
                    row["status"] = f"different optimizer (θ_J differs by {dtheta:.1e})"
        row.setdefault("status", "ok" if row.get("rel_err", 1.0) < 1e-3 else f"MISMATCH ({row.get('rel_err'):.1e})")
        row["syncs"] = count_syncs(fns[impl], device)
        row["peak"] = peak_bytes(fns[impl], device)
    for _ in range(repeats):
        for impl, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            rows[impl]["times"].append(time.perf_counter() - t0)
    out = []
    for row in rows.values():
        row["median"] = statistics.median(row["times"]) if row["times"] else None
        out.append(row)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| problem | J | implementation | median time [min-max] | vs fastest peer | peak GPU memory | host syncs per run | rel. err vs unroll | status |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for problem in dict.fromkeys(r["problem"] for r in rows):
        rs = [r for r in rows if r["problem"] == problem]
        peer = [r["median"] for r in rs if not r["impl"].startswith("gimli") and r["median"] is not None]
        best = min(peer) if peer else None
        for r in rs:
            if r["median"] is None:
                lines.append(f"| {problem} | {r['J']} | {r['impl']} | - | - | - | - | - | {r['status']} |")
                continue
            t = f"{r['median'] * 1e3:.1f} ms [{min(r['times']) * 1e3:.1f}-{max(r['times']) * 1e3:.1f}]"
            ratio = f"{r['median'] / best:.2f}x" if best else "-"
            peak = "-" if r["peak"] is None else f"{r['peak'] / 2**20:.1f} MiB"
            syncs = "-" if r["syncs"] is None else str(r["syncs"])
            err = f"{r['rel_err']:.1e}" if "rel_err" in r else "-"
            lines.append(f"| {problem} | {r['J']} | {r['impl']} | {t} | {ratio} | {peak} | {syncs} | {err} | {r['status']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--problems", nargs="+", default=list(peers.PROBLEMS), choices=peers.PROBLEMS)
    p.add_argument("--unroll", type=int, default=50, help="J (c-maml: always 5)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", type=Path, default=None, help="also write the Markdown table here")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no GPU visible to torch (use --device cpu to run the script itself on the CPU)")
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    from gimli_bptt import kernels

    head = (f"Command: `python bench/gpu_peers.py --device {a.device} --unroll {a.unroll} --repeats {a.repeats}`  \n"
            f"Device: {what}; torch {torch.__version__}, fused kernels on {device.type}: "
            f"{kernels.is_available(device)}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    rows: list[dict[str, Any]] = []
    for name in a.problems:
        rows += run_problem(name, a.unroll, a.repeats, device, a.hidden, a.batch)
        print(f"{name} done", flush=True)
    text = head + "\n\n" + table(rows) + "\n"
    print(text)
    if a.out is not None:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
