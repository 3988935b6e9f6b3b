# SPDX-License-Identifier: Apache-2.0
"""A minimal progress bar on stderr for long unrolls (no dependency)."""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    """Counts the forward and reverse steps of one meta step and redraws one line.

    Drawn only when ``enabled`` and the stream is a terminal; at most ten redraws a second.
    """

    def __init__(self, total_forward: int, total_reverse: int, enabled: bool, stream: Optional[TextIO] = None):
        self.stream = stream or sys.stderr
        self.enabled = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total_forward = total_forward
        self.total_reverse = total_reverse
        self.forward = 0
        self.reverse = 0
        self._last = 0.0
        self._start = time.perf_counter()

    def advance(self, n: int = 1) -> None:
        self.forward += n
        self._draw()

    def reversed(self, n: int = 1) -> None:
        self.reverse += n
        self._draw()

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        width = 24
        done = self.forward + self.reverse
        total = max(self.total_forward + self.total_reverse, 1)
        filled = min(width, int(width * done / total))
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] forward {self.forward}/{self.total_forward} "
            f"reverse {self.reverse}/{self.total_reverse} {now - self._start:6.1f}s"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()


__all__ = ["Progress"]
