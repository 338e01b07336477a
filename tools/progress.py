"""A dependency-free progress bar for the tools: redraws in place on a terminal, prints every 10 % otherwise
(CI logs), and always ends with one complete line."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    def __init__(self, total: int, label: str, width: int = 30):
        self.total, self.label, self.width = max(total, 1), label, width
        self.done = 0
        self.start = time.time()
        self.tty = sys.stderr.isatty()
        self._last_decile = -1

    def update(self, n: int = 1, note: str = "") -> None:
        self.done = min(self.done + n, self.total)
        frac = self.done / self.total
        decile = int(frac * 10)
        if not self.tty and decile == self._last_decile and self.done < self.total:
            return
        self._last_decile = decile
        bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
        line = f"{self.label} [{bar}] {self.done}/{self.total} {time.time() - self.start:6.1f}s {note}"
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        if self.tty and self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()
