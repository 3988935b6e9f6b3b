# SPDX-License-Identifier: Apache-2.0
"""A tiny progress bar on stderr, silent when stderr is not a terminal."""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    """A one-line progress bar: ``label [#####.....] 12/40 3.1s eta 7.2s  extra``.

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
        self.enabled = bool(isatty and isatty()) if enabled is None else enabled
        self.count = 0
        self.start = time.perf_counter()
        self._last = 0.0

    def update(self, n: int = 1, info: str = "") -> None:
        """Advances by ``n`` steps and redraws (at most 10 times a second, always at the end)."""
        self.count = min(self.count + n, self.total)
        now = time.perf_counter()
        if not self.enabled or (now - self._last < 0.1 and self.count < self.total):
            return
        self._last = now
        elapsed = now - self.start
        width = 24
        filled = int(width * self.count / self.total)
        eta = elapsed / self.count * (self.total - self.count) if self.count else 0.0
        line = (f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.count}/{self.total} "
                f"{elapsed:.1f}s eta {eta:.1f}s  {info}")
        self.stream.write(line[:160].ljust(100))
        self.stream.flush()

    def close(self) -> None:
        """Ends the bar's line."""
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Progress"]
