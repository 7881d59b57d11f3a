"""calibrate -> CALIB_DIR -> load_calibration -> quantize_model, the accuracy report, and the CLI."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from autoglm_trt.calibration import load_calibration, read_trt_cache
from autoglm_trt.calibration.cache import float_to_hex
from autoglm_trt.calibration.samples import encode, forward, load_samples
from autoglm_trt.layers.quant import decoder_linears, quantize_model
from autoglm_trt.processing.inputs import InputProcessor


def test_calibration_dir_holds_everything(calib_dir) -> None:
    names = {p.name for p in calib_dir.iterdir()}
    assert {"act_amax.safetensors", "smoothed_act_amax.safetensors", "channel_amax.safetensors",
            "smooth_scales.safetensors", "calibration.cache", "summary.json"} <= names
    summary = json.loads((calib_dir / "summary.json").read_text())
    assert summary["method"] == "entropy" and summary["num_samples"] == 2 and summary["num_tokens"] > 100
    assert set(summary["layers"]) == {f"layers.{i}.{n}" for i in range(2) for n in
                                      ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}


def test_statistics_are_consistent(calib_dir, our_model) -> None:
    r = load_calibration(calib_dir)
    assert r.method == "entropy" and r.smooth_alpha == 0.5 and r.num_samples == 2
    for key, lin in decoder_linears(our_model):
        ch, s = r.channel_amax[key], r.smooth_scales[key]
        assert ch.shape == (lin.in_features,) and s.shape == ch.shape and bool((s > 0).all())
        assert 0 < float(r.act_amax[key]) <= float(ch.max()) * (1 + 1e-6)  # entropy clips, never widens
        assert 0 < float(r.smoothed_amax[key]) <= float((ch / s).max()) * (1 + 1e-6)
        assert torch.allclose(r.act_scales[key], r.act_amax[key] / 127)


def test_cache_parses_back_to_the_statistics(calib_dir) -> None:
    r = load_calibration(calib_dir)
    header, scales = read_trt_cache(calib_dir / "calibration.cache")
    assert header == "TRT-100000-EntropyCalibration2"
    assert len(scales) == 2 * len(r.act_amax)
    lines = (calib_dir / "calibration.cache").read_text().splitlines()[1:]
    for key in r.act_amax:
        want = float(r.act_amax[key]) / 127.0
        assert scales[f"{key}.input"] == float(torch.tensor(want, dtype=torch.float32))
        assert f"{key}.input: {float_to_hex(want)}" in lines
        assert abs(scales[f"{key}.smoothed_input"] - float(r.smoothed_amax[key]) / 127.0) < 1e-9


def test_calibration_replays_into_the_model(calib_dir, our_model, tiny_model_dir) -> None:
    r = load_calibration(calib_dir)
    processor = InputProcessor.from_dir(tiny_model_dir)
    prompt = encode(processor, load_samples(limit=3)[2], max_pixels=40_000)  # not one of the 2 calibrated
    cpu = torch.device("cpu")
    with torch.inference_mode():
        ref = our_model.compute_logits(forward(our_model, prompt, cpu))
        for act_quant, tol in (("dynamic", 0.04), ("static", 0.06)):
            m = copy.deepcopy(our_model)
            quantize_model(m, "w8a8", r, r.smooth_alpha, act_quant=act_quant)
            out = m.compute_logits(forward(m, prompt, cpu))
            assert float((out - ref).norm() / ref.norm()) < tol
            o_proj = m.language_model.layers[0].self_attn.o_proj
            assert torch.allclose(o_proj.smooth_scale, 1 / r.smooth_scales["layers.0.self_attn.o_proj"])
            if act_quant == "static":
                want = r.smoothed_amax["layers.0.mlp.down_proj"] / 127
                assert torch.allclose(m.language_model.layers[0].mlp.down_proj.input_scale, want.reshape(1))


@pytest.mark.parametrize("mode", ["w8a8", "fp8"])
def test_accuracy_report(calib_dir, tiny_model_dir, mode) -> None:
    from autoglm_trt.calibration import accuracy_report

    rep = accuracy_report(tiny_model_dir, calib_dir, mode, device="cpu", samples=1, max_ppl_tokens=64)
    assert rep["mode"] == mode and rep["reference_dtype"] == "float32"
    for name in ("calibration_set", "heldout_set", "perplexity"):
        row = rep[name]
        assert row["positions"] > 10 and 0.5 <= row["top1_agreement"] <= 1.0 and row["mean_kl"] >= 0
    ppl = rep["perplexity"]
    assert ppl["tokens"] == 63 and ppl["reference"] > 1 and ppl["quantized"] > 1
    assert abs(ppl["relative_change"]) < 0.5


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoglm_trt.cli", "calibrate", *args], capture_output=True,
                          text=True, timeout=300, check=False)


def test_cli_writes_cache_and_qdq_graph(tiny_model_dir, mlp_onnx, tmp_path) -> None:
    out = tmp_path / "calib"
    proc = _cli(str(tiny_model_dir), "-o", str(out), "--method", "max", "--samples", "1", "--max-pixels", "40000",
                "--onnx", str(mlp_onnx[0]), "--device", "cpu", "--trt-version", "10.3.0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "calibration pass 1/1: 1/1" in proc.stderr  # progress, also off a terminal
    assert read_trt_cache(out / "calibration.cache")[0] == "TRT-100300-MinMaxCalibration"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["onnx"]["linears"] == 2 and summary["onnx"]["onnxruntime_rel_err"] < 0.5  # random feeds
    assert (out / "decoder_qdq.onnx").is_file()


def test_cli_bad_input_is_one_line(tiny_model_dir, tmp_path) -> None:
    proc = _cli(str(tiny_model_dir), "-o", str(tmp_path / "c"), "--method", "mse")
    assert proc.returncode == 2 and "method must be one of" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli(str(tmp_path), "-o", str(tmp_path / "c"))
    assert proc.returncode == 2 and "not a model directory" in proc.stderr
    (tmp_path / "file").write_text("x")
    proc = _cli(str(tiny_model_dir), "-o", str(tmp_path / "file"))
    assert proc.returncode == 2 and "is a file" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_bad_dataset_refused_before_the_model_loads(tiny_model_dir, tmp_path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"messages": [\n')
    for dataset, message in ((tmp_path / "missing.jsonl", "does not exist"), (tmp_path / "bad.jsonl", "not JSON")):
        proc = _cli(str(tiny_model_dir), "-o", str(tmp_path / "c"), "--dataset", str(dataset), "--device", "cpu")
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "Loading weights" not in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "c").exists()
