"""One logger for the toolkit: timestamped lines on stderr through rich (the server's start-up log)."""

from __future__ import annotations

import time

from autoglm_trt.utils.progress import console


def log(message: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {message}", highlight=False)
