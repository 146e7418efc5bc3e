"""Plain progress lines for long work that is followed in a log file (a cluster job's ``--output``).

A progress bar redraws one terminal line; written to a file it becomes one ever-growing line. Long work
therefore prints timestamped lines that read well in a file: what runs, how far it is, and an estimate of
when it ends. ``interactive()`` says whether the output is a terminal (where a bar is the better choice).
"""

from __future__ import annotations

import sys
import time

__all__ = ["Countdown", "format_duration", "interactive", "log_line"]


def interactive() -> bool:
    """Whether stdout is a terminal (a progress bar redraws) rather than a file or a pipe."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


def format_duration(seconds: float) -> str:
    """``1h02m``, ``3m05s``, ``42s``; ``?`` when not yet known."""
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def log_line(message: str) -> None:
    """One timestamped line on stdout, flushed at once (a job's log file shows it when it happens)."""
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}", flush=True)


class Countdown:
    """How many of ``total`` units are done, and the time the rest should take at the rate so far."""

    def __init__(self, total: int, done: int = 0) -> None:
        self.total, self.start_done = total, done
        self.done = done
        self.started = time.perf_counter()

    def advance(self, n: int = 1) -> None:
        self.done += n

    @property
    def left(self) -> int:
        return max(self.total - self.done, 0)

    def eta(self) -> str:
        """Remaining time at the average rate since the start (``?`` before the first unit is done)."""
        made = self.done - self.start_done
        if made <= 0:
            return "?"
        return format_duration((time.perf_counter() - self.started) / made * self.left)

    def elapsed(self) -> str:
        return format_duration(time.perf_counter() - self.started)
