# SPDX-License-Identifier: Apache-2.0
"""The benchmark scripts that need no peer library (or, as bench_hf.py, report an absent one as a row) still
run against the library as it is, and each
replaces its own section of a results file (the other sections kept). Tiny sizes: this checks that
they work, not what they measure (benchmarks are not tests)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OTHER = "## Some other benchmark\n\nIts table, kept as it is.\n"

SCRIPTS = {
    "bench_checkpoint.py": ("## Long unrolls: full tape vs binomial checkpointing",
                            ["--unrolls", "10", "--slots", "3", "--hidden", "16", "--batch", "8"]),
    "bench_clean.py": ("## Data hyper-cleaning: gimli against an autograd unroll through J = 100 to 1000s", ["--quick"]),
    "bench_distributed.py": ("## Distributed meta-updates",
                             ["--repeats", "1", "--rounds", "1", "--unroll", "3", "--hidden", "16", "--batch", "16"]),
    "bench_unroll.py": ("## Core engine vs a full autograd unroll", ["--quick"]),
    # its cheapest case: two tiny `gimli-bptt sine` runs, one with --compile (one updater compiles)
    "bench_compile.py": ("## Compiled meta-steps",
                         ["--cases", "cli", "--cli-args", "--shots 2 --iterations 2 --meta-batch 2 --methods maml "
                          "--test-tasks 4 --test-steps 1"]),
    # transformers is in the test extra; higher and TorchOpt, when absent, become rows that say so
    "bench_hf.py": ("## A HuggingFace GPT-2: gimli, higher and TorchOpt", ["--unroll", "2", "--repeats", "1"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_a_benchmark_script_runs_and_replaces_its_own_section(script: str, tmp_path: Path) -> None:
    title, args = SCRIPTS[script]
    out = tmp_path / "RESULTS.md"
    out.write_text(f"# Benchmarks\n\n{title}\n\nAn older run, to be replaced.\n\n{OTHER}")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, "--out", str(out)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    text = out.read_text()
    assert text.count(title) == 1 and "An older run" not in text
    assert OTHER in text and "failed:" not in text
    assert text.index(title) < text.index("## Some other benchmark")  # replaced where it was


def test_benchlib_imports_no_benchmark_script() -> None:
    """Imports in ``bench/`` run one way: the scripts import ``benchlib``, and ``benchlib`` imports no script."""
    import ast

    scripts = {p.stem for p in (ROOT / "bench").glob("*.py")} - {"benchlib"}
    tree = ast.parse((ROOT / "bench" / "benchlib.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & scripts, f"bench/benchlib.py imports the scripts {sorted(imported & scripts)}"
