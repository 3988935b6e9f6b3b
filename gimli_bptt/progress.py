# SPDX-License-Identifier: Apache-2.0
"""Progress of long unrolls and of the experiments, drawn by ``tqdm.auto``: a widget in a Jupyter
notebook, a bar on a terminal, nothing in a log file."""
from __future__ import annotations

import sys
from types import TracebackType
from typing import Any, Optional, TextIO

from tqdm.auto import tqdm


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (the test ``tqdm.autonotebook`` makes; imports nothing)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


class Progress:
    """A progress bar of ``total`` steps: ``label: 40%|████      | 12/30 [00:03<00:05, 3.9it/s, info]``.

    Args:
        total: The number of steps.
        label: Text in front of the bar.
        enabled: Draw at all; ``None`` draws on a terminal (``stream`` is a tty) and in a Jupyter
            notebook (a widget), and stays silent otherwise (a log file, a pipe, CI).
        stream: Where a terminal bar is written (default ``sys.stderr``).
    """

    def __init__(self, total: int, label: str = "", enabled: Optional[bool] = None,
                 stream: Optional[TextIO] = None):
        self.total = max(int(total), 1)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty()) or in_notebook()
        self.enabled = bool(enabled)
        self.count = 0
        # mininterval: redraw at most 10 times a second; tqdm always draws the last state on close
        self._bar: Optional[Any] = (tqdm(total=self.total, desc=label, file=self.stream, mininterval=0.1,
                                         dynamic_ncols=True, leave=True)
                                    if self.enabled else None)

    def update(self, n: int = 1, info: str = "") -> None:
        """Advances by ``n`` steps (at most to ``total``) and shows ``info`` after the bar."""
        step = min(n, self.total - self.count)
        self.count += step
        if self._bar is None:
            return
        if info:
            self._bar.set_postfix_str(info, refresh=False)
        self._bar.update(step)

    def close(self) -> None:
        """Draws the last state and ends the bar (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close()


__all__ = ["Progress", "in_notebook"]
