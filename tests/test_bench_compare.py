"""benchmarks/compare.py: directions from key names, pass/fail against a baseline, as a user runs it."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "compare.py"
_spec = importlib.util.spec_from_file_location("bench_compare", SCRIPT)
compare = sys.modules["bench_compare"] = importlib.util.module_from_spec(_spec)  # NOTE: dataclasses look it up
_spec.loader.exec_module(compare)

DECODE = {  # bench_decode.py's layout (batch keys become strings in JSON)
    "gpu": "NVIDIA H100 80GB HBM3", "date": "2026-11-23", "args": {"prompt_len": 512, "json": "a.json"},
    "floor_ms": {"1": 6.5}, "hf": {"1": {"batch": 1, "tok_s_per_seq": 9.5}},
    "engine": {"1": {"batch": 1, "tokens": 255, "ms_per_token": 10.0, "graph_ms": None, "tok_s_per_seq": 100.0,
                     "tok_s_total": 100.0}, "peak_gib": 60.0},
    "prefill_ms": {"512": 20.0},
}
SERVING = {  # autoglm-trt bench / bench_serving.py's layout
    "url": "http://x", "model": "m", "prompt_len": 467, "gen_len": 256, "image": None, "words_per_prompt": 300,
    "levels": [{"concurrency": c, "requests": 16, "failed": 0, "duration_s": 10.0, "requests_per_s": 1.6 * c,
                "output_tokens_per_s": 100.0 * c, "ttft_p50_ms": 20.0, "ttft_p99_ms": 40.0, "itl_p50_ms": 8.0,
                "itl_p99_ms": float("nan"), "tpot_mean_ms": 8.1, "mean_prompt_tokens": 467.0,
                "mean_output_tokens": 256.0, "first_error": None} for c in (1, 8)],
}


def _run(tmp_path: Path, bench: object, baseline: object, *args: str) -> subprocess.CompletedProcess:
    a, b = tmp_path / "bench.json", tmp_path / "baseline.json"
    a.write_text(json.dumps(bench))
    b.write_text(json.dumps(baseline))
    return subprocess.run([sys.executable, str(SCRIPT), str(a), str(b), *args], capture_output=True, text=True,
                          check=False, timeout=60, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("path, better", [
    (["engine", "1", "tok_s_per_seq"], "higher"), (["engine", "1", "ms_per_token"], "lower"),
    (["floor_ms", "64"], "lower"), (["levels[concurrency=8]", "output_tokens_per_s"], "higher"),
    (["levels[concurrency=8]", "duration_s"], "lower"), (["engine", "bf16", "startup_s"], "lower"),
    (["kernels[shape=qkv,m=1]", "tbs", "w8a16"], "higher"), (["rows[variant=nccl]", "us"], "lower"),
    (["engine", "peak_gib"], "lower"), (["levels[concurrency=1]", "failed"], "lower"),
    (["runs[max_num_seqs=512]", "requests_s"], "higher"), (["runs[max_num_seqs=512]", "output_tok_s"], "higher"),
    (["engine", "1", "tokens"], None), (["engine", "bf16", "kv_blocks"], None),
    (["levels[concurrency=1]", "mean_output_tokens"], None), (["words_per_prompt"], None),
])
def test_direction_from_key_names(path, better):
    assert compare.direction(path) == better


def test_figures_name_list_items_by_identity_and_skip_context():
    names = set(compare.figures(SERVING))
    assert "levels[concurrency=8].ttft_p50_ms" in names and "levels[concurrency=1].failed" in names
    assert "levels[concurrency=1].itl_p99_ms" not in names  # NaN
    assert not any("concurrency" == n.split(".")[-1] or "mean_prompt_tokens" in n for n in names)
    decode = compare.figures(DECODE)
    assert "args.prompt_len" not in decode and "engine.1.graph_ms" not in decode  # settings; None
    assert decode["engine.1.tok_s_per_seq"] == ("higher", 100.0) and decode["prefill_ms.512"] == ("lower", 20.0)


def test_same_run_passes(tmp_path):
    proc = _run(tmp_path, DECODE, DECODE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 of 7 figures worse" in proc.stdout


@pytest.mark.parametrize("key, factor, tolerance, code", [
    ("tok_s_per_seq", 0.96, "0.05", 0),  # 4% slower: inside 5%
    ("tok_s_per_seq", 0.94, "0.05", 1),  # 6% slower
    ("tok_s_per_seq", 0.96, "0.01", 1),  # 4% slower, tolerance 1%
    ("tok_s_per_seq", 1.50, "0.05", 0),  # faster
    ("ms_per_token", 1.04, "0.05", 0),
    ("ms_per_token", 1.06, "0.05", 1),  # 6% more latency
    ("ms_per_token", 0.50, "0.05", 0),  # less latency
])
def test_worse_by_more_than_the_tolerance_fails(tmp_path, key, factor, tolerance, code):
    bench = copy.deepcopy(DECODE)
    bench["engine"]["1"][key] *= factor
    proc = _run(tmp_path, bench, DECODE, "--tolerance", tolerance)
    assert proc.returncode == code, proc.stdout + proc.stderr
    row = next(line for line in proc.stdout.splitlines() if f"engine.1.{key}" in line)
    assert ("WORSE" in row) == (code == 1)
    if code:
        assert "1 of 7 figures worse than the baseline by more than" in proc.stdout
        assert proc.stdout.rstrip().endswith(f"engine.1.{key}")


def test_serving_failures_and_latency(tmp_path):
    bench = copy.deepcopy(SERVING)
    bench["levels"][1]["failed"] = 2
    bench["levels"][0]["ttft_p99_ms"] = 60.0
    proc = _run(tmp_path, bench, SERVING)
    assert proc.returncode == 1
    assert "levels[concurrency=8].failed" in proc.stdout and "levels[concurrency=1].ttft_p99_ms" in proc.stdout
    assert any(line.startswith("│ levels[concurrency=8].failed ") for line in proc.stdout.splitlines())  # not eaten as markup
    assert "2 of " in proc.stdout
    assert _run(tmp_path, bench, SERVING, "--ignore", "*.failed", "--ignore", "*ttft*").returncode == 0
    assert _run(tmp_path, bench, SERVING, "--only", "levels[[]concurrency=8[]].failed").returncode == 1


def test_missing_figures_are_listed_not_failed(tmp_path):
    bench = copy.deepcopy(DECODE)
    del bench["prefill_ms"]
    bench["engine"]["8"] = {"tok_s_per_seq": 50.0}
    proc = _run(tmp_path, bench, DECODE)
    assert proc.returncode == 0 and proc.stdout.count("│ missing") == 2


def test_unusable_inputs_exit_2(tmp_path):
    assert _run(tmp_path, DECODE, SERVING).returncode == 2  # no figure in common
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(bad), str(bad)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 2 and "cannot read" in proc.stderr
    assert _run(tmp_path, DECODE, DECODE, "--tolerance", "1.5").returncode == 2


def test_stored_baseline(tmp_path):
    """The example baseline (the H100 decode run of docs/benchmarks.md) against itself and a slower copy."""
    baseline = json.loads((REPO / "benchmarks" / "baselines" / "decode_h100.json").read_text())
    assert baseline["engine"]["1"]["tok_s_per_seq"] > 100  # a real decode run's layout and figures
    assert _run(tmp_path, baseline, baseline).returncode == 0
    slower = copy.deepcopy(baseline)
    slower["engine"]["64"]["tok_s_total"] = 0.85 * baseline["engine"]["64"]["tok_s_total"]  # -15%
    proc = _run(tmp_path, slower, baseline)
    assert proc.returncode == 1 and "engine.64.tok_s_total" in proc.stdout
