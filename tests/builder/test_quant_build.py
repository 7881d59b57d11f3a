"""INT8 engines: pre-quantized rank files equal quantizing the checkpoint in memory (per rank, with SmoothQuant)."""

from __future__ import annotations

import pytest
import torch

from autoglm_trt.formats.manifest import read_manifest
from autoglm_trt.models.loader import load_model

quant = pytest.importorskip("autoglm_trt.layers.quant")
LINEARS = {"self_attn.qkv_proj": 128, "self_attn.o_proj": 128, "mlp.gate_up_proj": 128, "mlp.down_proj": 256}


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    """A calibration directory with made-up (but well-formed) statistics for the tiny model's 2 layers."""
    cache = pytest.importorskip("autoglm_trt.calibration.cache")
    g = torch.Generator().manual_seed(3)
    ch, s = {}, {}
    for i in range(2):
        for name, k in LINEARS.items():
            key = f"layers.{i}.{name}"
            ch[key] = torch.rand(k, generator=g) * 4 + 0.1
            s[key] = torch.rand(k, generator=g) + 0.5
    result = cache.CalibrationResult(method="max", act_amax={k: v.max() for k, v in ch.items()},
                                     smoothed_amax={k: (v / s[k]).max() for k, v in ch.items()},
                                     channel_amax=ch, smooth_scales=s, smooth_alpha=0.5)
    return cache.save_calibration(result, tmp_path_factory.mktemp("calib") / "c")


def _logits(model) -> torch.Tensor:
    ids, pos = torch.arange(3, 12) * 11, torch.arange(9).expand(3, -1)
    with torch.no_grad():
        return model.compute_logits(model(model.embed(ids), pos))


@pytest.mark.parametrize("mode", ["int8-wo", "w8a8", "fp8"])
def test_int8_round_trip_equals_in_memory_quantization(build_engine_dir, tiny_model_dir, mode):
    result = build_engine_dir(f"q-{mode}", quant=mode)
    assert read_manifest(result.engine_dir).quantization["mode"] == mode
    engine = load_model(result.engine_dir, dtype="float32", show_progress=False)
    ref = load_model(tiny_model_dir, dtype="float32", show_progress=False)
    quant.quantize_model(ref, mode)
    want = torch.float8_e4m3fn if mode == "fp8" else torch.int8
    assert engine.language_model.layers[1].mlp.down_proj.weight.dtype == want
    assert torch.equal(_logits(engine), _logits(ref))


@pytest.mark.parametrize("act_quant", ["dynamic", "static"])
def test_smoothquant_tp2_rank_files_equal_per_rank_quantization(build_engine_dir, tiny_model_dir, calib_dir,
                                                               act_quant):
    from autoglm_trt.calibration.cache import load_calibration
    from autoglm_trt.layers.parallel import parallel_state

    result = build_engine_dir(f"w8a8-{act_quant}", quant="w8a8", tp=2, act_quant=act_quant, calib_dir=str(calib_dir))
    m = read_manifest(result.engine_dir)
    assert m.quantization["act_quant"] == act_quant and m.quantization["calibration"]["smooth_alpha"] == 0.5
    assert (result.engine_dir / "calibration" / "summary.json").is_file()
    calib = load_calibration(calib_dir)
    for rank in range(2):
        engine = load_model(result.engine_dir, dtype="float32", rank=rank, tp_size=2, show_progress=False)
        with parallel_state(rank, 2):
            live = load_model(tiny_model_dir, dtype="float32", show_progress=False)
            quant.quantize_model(live, "w8a8", act_scales=calib, smooth_alpha=0.5, act_quant=act_quant)
        live_sd = live.state_dict()
        engine_sd = engine.state_dict()
        assert set(engine_sd) == set(live_sd)
        for name, t in engine_sd.items():
            assert torch.equal(t, live_sd[name]), (rank, name)
        if act_quant == "static":
            assert "language_model.layers.0.mlp.down_proj.input_scale" in engine_sd


def test_smoothquant_tp1_matches_in_memory_logits(build_engine_dir, tiny_model_dir, calib_dir):
    from autoglm_trt.calibration.cache import load_calibration

    result = build_engine_dir("w8a8-tp1-calib", quant="w8a8", calib_dir=str(calib_dir))
    ref = load_model(tiny_model_dir, dtype="float32", show_progress=False)
    quant.quantize_model(ref, "w8a8", act_scales=load_calibration(calib_dir), smooth_alpha=0.5)
    engine = load_model(result.engine_dir, dtype="float32", show_progress=False)
    assert torch.equal(_logits(engine), _logits(ref))


def test_engine_report_equals_in_memory_report(build_engine_dir, tiny_model_dir, calib_dir):
    """`build --report` measures the built engine: the same figures as quantizing the checkpoint in memory."""
    from autoglm_trt.calibration.report import accuracy_report, engine_accuracy_report

    result = build_engine_dir("w8a8-report", quant="w8a8", calib_dir=str(calib_dir))
    kw = dict(device="cpu", samples=1, max_ppl_tokens=64)
    got = engine_accuracy_report(tiny_model_dir, result.engine_dir, **kw)
    want = accuracy_report(tiny_model_dir, calib_dir, "w8a8", **kw)
    assert got["mode"] == "w8a8" and got["act_quant"] == "dynamic" and got["reference_dtype"] == "float32"
    for name in ("calibration_set", "heldout_set", "perplexity"):
        assert got[name] == want[name], name
        assert got[name]["positions"] > 10 and got[name]["mean_kl"] > 0  # quantization moved the function


@pytest.fixture(scope="module")
def awq_calib_dir(tiny_model_dir, tmp_path_factory):
    """`calibrate --awq` on two shipped samples: AWQ scales and E[x^2] beside the INT8 statistics."""
    from autoglm_trt.calibration import CalibrateOptions, calibrate

    out = tmp_path_factory.mktemp("calib-awq")
    calibrate(tiny_model_dir, out, opts=CalibrateOptions(method="max", samples=2, max_pixels=40_000, awq=True),
              device="cpu", show_progress=False)
    return out


@pytest.mark.parametrize("with_awq", [False, True])
def test_int4_round_trip_equals_in_memory_quantization(build_engine_dir, tiny_model_dir, awq_calib_dir, with_awq):
    """build --quant int4-awq (round-to-nearest, or AWQ from a calibration) -> load: the same logits as the
    same transform in memory, and as LLM(quant="int4-awq") generates."""
    from autoglm_trt.formats.calibration import load_calibration
    from autoglm_trt.layers.quantize import quantize_model

    calib = str(awq_calib_dir) if with_awq else None
    result = build_engine_dir(f"q-int4-{with_awq}", quant="int4-awq", calib_dir=calib)
    record = read_manifest(result.engine_dir).quantization
    assert record["mode"] == "int4-awq" and bool(record["calibration"]) == with_awq
    engine = load_model(result.engine_dir, dtype="float32", show_progress=False)
    ref = load_model(tiny_model_dir, dtype="float32", show_progress=False)
    quantize_model(ref, "int4-awq", load_calibration(calib) if calib else None)
    assert engine.language_model.layers[1].mlp.down_proj.weight.dtype == torch.int32  # 8 nibbles a word
    assert torch.equal(_logits(engine), _logits(ref))
    if with_awq:
        assert load_calibration(calib).awq_scales, "calibrate --awq wrote no AWQ scales"
        plain = load_model(tiny_model_dir, dtype="float32", show_progress=False)
        quantize_model(plain, "int4-awq", None)
        assert not torch.equal(_logits(plain), _logits(ref)), "the AWQ scales changed nothing"


def test_int4_engine_generates_the_in_memory_tokens(build_engine_dir, tiny_model_dir):
    from autoglm_trt import LLM, SamplingParams

    result = build_engine_dir("q-int4-llm", quant="int4-awq")
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    kw = dict(device="cpu", dtype="float32", num_blocks=32, max_model_len=512)
    a = LLM(str(result.engine_dir), **kw).generate("Open the settings app", params)[0].token_ids
    b = LLM(str(tiny_model_dir), quant="int4-awq", **kw).generate("Open the settings app", params)[0].token_ids
    assert a == b and len(a) == 12
