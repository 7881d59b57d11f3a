"""`autoglm-trt export` / `build` as subprocesses: real command lines, exit codes, one-line errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from autoglm_trt.formats.manifest import read_manifest


def _cli(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoglm_trt.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_backend_tensorrt_without_tensorrt_exits_2_with_one_line(tiny_model_dir, tmp_path):
    r = _cli("build", str(tiny_model_dir), "-o", str(tmp_path / "e"), "--backend", "tensorrt")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "TensorRT is not installable here" in lines[0] and "--backend torch" in lines[0]
    assert not (tmp_path / "e").exists()


def test_bad_option_exits_2_with_one_line(tiny_model_dir, tmp_path):
    r = _cli("build", str(tiny_model_dir), "-o", str(tmp_path / "e"), "--quant", "int4")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "quant must be one of none, int8-wo, w8a8" in r.stderr


def test_build_command(tiny_model_dir, tmp_path):
    out = tmp_path / "engine"
    r = _cli("build", str(tiny_model_dir), "-o", str(out), "--dtype", "fp32", "--tp", "2", "--max-batch-size", "4",
             "--page-size", "32")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith(f"built {out} (float32, quant none, tp 2")
    m = read_manifest(out)
    assert m.build["cuda_graph_batch_sizes"] == [1, 2, 4] and m.build["page_size"] == 32
    assert sorted(p.name for p in out.glob("rank*.safetensors")) == ["rank0.safetensors", "rank1.safetensors"]


def test_export_command(tiny_model_dir, tmp_path):
    out = tmp_path / "onnx"
    r = _cli("export", str(tiny_model_dir), "-o", str(out), "--no-vision", "--opset", "18")
    assert r.returncode == 0, r.stderr
    assert "onnxruntime vs PyTorch" in r.stdout + r.stderr and "exported llm/model.onnx" in r.stdout
    meta = json.loads((out / "export.json").read_text())
    assert meta["opset"] == 18 and set(meta["graphs"]) == {"llm"}
    assert all(p["ok"] for p in meta["parity"])


def test_build_report_prints_the_engine_against_its_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "int8"
    r = _cli("build", str(tiny_model_dir), "-o", str(out), "--dtype", "fp32", "--quant", "int8-wo", "--report",
             "--report-device", "cpu", "--report-samples", "1", timeout=300)
    assert r.returncode == 0, r.stderr
    text = r.stdout + r.stderr  # NOTE: the table goes to the console (stderr), like calibrate --report's
    assert "quantized vs float" in text and "…" not in text, text  # nothing cut at 80 columns
    assert "report int8-wo: calibration set: 1/1" in r.stderr and "report int8-wo: held-out set: 1/1" in r.stderr
    rows = [line.split() for line in text.splitlines() if line.strip().startswith("int8-wo")]
    assert [row[1] for row in rows] == ["calib", "held-out", "text"], text
    for row in rows:  # mode, set, positions, top-1, mean KL[, ppl float, ppl quant]
        assert int(row[2]) > 10 and 0.5 < float(row[3]) <= 1.0 and 0 < float(row[4]) < 0.01, row


@pytest.mark.parametrize("args,message", [
    (("--report",), "--report compares a quantized engine"),
    (("--report", "--quant", "int8-wo", "--tp", "2"), "build with --tp 1"),
    (("--report", "--quant", "int8-wo", "--report-device", "tpu"), "--report-device must be"),
])
def test_build_report_refusals_before_building(tiny_model_dir, tmp_path, args, message):
    r = _cli("build", str(tiny_model_dir), "-o", str(tmp_path / "e"), *args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "e").exists()
