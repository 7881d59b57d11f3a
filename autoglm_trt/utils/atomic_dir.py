"""A new output directory that appears whole or not at all (a failed or interrupted write leaves nothing
behind that would block the rerun)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from autoglm_trt.errors import UserError


@contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Yields a fresh sibling directory to write into; renamed to `out` when the block succeeds, removed
    (with any parents it had to create) when it raises."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is {'not empty' if out.is_dir() else 'a file'}; choose a new directory")
    created = next((p for p in reversed([out.parent, *out.parent.parents]) if not p.exists()), None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(created if created is not None else tmp, ignore_errors=True)
        raise
