# SPDX-License-Identifier: Apache-2.0
"""The README's code runs exactly as written: its Example and the gimli snippets of "Coming from higher or
learn2learn", each extracted from README.md and run in a fresh interpreter against this checkout."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: Generous: a fresh machine compiles the fused kernels on first use (about a minute on 2 cores).
TIMEOUT_S = 900


def section(title: str) -> str:
    """The text of the README's ``## <title>`` section, up to the next ``## `` heading."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match is not None, f"README.md has no '## {title}' section"
    return match.group(1)


def python_blocks(text: str) -> list[str]:
    """The contents of the ```python fenced blocks of ``text``, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def run(code: str, tmp_path: Path) -> str:
    """Runs ``code`` as a script in a fresh interpreter that imports this checkout; returns its stdout."""
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, f"the README's code failed:\n{code}\n--- stderr ---\n{done.stderr[-4000:]}"
    return done.stdout


def numbers(line: str) -> list[float]:
    return [float(t) for t in re.findall(r"-?\d+\.\d+", line)]


def test_the_example_runs_as_written_and_prints_readable_numbers(tmp_path: Path) -> None:
    (example,) = python_blocks(section("Example"))
    assert "meta_batches" not in example  # everything it uses is defined in it
    out = run(example, tmp_path)
    lines = [line for line in out.splitlines() if line.startswith("meta step")]
    assert len(lines) == 4, out
    assert "tensor(" not in out  # numbers, not tensor reprs
    losses = [numbers(line)[0] for line in lines]
    assert all(0.0 < loss < 2.0 for loss in losses), out  # cross-entropy of 4 classes starts near log 4
    assert losses[-1] < losses[0], out  # training with the learned rates lowers the validation loss
    rates = [numbers(line)[1:] for line in lines]
    assert all(len(r) == 2 and all(x >= 0.0 for x in r) for r in rates), out  # one rate per layer
    assert rates[-1] != [0.05, 0.05], out  # they were learned


def test_coming_from_higher_gimli_snippets_run_as_written(tmp_path: Path) -> None:
    blocks = python_blocks(section("Coming from higher or learn2learn"))
    gimli = [b for b in blocks if b.startswith("# gimli_bptt: runs as written")]
    peers = [b for b in blocks if not b.startswith("# gimli_bptt: runs as written")]
    assert len(gimli) == 2, "expected the gimli counterparts of the higher and the learn2learn snippets"
    assert any("higher.innerloop_ctx" in b for b in peers) and any(".clone()" in b and ".adapt(" in b for b in peers)
    rates = run(gimli[0], tmp_path)
    assert re.search(r"learned rates: \[\d\.\d+, \d\.\d+\]", rates), rates
    maml = run(gimli[1], tmp_path)
    lines = [line for line in maml.splitlines() if line.startswith("meta step")]
    assert len(lines) == 3 and all(numbers(line)[0] > 0.0 for line in lines), maml
