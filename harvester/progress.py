"""A progress bar for long runs, on standard error, with rate and ETA.

On a terminal it redraws one line at most ten times a second; elsewhere (CI logs,
pipes) it prints a plain line every few seconds, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressBar", "RunProgress"]


class ProgressBar:
    """Call :meth:`update` with the number done; :meth:`close` prints the last line."""

    def __init__(
        self, total: int, label: str = "targets", stream: TextIO | None = None, width: int = 30
    ) -> None:
        self.total = max(total, 0)
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._t0 = time.perf_counter()
        self._last = self._t0
        self.done = 0

    def update(self, done: int, note: str = "") -> None:
        self.done = done
        now = time.perf_counter()
        interval = 0.1 if self.tty else 5.0
        if now - self._last < interval or (done >= self.total and not self.tty):
            return  # the final line is close()'s
        self._last = now
        self._draw(note)

    def _draw(self, note: str, final: bool = False) -> None:
        elapsed = time.perf_counter() - self._t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        frac = self.done / self.total if self.total else 1.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        filled = int(self.width * frac)
        bar = "#" * filled + "." * (self.width - filled)
        eta_text = f"ETA {eta:5.0f}s" if eta != float("inf") else "ETA    ?"
        line = (
            f"[{bar}] {self.done}/{self.total} {self.label} {_rate(rate)}/s "
            f"{elapsed:5.1f}s {eta_text if not final else '':9s} {note}"
        )
        if self.tty:
            self.stream.write("\r" + line.rstrip() + "\x1b[K" + ("\n" if final else ""))
        else:
            self.stream.write(line.rstrip() + "\n")
        self.stream.flush()

    def close(self, note: str = "") -> None:
        self._draw(note, final=True)


def _rate(r: float) -> str:
    return f"{r / 1000:.1f}k" if r >= 1000 else f"{r:.0f}"


class RunProgress:
    """A run's progress hook: one bar, made when the total is known; with the Dask
    engine it also shows where the cluster is (:meth:`cluster`: its dashboard)."""

    def __init__(self, stream: TextIO | None = None, label: str = "targets") -> None:
        self.stream = stream or sys.stderr
        self.bar: ProgressBar | None = None
        self.note = ""
        #: What the bar counts: targets, or stamps (a single-epoch run).
        self.label = label

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = ProgressBar(total, label=self.label, stream=self.stream)
        self.bar.update(done, self.note)

    def cluster(self, text: str) -> None:
        """Show ``text`` (the cluster's workers and dashboard) now and beside the bar."""
        self.note = text
        print(f"harvester: {text}", file=self.stream, flush=True)

    def close(self) -> None:
        """Print the bar's last line (nothing when no work was reported)."""
        if self.bar is not None:
            self.bar.close(self.note)
