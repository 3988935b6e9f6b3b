# SPDX-License-Identifier: Apache-2.0
"""Measurement helpers shared by ``bench_tasks.py`` and ``bench_modes.py`` (and the writer of every script's section).

Imports run one way: every script (``bench_peers.py`` included) imports this module, and this
module imports no script. It holds:

- the machine and process readings every script shares: :func:`short_error`, :func:`fmt_time`,
  :func:`vm_hwm_mib`, :func:`reset_peak`, :func:`cpu_times`, :func:`cpu_model`, :func:`versions`;

- :class:`RunLog`: the date, the load average after each measured group, the CPU steal over
  the run, and the Markdown header that records the machine and the versions;
- :func:`write_section`: replaces one ``## ...`` section of ``bench/RESULTS.md``, keeping the others;
- :func:`interleaved`: medians-ready wall times, every implementation warmed up once, then
  ``repeats`` round-robin rounds in this process;
- :func:`peak_growth`, :func:`serve` and :class:`ForkServer`: peak-RSS growth of one run in a
  fresh process per row, forked from a server that only imported the libraries (the method of
  ``bench_peers.MemoryServer``, for any script that says how to build a row from a request);
- :func:`cosine`, :func:`fmt_mem`, :func:`fmt_times`.

Usage (from a script in ``bench/``, which Python puts on ``sys.path``)::

    import benchlib
    log = benchlib.RunLog()
    times, errors = benchlib.interleaved({"a": fn_a, "b": fn_b}, repeats=5)
    server = benchlib.ForkServer(__file__, threads=1)      # the script answers ``--zygote``
    mib = server.measure({"row": "a", "J": 20}).get("growth_mib")
"""
from __future__ import annotations

import datetime
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch



# ----------------------------------------------------------------------------- machine and process
def short_error(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return msg[:160] + ("..." if len(msg) > 160 else "")


def fmt_time(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def vm_hwm_mib(key: str = "VmHWM") -> float:
    """Peak RSS (``VmHWM``) or current RSS (``VmRSS``) of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status (Linux only)")


def reset_peak() -> bool:
    """Resets ``VmHWM`` to the current RSS (``echo 5 > /proc/self/clear_refs``); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_times() -> tuple[int, int]:
    """``(steal, total)`` jiffies of all CPUs since boot, from /proc/stat (0, 0 where unreadable)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> str:
    """torch's, gimli_bptt's and the installed peer libraries' versions (read from their metadata, not imported)."""
    import gimli_bptt

    out = [f"torch {torch.__version__}"]
    for name in ("higher", "torchopt"):
        try:
            out.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{name} not installed")
    return ", ".join(out + [f"gimli_bptt {gimli_bptt.__version__}"])


# ----------------------------------------------------------------------------- the run's record
class RunLog:
    """When the run started, the 1-min load average at each :meth:`mark`, and the CPU steal since the start."""

    def __init__(self) -> None:
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.t0 = time.perf_counter()
        self.loads: list[float] = [os.getloadavg()[0]]
        self.steal0 = cpu_times()

    def mark(self) -> float:
        """Records the current 1-min load average and returns it."""
        self.loads.append(os.getloadavg()[0])
        return self.loads[-1]

    def steal(self) -> float:
        """The share of CPU time the hypervisor took since the start (``/proc/stat``; 0 where unreadable)."""
        s1 = cpu_times()
        return (s1[0] - self.steal0[0]) / max(1, s1[1] - self.steal0[1])

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def header(self, command: str, threads: int) -> list[str]:
        """The Markdown lines that say how, when and where the numbers were measured."""
        return [
            f"Command: `{command}`  ",
            f"Date: {self.started:%Y-%m-%d %H:%M} UTC; the whole run took {self.elapsed() / 60:.1f} min  ",
            f"Machine: `{platform.platform()}`, {os.cpu_count()} CPUs (`{cpu_model()}`), shared with other "
            f"processes; Python {platform.python_version()}, `torch.set_num_threads({threads})`  ",
            f"Versions: {versions()}; library source: {library_source()}  ",
            f"1-min load average at the start and after each measured group: "
            f"{', '.join(f'{x:.1f}' for x in self.loads)}; CPU time taken by the hypervisor (steal, /proc/stat) "
            f"during the run: {100 * self.steal():.0f}%",
        ]

    def banner(self, threads: int) -> str:
        """One line for the console at the start."""
        return (f"{versions()}; {threads} threads, {os.cpu_count()} CPUs; "
                f"load {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


def library_source() -> str:
    """The commit of the checkout the library was imported from, and whether its ``gimli_bptt/`` has local changes."""
    import gimli_bptt

    root = Path(gimli_bptt.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "gimli_bptt"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return f"{root} (not a git checkout)"
    if not dirty:
        return f"git {head}"
    return f"git {head} with uncommitted changes to {len(dirty)} files under gimli_bptt/"


def import_optional(name: str) -> tuple[Any, Optional[str]]:
    """``(module, None)``, or ``(None, "ErrorType: message")`` where a benchmark-only peer
    (``pip install -e ".[bench]"``) does not import: its rows then say why instead of a number."""
    try:
        return importlib.import_module(name), None
    except Exception as e:  # noqa: BLE001 - a peer may fail to import in many ways
        return None, f"{type(e).__name__}: {e}"


def publish(out_path: Optional[Path], title: str, section: str) -> None:
    """Prints a rendered section and, with ``out_path``, writes it into that results file (:func:`write_section`)."""
    print()
    print(section)
    if out_path is not None:
        write_section(out_path, title, section)
        print(f"written to {out_path}")


def write_section(path: Path, title: str, section: str) -> None:
    """Replaces the section headed ``title`` (up to the next ``## `` heading) in ``path``, or appends it.

    ``section`` starts with ``title``; every other section of the file is kept as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    pattern = re.compile(re.escape(title) + r"\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    path.write_text(text.rstrip("\n") + "\n")


# ----------------------------------------------------------------------------- time
def interleaved(factories: Mapping[str, Callable[[], Callable[[], Any]]], repeats: int
                ) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Wall times of each implementation, interleaved round-robin in this process.

    ``factories[name]()`` builds the implementation (outside the timed region) and returns the
    no-argument callable that is timed. Each is built and run once as a warm-up; then
    ``repeats`` rounds run every implementation once each, in order, with a ``gc.collect()``
    before each run. Returns ``(times, errors)``: the seconds of every timed run per name, and
    the error of each implementation that raised while being built or warmed up.
    """
    fns: dict[str, Callable[[], Any]] = {}
    errors: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, make in factories.items():
            try:
                fn = make()
                fn()  # warm-up
                fns[name] = fn
            except Exception as e:  # noqa: BLE001
                errors[name] = short_error(e)
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                gc.collect()
                t0 = time.perf_counter()
                out = fn()
                times[name].append(time.perf_counter() - t0)
                del out
    return times, errors


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


# ----------------------------------------------------------------------------- memory (fresh process per row)
def peak_growth(fn: Callable[[], Any]) -> dict[str, Any]:
    """Peak RSS over one call of ``fn`` minus the RSS just before it, in MiB (this process).

    ``VmHWM`` is reset to the current RSS first (:func:`reset_peak`), so an earlier
    peak (a warm-up's) cannot hide this run's; where the kernel refuses the reset, the growth
    is measured from the peak so far (a lower bound) and ``reset`` is False.
    """
    gc.collect()
    reset = reset_peak()
    before = vm_hwm_mib("VmRSS") if reset else vm_hwm_mib()
    out = fn()
    after = vm_hwm_mib()
    del out
    return {"before_mib": before, "after_mib": after, "growth_mib": after - before, "reset": reset}


def serve(measure: Callable[[dict[str, Any]], dict[str, Any]], threads: int,
          preload: Optional[Callable[[], None]] = None) -> None:
    """The server side of :class:`ForkServer`: one forked child per JSON request line on stdin.

    This process only imports the libraries (and runs ``preload``, e.g. an import that every
    row needs); it never runs a benchmark, so each child starts with no allocator cache, no
    autograd state and no lazily initialised kernels of another row. The child runs
    ``measure(request)`` and writes its JSON answer back; a child that dies is reported as an error.
    """
    torch.set_num_threads(threads)
    if preload is not None:
        preload()
    for line in sys.stdin:
        req = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = measure(req)
            except BaseException as e:  # noqa: BLE001
                res = {"error": short_error(e)}
            with os.fdopen(w, "w") as f:
                f.write(json.dumps(res))
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        if not data:
            data = json.dumps({"error": f"child died (exit status {os.waitstatus_to_exitcode(status)})"})
        print(data, flush=True)


def preload_digits() -> None:
    """Imports sklearn's digits loader (``bench_peers.maml_task``'s) once, before the server forks."""
    from sklearn.datasets import load_digits  # noqa: F401


class ForkServer:
    """Runs ``python <script> --zygote --threads N`` once; :meth:`measure` sends it one request per row."""

    def __init__(self, script: str, threads: int, extra: Iterable[str] = ()):
        cmd = [sys.executable, os.path.abspath(script), "--zygote", "--threads", str(threads), *extra]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def measure(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {"error": "memory server died"}

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()

    def __enter__(self) -> "ForkServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------- numbers and formatting
def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The cosine of the angle between two flat vectors, in float64 (nan if either is zero)."""
    a, b = a.detach().reshape(-1).double(), b.detach().reshape(-1).double()
    na, nb = a.norm().item(), b.norm().item()
    if na == 0.0 or nb == 0.0:
        return float("nan")
    return float(a @ b) / (na * nb)


def fmt_times(times: Optional[Sequence[float]]) -> str:
    """``median [min-max]`` of a list of seconds, or ``-``."""
    if not times:
        return "-"
    return f"{fmt_time(median(times))} [{fmt_time(min(times))}-{fmt_time(max(times))}]"


def fmt_mem(mem: Any) -> str:
    """MiB with one decimal, an error string as it is, or ``-``."""
    if mem is None:
        return "-"
    return mem if isinstance(mem, str) else f"{mem:.1f} MiB"


def fmt_err(err: Optional[float]) -> str:
    return "-" if err is None else f"{err:.1e}"


__all__ = ["ForkServer", "RunLog", "cosine", "fmt_err", "fmt_mem", "fmt_time", "fmt_times", "interleaved",
           "library_source",
           "median", "peak_growth", "preload_digits", "serve", "short_error", "write_section"]
