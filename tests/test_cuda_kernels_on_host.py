# SPDX-License-Identifier: Apache-2.0
"""The CUDA kernels' logic, run on the CPU: Note [Kernels on the host] in csrc/cuda/optim_kernels.cuh.

No GPU runs in CI, so the kernels themselves (grid-stride indexing, vectorised loads and stores,
the segment walk, the tails, the coefficient caching) are compiled with g++ as host code by
``tests/cuda_host/kernels_on_host.cpp``, every thread of a grid run in turn, and each output
compared bit for bit with the per-element math they share with the CPU kernels. What this does
not cover (launch configuration, streams, the binding, real parallel execution, the atomics'
order) is covered by the CUDA cases of ``test_kernels.py`` on a GPU.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "tests" / "cuda_host" / "kernels_on_host.cpp"
CXX = shutil.which("g++") or shutil.which("c++")


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
def test_cuda_kernels_match_the_per_element_math(tmp_path: Path) -> None:
    exe = tmp_path / "kernels_on_host"
    build = subprocess.run(
        [CXX, "-std=c++17", "-O1", "-ffp-contract=off", "-I", str(ROOT / "csrc" / "include"), str(HARNESS), "-o", str(exe)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "mismatches: 0" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]
    checked = int(run.stdout.split("checked:")[1].split()[0])
    assert checked > 1_000_000  # the harness did run its cases
