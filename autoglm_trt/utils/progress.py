"""Rich progress bars for long work (weight loading, export, calibration, build)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

console = Console(stderr=True)


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
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n=1: bar.advance(task, n)
