"""A rich progress bar over named build/export steps, with each finished step's time kept."""

from __future__ import annotations

import time
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from autoglm_trt.utils.progress import console


class Steps:
    """`with steps.step("Exporting llm"): ...` advances the bar; `timings` maps label -> seconds."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.enabled = total, enabled
        self.timings: dict[str, float] = {}
        self._bar: Progress | None = None
        self._task = None

    def __enter__(self) -> Steps:
        if self.enabled:
            cols = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            self._bar = Progress(*cols, console=console, transient=False)
            self._bar.start()
            self._task = self._bar.add_task("starting", total=self.total)
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    @contextmanager
    def step(self, label: str):
        if self._bar is not None:
            self._bar.update(self._task, description=label)
        t0 = time.perf_counter()
        yield
        self.timings[label] = time.perf_counter() - t0
        if self._bar is not None:
            self._bar.advance(self._task)

    def sub(self, label: str, advance_by: float) -> None:
        """Partial progress inside a step (e.g. one weight unit of a rank)."""
        if self._bar is not None:
            self._bar.update(self._task, description=label, advance=advance_by)
