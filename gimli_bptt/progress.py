# SPDX-License-Identifier: Apache-2.0
"""A one-line progress bar on stderr (no dependency), for long unrolls and the experiments."""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    """A one-line progress bar: ``label [#####.....] 12/40 3.1s eta 7.2s  info``.

    Args:
        total: The number of steps.
        label: Text in front of the bar.
        enabled: Draw at all; ``None`` draws only when ``stream`` is a terminal.
        stream: Where to draw (default ``sys.stderr``).
    """

    def __init__(self, total: int, label: str = "", enabled: Optional[bool] = None,
                 stream: Optional[TextIO] = None):
        self.total = max(int(total), 1)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(isatty and isatty()) if enabled is None else bool(enabled)
        self.count = 0
        self.start = time.perf_counter()
        self._last = 0.0
        self._info = ""

    def update(self, n: int = 1, info: str = "") -> None:
        """Advances by ``n`` steps and redraws (at most 10 times a second, always at the end)."""
        self.count = min(self.count + n, self.total)
        self._info = info
        now = time.perf_counter()
        if not self.enabled or (now - self._last < 0.1 and self.count < self.total):
            return
        self._draw(now)

    def _draw(self, now: float) -> None:
        self._last = now
        elapsed = now - self.start
        width = 24
        filled = int(width * self.count / self.total)
        eta = elapsed / self.count * (self.total - self.count) if self.count else 0.0
        line = (f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.count}/{self.total} "
                f"{elapsed:.1f}s eta {eta:.1f}s  {self._info}")
        self.stream.write(line[:160].ljust(100))
        self.stream.flush()

    def close(self) -> None:
        """Draws the last state and ends the bar's line."""
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Progress"]
