"""Triton kernels vs the references under the Triton interpreter (CPU, small shapes).

TRITON_INTERPRET must be set before triton is first imported, so the checks run in a subprocess
(interp_checks.py) that prints one JSON line per case.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

pytestmark = [
    pytest.mark.triton_interp,
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed"),
]


def test_kernels_under_interpreter() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(HERE / "interp_checks.py")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) >= 15, proc.stdout
    failed = [r for r in rows if not r["err"] <= r["tol"]]
    assert not failed, "\n".join(json.dumps(r) for r in failed)
