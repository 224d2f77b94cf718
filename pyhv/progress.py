"""A small progress bar on stderr: redrawn in place on a terminal, a line
per quarter otherwise (so logs stay readable)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: int, stream=None, enabled: bool = True):
        self.label = label
        self.total = max(1, total)
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self._last_quarter = -1
        self._last_draw = 0.0

    def advance(self, n: int) -> None:
        self.done = min(self.total, self.done + n)
        self._draw()

    def _draw(self, final: bool = False) -> None:
        if not self.enabled:
            return
        frac = self.done / self.total
        if self.tty:
            now = time.monotonic()
            if not final and now - self._last_draw < 0.05:
                return
            self._last_draw = now
            width = 30
            fill = int(frac * width)
            bar = "#" * fill + "-" * (width - fill)
            self.stream.write(f"\r{self.label:<18} [{bar}] {frac * 100:5.1f}% "
                              f"{self.done}/{self.total} {now - self.started:5.1f}s")  # fmt: skip
            if final:
                self.stream.write("\n")
            self.stream.flush()
        else:
            quarter = int(frac * 4)
            if quarter != self._last_quarter and (quarter > 0 or final):
                self._last_quarter = quarter
                self.stream.write(f"{self.label}: {quarter * 25}% ({self.done}/{self.total})\n")
                self.stream.flush()

    def close(self) -> None:
        self._draw(final=True)
