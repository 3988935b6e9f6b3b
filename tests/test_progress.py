# SPDX-License-Identifier: Apache-2.0
"""The progress bar (tqdm.auto): drawn on a terminal and in a notebook, silent in a log, one interface for all."""
from __future__ import annotations

import io
import sys
import types

import pytest

from gimli_bptt.progress import Progress, in_notebook


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_drawn_on_a_terminal_with_its_label_count_and_info() -> None:
    stream = Tty()
    with Progress(4, "unroll", stream=stream) as bar:
        assert bar.enabled
        bar.update(1, "forward 1/2")
        bar.update(3, "reverse 2/2")
    out = stream.getvalue()
    assert "unroll:" in out and "4/4" in out and "reverse 2/2" in out
    assert out.endswith("\n")  # the bar's line is ended once it is closed


def test_silent_when_not_a_terminal_unless_asked() -> None:
    log = io.StringIO()  # a log file or a pipe
    with Progress(3, "x", stream=log) as bar:
        assert not bar.enabled
        bar.update(3, "done")
    assert log.getvalue() == ""
    loud = io.StringIO()
    with Progress(3, "x", enabled=True, stream=loud) as bar:
        bar.update(3, "done")
    assert "3/3" in loud.getvalue() and "done" in loud.getvalue()


def test_disabled_on_a_terminal_draws_nothing_but_counts() -> None:
    stream = Tty()
    bar = Progress(5, "x", enabled=False, stream=stream)
    bar.update(2)
    bar.update(10)  # clamped at the total
    bar.close()
    bar.close()  # closing twice is harmless
    assert stream.getvalue() == "" and bar.count == 5 and bar.total == 5


def test_count_is_clamped_and_a_zero_total_is_one_step() -> None:
    stream = io.StringIO()
    with Progress(0, "empty", enabled=True, stream=stream) as bar:
        bar.update(3)
    assert bar.total == 1 and bar.count == 1 and "1/1" in stream.getvalue()


def test_a_jupyter_kernel_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    class Shell:
        config: dict[str, dict[str, str]] = {"IPKernelApp": {}}

    fake = types.ModuleType("IPython")
    fake.get_ipython = lambda: Shell()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", fake)
    assert in_notebook()
    with Progress(2, "x", stream=io.StringIO()) as bar:
        assert bar.enabled  # not a tty, but a notebook shows its widget
    fake.get_ipython = lambda: None  # type: ignore[attr-defined]  # plain python with IPython imported
    assert not in_notebook()
    assert not Progress(2, "x", stream=io.StringIO()).enabled
