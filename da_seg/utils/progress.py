"""The console progress line (iteration, rate, ETA and the latest values), and the ETA of a
sequence of runs."""
from __future__ import annotations

import math
import sys
import time


class Progress:
    """A one-line progress bar: iteration, it/s, ETA and the latest values.

    Redrawn in place on a terminal; on a pipe or file (CI, nohup) it prints a line at most
    every ``every_s`` seconds so logs stay readable.
    """

    def __init__(self, total: int, desc: str, start: int = 0, enabled: bool = True, every_s: float = 10.0,
                 stream=None):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start_count, self.count = start, start
        self.t0 = self.last_print = time.perf_counter()
        self.every_s = every_s
        self.info: dict[str, float] = {}

    def update(self, count: int, info: dict[str, float] | None = None, force: bool = False) -> None:
        self.count = count
        if info:
            self.info = info
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and not self.tty and now - self.last_print < self.every_s:
            return
        if not force and self.tty and now - self.last_print < 0.2:
            return
        self.last_print = now
        self.stream.write(("\r" if self.tty else "") + self.line(now) + ("" if self.tty else "\n"))
        self.stream.flush()

    def line(self, now: float | None = None) -> str:
        now = time.perf_counter() if now is None else now
        done = self.count - self.start_count
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - self.count) / rate if rate > 0 else float("inf")
        width = 20
        filled = int(width * self.count / max(self.total, 1))
        values = " ".join(f"{k}={v:.4g}" for k, v in self.info.items())
        return (f"{self.desc} [{'#' * filled}{'.' * (width - filled)}] {self.count}/{self.total} "
                f"{rate:.2f} it/s ETA {format_duration(eta)} {values}")

    def close(self) -> None:
        if self.enabled:
            self.update(self.count, force=True)
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()


class RunsClock:
    """Time left in a sequence of ``total`` jobs (a sweep's runs): the mean duration of the jobs
    that did work so far, times the jobs left. Jobs that found their result already there (a
    finished run skipped in seconds) are not counted in the mean, which they would pull down."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.durations: list[float] = []
        self.t0 = time.perf_counter()

    def finished(self, seconds: float, did_work: bool = True) -> None:
        self.done += 1
        if did_work:
            self.durations.append(seconds)

    def remaining_s(self) -> float:
        """inf until a job that did work has finished."""
        if not self.durations:
            return float("inf")
        return sum(self.durations) / len(self.durations) * (self.total - self.done)

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.t0


def format_duration(seconds: float) -> str:
    """h:mm:ss or m:ss; "?" for an unknown (infinite) duration."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
