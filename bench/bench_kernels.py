# SPDX-License-Identifier: Apache-2.0
"""Fused kernels vs the pure path: op throughput from 1e3 to 1e7 elements, and GimliUpdater.step() on 122-tensor models.

Run: ``python bench/bench_kernels.py [--quick] [--model-only] [--widths 16 128]``. Times are medians of interleaved repeats in
one process (``torch.utils.benchmark.Timer.blocked_autorange``); the machine load is printed,
since shared machines make absolute times noisy. The op throughput runs in a child process with
glibc's heap trimming off (see main()); the end-to-end part with the defaults. Not collected by pytest.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from torch import nn
from torch.utils.benchmark import Timer

from gimli_bptt import GimliUpdater, Memory, kernels
from gimli_bptt.kernels import _reference as ref
from gimli_bptt.optim import ADAM
from gimli_bptt.stepping import step_all, step_vjp_all


def _t(fn, min_run_time: float) -> float:
    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def op_throughput(sizes: list[int], min_run_time: float) -> list[tuple]:
    """Each op on one segment of n float32 elements, fused vs twin, in the common case of the sweep:
    a momentum buffer / Adam moments and their carried cotangents present, the lr learned (its
    per-segment sum). Bytes moved per element: inputs + outputs, 4 bytes each."""
    rows = []
    for n in sizes:
        g = torch.Generator().manual_seed(0)
        theta, G, m, tb, cm, cv, buf, cb = (torch.randn(n, generator=g) for _ in range(8))
        v = torch.rand(n, generator=g)
        off = torch.tensor([0, n])
        adam_h = [torch.tensor([x], dtype=torch.float64) for x in (1e-3, 0.9, 0.999, 1e-8, 0.0)]
        sgd_h = [torch.tensor([x], dtype=torch.float64) for x in (0.05, 0.9, 0.0, 0.0)]
        cases = (  # (op, args, elements read + written)
            ("sgd_step", (theta, G, buf, off, sgd_h, 0, False, False, True, False), 5),
            ("sgd_step_vjp", (theta, G, buf, tb, cb, off, sgd_h, 0, 1, False, False, True, False), 8),
            ("adam_step", (theta, G, m, v, None, off, adam_h, 0, 3.0, False, False, False, False), 7),
            ("adam_step_vjp", (theta, G, m, v, None, tb, cm, cv, None, off, adam_h, 0, 1, 3.0, False, False, False,
                               False), 11),
        )
        for name, args, elems in cases:
            fused = getattr(torch.ops.gimli, name)
            twin = getattr(ref, name)
            tf = _t(lambda: fused(*args), min_run_time)
            tr = _t(lambda: twin(*args), min_run_time)
            rows.append((name, n, tf, tr))
            print(f"{name:14s} n={n:>9,d}  fused {tf * 1e6:10.1f} us  pure twin {tr * 1e6:10.1f} us  "
                  f"speed-up {tr / tf:5.1f}x  fused {4 * n * elems / tf / 1e9:6.2f} GB/s", flush=True)
    return rows


def model_bench(repeats: int, layers: int = 60, width: int = 16, unroll: int = 5, batch: int = 32
                ) -> dict[str, list[float]]:
    """``GimliUpdater.step()`` on ``layers`` x ``Linear(width, width)`` + tanh and a head, per path.

    ``width`` sets how much of a step the optimizer is: at 16 (16k parameters in 122 tensors) the
    autograd work on ~120 tiny ops per pass dominates; at 128 (1M parameters, same tensor count)
    the element-wise optimizer work does.
    """
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.Tanh())], nn.Linear(width, 1))
    n_tensors = len(list(model.parameters()))
    batches = [(torch.randn(batch, width), torch.randn(batch, 1)) for _ in range(unroll + 1)]
    loss = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    ups = {}
    for keep in (False, True):  # the default full tape, and keep_graphs=True (no recomputation in the sweep)
        for mode in ("loop", "reference", "fused"):
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            ups[mode + (" keep_graphs" if keep else "")] = GimliUpdater(
                model, opt, loss, loss, unroll=unroll, learn={"lr": "group"}, kernels=mode, memory=Memory(keep_graphs=keep),
                meta_opt=lambda p: torch.optim.SGD(p, lr=0.0))
    print(f"model: {layers} x Linear({width},{width}) + tanh, {n_tensors} parameter tensors, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, batch {batch}; Adam, learn lr per group, "
          f"unroll {unroll}")
    # the optimizer alone: step_all + step_vjp_all over the model's tensors
    params = [p.detach().clone() for p in model.parameters()]
    G = [torch.randn_like(p) for p in params]
    hyper = [dict(ADAM.read_hyper(opt.param_groups[0]), lr=torch.tensor(1e-3)) for _ in params]
    state = [ADAM.import_state({}, p, hyper[0]) for p in params]
    times: dict[str, list[float]] = {f"step() {k}": [] for k in ups}
    times.update({f"optimizer {k}": [] for k in ("loop", "reference", "fused")})

    def opt_only(mode: str) -> None:
        with torch.no_grad():
            th, st = step_all(ADAM, params, G, state, hyper, mode)
            step_vjp_all(ADAM, th, G, st, hyper, G, st, mode)  # carried cotangents present, as in the sweep

    for name, up in ups.items():  # warm-up
        up.step(batches[:unroll], batches[unroll])
        opt_only(up.options.kernels)
    for _ in range(repeats):
        for name, up in ups.items():
            t0 = time.perf_counter()
            up.step(batches[:unroll], batches[unroll])
            times[f"step() {name}"].append(time.perf_counter() - t0)
            if name in ("loop", "reference", "fused"):
                t0 = time.perf_counter()
                for _ in range(10):
                    opt_only(name)
                times[f"optimizer {name}"].append((time.perf_counter() - t0) / 10)
    for k, v in times.items():
        print(f"{k:22s} median {statistics.median(v) * 1e3:8.2f} ms  [{min(v) * 1e3:.2f}-{max(v) * 1e3:.2f}]", flush=True)
    for what, suffix in (("step()", ""), ("step()", " keep_graphs"), ("optimizer", "")):
        fused = statistics.median(times[f"{what} fused{suffix}"])
        for base, label in (("loop", "the per-tensor loop"), ("reference", "the pure twin")):
            ratio = statistics.median(times[f"{what} {base}{suffix}"]) / fused
            print(f"{what}{suffix} speed-up of fused over {label}: {ratio:.2f}x")
    return times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model-only", action="store_true", help="only the end-to-end GimliUpdater.step() part")
    p.add_argument("--ops-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--widths", type=int, nargs="+", default=[16, 128],
                   help="layer widths of the end-to-end model (60 layers, 122 tensors each)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    assert kernels.is_available("cpu"), "CPU kernels unavailable"
    if a.ops_child:
        op_throughput([10**3, 10**4, 10**5, 10**6] + ([] if a.quick else [10**7]), 0.2 if a.quick else 0.5)
        return
    print(f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads {a.threads}, "
          f"load average {os.getloadavg()[0]:.1f}")
    if not a.model_only:
        # The ops' own throughput: in a child process where glibc neither trims its heap nor maps
        # large blocks afresh, so the fresh outputs of back-to-back calls reuse resident pages
        # (as torch's caching allocator does on a GPU). With glibc's defaults, 4-40 MB outputs are
        # handed back to the kernel between calls and every call pays first-touch page faults,
        # which measures the operating system: the end-to-end part below runs with the defaults.
        env = dict(os.environ, MALLOC_TRIM_THRESHOLD_=str(2**40), MALLOC_MMAP_THRESHOLD_=str(2**30))
        print("op throughput (child process, MALLOC_TRIM_THRESHOLD_ and MALLOC_MMAP_THRESHOLD_ raised):", flush=True)
        subprocess.run([sys.executable, __file__, "--ops-child", "--threads", str(a.threads)] + (["--quick"] if a.quick else []),
                       env=env, check=True)
    for width in a.widths:
        model_bench(5 if a.quick else 15, width=width)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
