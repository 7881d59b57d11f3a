"""Compile the Triton kernels for sm_90 without a GPU (aot_compile.py, in a subprocess so the
triton JIT state of this process stays untouched): no compiler errors, no register spills."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.triton_interp,
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed"),
]


def test_kernels_compile_for_sm90_without_spills() -> None:
    env = dict(os.environ, PYTHONPATH=str(HERE.parents[1]), TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(HERE / "aot_compile.py"), "--quick"], env=env,
                          capture_output=True, text=True, timeout=550)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) >= 15, proc.stdout
    failed = [r for r in rows if not r["ok"] or r["stack"] != 0]
    assert not failed, "\n".join(json.dumps(r) for r in failed)
    assert all(r["mma"] == "wgmma" for r in rows if r["name"].startswith("prefill"))
