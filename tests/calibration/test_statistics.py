"""Amax algorithms, the TensorRT cache format, the shipped data set and the drawn screenshots."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from autoglm_trt.calibration import algorithms as A
from autoglm_trt.calibration.cache import (
    float_to_hex,
    hex_to_float,
    read_trt_cache,
    trt_version_tag,
    write_trt_cache,
)
from autoglm_trt.calibration.samples import HELDOUT_DATASET, HELDOUT_TEXT, load_samples
from autoglm_trt.calibration.screens import KINDS, draw_screen
from autoglm_trt.errors import UserError


def _hist(x: np.ndarray, bins: int = 2048) -> tuple[np.ndarray, float]:
    hi = float(np.abs(x).max())
    return np.histogram(np.abs(x), bins=bins, range=(0, hi))[0], hi


def test_max_and_percentile() -> None:
    x = np.random.default_rng(0).standard_normal(200_000)
    hist, hi = _hist(x)
    assert A.amax_from_histogram(hist, hi, "max") == hi
    got = A.amax_from_histogram(hist, hi, "percentile", 99.0)
    assert abs(got - np.percentile(np.abs(x), 99.0)) <= hi / 2048 + 1e-9
    assert A.amax_from_histogram(hist, hi, "percentile", 100.0) == pytest.approx(hi)


def test_entropy_clips_rare_outliers_but_keeps_the_bulk() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(500_000)
    x[:20] *= 40  # a handful of huge outliers stretch the range ~40x
    hist, hi = _hist(x)
    amax = A.amax_from_histogram(hist, hi, "entropy")
    assert 2.5 < amax < hi / 4  # clips the outliers, not the Gaussian body
    uniform = rng.uniform(-1, 1, 100_000)  # nothing to clip: keeps (nearly) the whole range
    hist, hi = _hist(uniform)
    assert A.amax_from_histogram(hist, hi, "entropy") > 0.9 * hi


def test_empty_histogram_and_bad_method() -> None:
    assert A.amax_from_histogram(np.zeros(2048), 0.0, "entropy") == 0.0
    with pytest.raises(ValueError, match="method must be one of"):
        A.amax_from_histogram(np.ones(2048), 1.0, "mse")


def test_hex_float_round_trip_is_exact() -> None:
    assert float_to_hex(1.0) == "3f800000" and float_to_hex(0.0078125) == "3c000000"
    for v in np.random.default_rng(0).uniform(1e-6, 10, 100).astype(np.float32):
        h = float_to_hex(float(v))
        assert len(h) == 8 and hex_to_float(h) == float(v)
        assert struct.unpack(">f", bytes.fromhex(h))[0] == float(v)


def test_trt_cache_file_round_trip(tmp_path) -> None:
    scales = {"layers.0.self_attn.qkv_proj.input": 0.0123, "layers.0.mlp.down_proj.smoothed_input": 3.5e-4}
    write_trt_cache(tmp_path / "c.cache", scales, "entropy", "10.3.0")
    header, back = read_trt_cache(tmp_path / "c.cache")
    assert header == "TRT-100300-EntropyCalibration2"
    assert back == {k: float(np.float32(v)) for k, v in scales.items()}
    write_trt_cache(tmp_path / "m.cache", scales, "max", "8.6.1")
    assert read_trt_cache(tmp_path / "m.cache")[0] == "TRT-8601-MinMaxCalibration"
    assert trt_version_tag("10.13") == "101300"
    (tmp_path / "bad.cache").write_text("hello\n")
    with pytest.raises(UserError, match="not a TensorRT calibration cache"):
        read_trt_cache(tmp_path / "bad.cache")


def test_shipped_sets_load_offline() -> None:
    samples = load_samples()
    assert 30 <= len(samples) <= 40
    kinds = [s for s in samples if s.messages and isinstance(s.messages[1]["content"], list)]
    assert len(kinds) >= 20  # most carry a drawn screenshot
    texts = " ".join(str(s.messages[1]["content"]) for s in samples)
    assert "微信" in texts and "Bluetooth" in texts  # Chinese and English
    assert any(not s.add_generation_prompt for s in samples)  # some end with the agent's reply
    assert len(load_samples(HELDOUT_DATASET)) >= 6 and len(HELDOUT_TEXT.read_text(encoding="utf-8")) > 1000
    assert len(load_samples(limit=3)) == 3


def test_dataset_errors_name_the_line(tmp_path) -> None:
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"id": "a", "text": "hi"}\n{not json}\n')
    with pytest.raises(UserError, match="d.jsonl:2: not JSON"):
        load_samples(bad)
    bad.write_text('{"id": "a", "messages": [{"role": "user", "content": [{"type": "image", "image": "x.png"}]}]}\n')
    with pytest.raises(UserError, match="x.png does not exist"):
        load_samples(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_samples(tmp_path / "missing.jsonl")


def test_screens_are_deterministic_phone_screenshots() -> None:
    for kind in KINDS:
        a, b = draw_screen(kind, 7), draw_screen(kind, 7)
        assert a.size == (540, 1200) and a.mode == "RGB" and a.tobytes() == b.tobytes()
        assert len(np.unique(np.asarray(a.resize((54, 120))).reshape(-1, 3), axis=0)) > 20  # not a blank canvas
    assert draw_screen("chat", 1).tobytes() != draw_screen("chat", 2).tobytes()
    with pytest.raises(ValueError, match="unknown screen kind"):
        draw_screen("desktop")
