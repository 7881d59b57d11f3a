"""Fixtures of the serving tests: an in-process server over the scripted FakeEngine (unit tests of
the HTTP/gRPC layers) and the real `autoglm-trt serve` subprocess on the tiny checkpoint (e2e)."""

from __future__ import annotations

import pytest

from serve_fakes import FakeEngine
from serve_harness import InProcessServer, ServeProcess, cli_has


@pytest.fixture(scope="module")
def fake_engine():
    return FakeEngine()


@pytest.fixture(scope="module")
def fake_server(fake_engine):
    with InProcessServer(fake_engine, api_key="test-key", reasoning_parser=None) as server:
        yield server


def start_serve(tiny_model_dir, *args, api_key=None):
    """The real CLI as a subprocess; skips (saying why) until the CLI can serve."""
    if not cli_has("serve"):
        pytest.skip("autoglm_trt.cli has no `serve` command yet")
    return ServeProcess(tiny_model_dir, *args, api_key=api_key)
