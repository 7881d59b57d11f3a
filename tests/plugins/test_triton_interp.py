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


def test_arrival_counters_grow_and_keep_outgrown_buffers() -> None:
    """Decode's arrival counters: zeroed once, reused, grown on demand; an outgrown buffer stays
    alive because a captured CUDA graph may still hold its address."""
    import torch

    from autoglm_trt.plugins import triton_attention as ta

    dev = torch.device("cpu")
    saved = ta._COUNTERS.pop(dev, None)
    try:
        small = ta._arrival_counters(dev, 10)
        assert small.dtype == torch.int32 and small.numel() == ta._MIN_COUNTERS
        assert not small.any() and ta._arrival_counters(dev, ta._MIN_COUNTERS) is small
        big = ta._arrival_counters(dev, ta._MIN_COUNTERS + 1)
        assert big.numel() == ta._MIN_COUNTERS + 1 and not big.any()
        assert ta._arrival_counters(dev, 10) is big and ta._COUNTERS[dev] == [small, big]
    finally:
        ta._COUNTERS.pop(dev, None)
        if saved is not None:
            ta._COUNTERS[dev] = saved


def test_decode_refuses_more_splits_than_two_merge_levels() -> None:
    from plugin_cases import make_batch

    from autoglm_trt.plugins import triton_attention as ta

    batch = make_batch([10], [1], heads=4, kv_heads=2, head_dim=16, block_size=16)
    with pytest.raises(ValueError, match="num_splits"):
        ta.decode_attention(*batch.decode_args(), num_splits=ta._MERGE_FAN ** 2 + 1)
