"""Rich progress bars for long work (weight loading, export, calibration, build).

Off a terminal (a pipe, docker / systemd / CI logs) a bar cannot redraw, so step_progress prints a plain
line now and then instead, and printed lines are never wrapped at 80 columns.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

console = Console(stderr=True)
if not console.is_terminal:
    console.soft_wrap = True  # NOTE: a log line stays one line in a log file


@contextmanager
def byte_progress(label: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yields advance(nbytes); draws a bar with sizes and ETA on stderr when enabled."""
    if not enabled:
        yield lambda n: None
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


@contextmanager
def step_progress(label: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yields advance(steps); a counting bar for work measured in items."""
    if not enabled:
        yield lambda n=1: None
        return
    if not console.is_terminal:
        yield _LineProgress(label, total).advance
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n=1: bar.advance(task, n)


class _LineProgress:
    """A progress bar for logs: `label: done/total (elapsed)` at the first step, every `every` seconds and
    at the last step."""

    def __init__(self, label: str, total: int, every: float = 10.0) -> None:
        self.label, self.total, self.every = label, total, every
        self.done, self.t0, self.last = 0, time.monotonic(), float("-inf")

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.done >= self.total or now - self.last >= self.every:
            self.last = now
            console.print(f"{self.label}: {self.done}/{self.total} ({now - self.t0:.0f} s)", highlight=False)
