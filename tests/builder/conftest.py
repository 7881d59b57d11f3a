"""Fixtures of the builder tests: one ONNX export and a few engine builds of the tiny checkpoint."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_export(tiny_model_dir, tmp_path_factory):
    from autoglm_trt.builder.export import export_onnx
    from autoglm_trt.builder.options import ExportConfig, ShapeLimits

    out = tmp_path_factory.mktemp("onnx") / "tiny"
    cfg = ExportConfig(limits=ShapeLimits(max_batch_size=4, max_seq_len=256, max_num_tokens=128,
                                          max_image_patches=1024))
    return export_onnx(tiny_model_dir, out, cfg, show_progress=False)


def _build(tiny_model_dir, tmp_path_factory, name: str, **kwargs):
    from autoglm_trt.builder.build import build_engine
    from autoglm_trt.builder.options import BuildConfig, ShapeLimits

    out = tmp_path_factory.mktemp("engines") / name
    limits = ShapeLimits(max_batch_size=8, max_seq_len=512, max_num_tokens=256, max_image_patches=1024)
    cfg = BuildConfig(dtype="float32", cuda_graph_batch_sizes=(1, 2, 4, 8), limits=limits, **kwargs)
    return build_engine(tiny_model_dir, out, cfg, show_progress=False)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir, tmp_path_factory):
    return _build(tiny_model_dir, tmp_path_factory, "fp32-tp1")


@pytest.fixture(scope="session")
def tiny_engine_tp2(tiny_model_dir, tmp_path_factory):
    return _build(tiny_model_dir, tmp_path_factory, "fp32-tp2", tp=2)


@pytest.fixture(scope="session")
def build_engine_dir(tiny_model_dir, tmp_path_factory):
    """Build more engines on demand: build_engine_dir(name, **BuildConfig fields) -> BuildResult."""
    return lambda name, **kw: _build(tiny_model_dir, tmp_path_factory, name, **kw)
