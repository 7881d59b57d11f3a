"""Shared fixtures: one tiny random checkpoint per session; GPU tests skip cleanly without GPUs."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


def pytest_collection_modifyitems(config, items):
    n = _cuda_count()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_multi = pytest.mark.skip(reason="needs two CUDA GPUs")
    for item in items:
        if "multi_gpu" in item.keywords and n < 2:
            item.add_marker(skip_multi)
        elif "gpu" in item.keywords and n < 1:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from autoglm_trt.models.random_checkpoint import init_random

    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    init_random(path, preset="tiny", seed=0, show_progress=False)
    return path


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir):
    import torch
    from transformers import Glm4vForConditionalGeneration

    return Glm4vForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def our_model(tiny_model_dir):
    from autoglm_trt.models.loader import load_model

    return load_model(tiny_model_dir, dtype="float32", show_progress=False)
