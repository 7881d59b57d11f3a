"""Manifest, checksums, options, profiles and the streaming safetensors writer (no model needed)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from autoglm_trt.builder.options import BuildConfig, ExportConfig, ShapeLimits, parse_int_list
from autoglm_trt.formats.manifest import source_checkpoint_hash
from autoglm_trt.formats.safetensors_io import SafetensorsWriter, iter_tensors


def test_stream_writer_out_of_order_round_trip(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int8), "c": torch.randn(4).bfloat16(),
               "empty": torch.zeros(0, 3), "flag": torch.tensor([True, False])}
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    path = tmp_path / "x.safetensors"
    with SafetensorsWriter(path, specs, {"rank": "0"}) as w:
        for name in ("c", "flag", "a", "empty", "b"):
            w.write(name, tensors[name])
    back = load_file(str(path))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(back[k], v), k
    hasher = hashlib.sha256()
    streamed = dict(iter_tensors(path, hasher))  # our one-pass reader: same tensors, sha256 of the whole file
    assert set(streamed) == set(tensors) and all(torch.equal(streamed[k], v) for k, v in tensors.items())
    assert hasher.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()


def test_stream_writer_rejects_mismatches(tmp_path):
    w = SafetensorsWriter(tmp_path / "x.safetensors", {"a": (torch.float32, (2,)), "b": (torch.float32, (1,))})
    with pytest.raises(ValueError, match="planned torch.float32"):
        w.write("a", torch.zeros(3))
    with pytest.raises(KeyError):
        w.write("zzz", torch.zeros(2))
    w.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="never written"):
        w.close()


def test_source_hash_fast_sees_layout_not_values(tiny_model_dir, tmp_path):
    import shutil

    from autoglm_trt.models.checkpoint import checkpoint_files

    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, copy)
    files = checkpoint_files(copy)
    fast, full = source_checkpoint_hash(copy, files), source_checkpoint_hash(copy, files, "full")
    assert fast == source_checkpoint_hash(tiny_model_dir, checkpoint_files(tiny_model_dir)) and fast != full
    with open(files[-1], "r+b") as f:  # same layout, one value changed
        f.seek(-4, 2)
        f.write(b"\0\0\0\0")
    assert source_checkpoint_hash(copy, files) == fast
    assert source_checkpoint_hash(copy, files, "full") != full
    cfg = json.loads((copy / "config.json").read_text())
    cfg["text_config"]["rms_norm_eps"] = 1e-6
    (copy / "config.json").write_text(json.dumps(cfg))
    assert source_checkpoint_hash(copy, files) != fast


def test_options_validate_and_normalise():
    assert BuildConfig(dtype="bf16").dtype == "bfloat16" and ExportConfig(dtype="fp16").dtype == "float16"
    assert parse_int_list("8, 1,2,2") == (1, 2, 8) and parse_int_list("") is None
    assert BuildConfig(limits=ShapeLimits(max_batch_size=12)).cuda_graph_batch_sizes == (1, 2, 4, 8, 12)
    assert BuildConfig().cuda_graph_batch_sizes[-1] == 64
    for bad, match in (({"quant": "int4"}, "quant"), ({"tp": 0}, "tp"), ({"backend": "onnx"}, "backend"),
                       ({"act_quant": "static", "quant": "w8a8"}, "calib"), ({"dtype": "int8"}, "dtype")):
        with pytest.raises(ValueError, match=match):
            BuildConfig(**bad)
    with pytest.raises(ValueError, match="max_image_patches"):
        ShapeLimits(max_image_patches=6)
    with pytest.raises(ValueError, match="opset"):
        ExportConfig(opset=13)


def test_profiles_are_ordered(tiny_model_dir):
    from autoglm_trt.builder.profiles import all_profiles
    from autoglm_trt.config import ModelConfig

    prof = all_profiles(ModelConfig.from_dir(tiny_model_dir), ShapeLimits(8, 1024, 512, 4096), 16, (1, 2, 4, 8))
    ctx, gen = prof["llm"]["context"], prof["llm"]["generation"]
    assert ctx["past_key_values.1.value"] == {"min": [1, 2, 0, 32], "opt": [1, 2, 0, 32], "max": [8, 2, 1023, 32]}
    assert gen["attention_mask"] == {"min": [1, 2], "opt": [4, 512], "max": [8, 1024]}
    assert prof["visual"]["default"]["pixel_values"]["max"] == [4096, 1176]
    assert prof["runtime"]["cuda_graph_batch_sizes"] == [1, 2, 4, 8]
