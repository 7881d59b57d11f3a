"""benchmarks/bench_int4.py end to end on the CPU (--dry-run: Triton interpreter, tiny shapes), so that the one GPU
run it is written for does not die on a Python error: every candidate ends up timed or reported, none crashes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_int4.py"


@pytest.mark.slow
@pytest.mark.triton_interp
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_dry_run_reports_every_candidate(tmp_path: Path) -> None:
    out = tmp_path / "int4.json"
    env = dict(os.environ, PYTHONPATH=str(SCRIPT.parents[1]), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--quick", "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert {"gpu", "copy_tb_s", "bf16_tflops", "libraries", "rows"} <= set(result)
    assert len(result["rows"]) == 8  # 4 shapes x M = 1, 3
    for row in result["rows"]:
        cands = {"bf16", "bf16_gemv", "int4", "int4_gemv", "int4_mm", "int4_deq", "tinygemm", "gemlite"}
        assert set(row["us"]) | set(row["skipped"]) == cands, row
        assert all(row["rel_err"][c] < 1e-2 for c in ("int4", "int4_gemv", "int4_mm", "int4_deq")), row
        assert row["floor_us"]["int4"] < row["floor_us"]["bf16"]
    assert "tinygemm" in result["rows"][0]["skipped"]  # a CUDA-only op on the CPU: reported, not a crash
