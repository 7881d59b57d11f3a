"""`serve ENGINE_DIR` takes tensor parallelism from the engine (a --tp 2 build serves over two CPU ranks, gloo)."""

from __future__ import annotations

import httpx
import pytest

from autoglm_trt.builder.build import build_engine
from autoglm_trt.builder.options import BuildConfig

from serve_harness import start_serve

pytestmark = pytest.mark.slow


def test_serve_a_tp2_engine_without_naming_tp(tiny_model_dir, tmp_path):
    engine_dir = tmp_path / "tp2"
    build_engine(tiny_model_dir, engine_dir, BuildConfig(dtype="fp32", tp=2), show_progress=False)
    server = start_serve(engine_dir)
    try:
        log = server.output(tail=None)
        assert "quantization none, tp 2" in log and "(set by the engine's build" in log, log
        resp = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3, resp.text
    finally:
        server.stop()
