"""One logger for the toolkit: timestamped lines on stderr (the server's start-up log, progress of long work).

`log()` prints through rich (markup allowed) in text mode; `configure_logging("json")` turns it, our loggers
and uvicorn's into one JSON object per line, for log collectors (docker, systemd, Kubernetes).
"""

from __future__ import annotations

import json
import logging
import sys
import time

from autoglm_trt.utils.progress import console

_LOGGERS = ("autoglm_trt", "uvicorn", "uvicorn.error", "uvicorn.access")
_state = {"json": False}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
                 + f".{int(record.msecs):03d}", "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(fmt: str = "text", level: str = "info") -> None:
    """Route our loggers and uvicorn's to stderr in `fmt` (text | json) at `level` (uvicorn: warning at least)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    lvl = logging.getLevelName(level.upper())
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger.setLevel(lvl if name.startswith("autoglm") else max(lvl, logging.WARNING))
    _state["json"] = fmt == "json"


def plain(message: str) -> str:
    """`message` without rich markup."""
    from rich.errors import MarkupError
    from rich.text import Text

    try:
        return Text.from_markup(message).plain
    except MarkupError:
        return message


def log(message: str, level: int = logging.INFO) -> None:
    if _state["json"]:
        logging.getLogger("autoglm_trt").log(level, plain(message))
        return
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {message}", highlight=False)
