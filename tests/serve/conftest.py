"""Fixtures of the serving tests: an in-process server over the scripted FakeEngine (unit tests of
the HTTP/gRPC layers) and the real `autoglm-trt serve` subprocess on the tiny checkpoint (e2e)."""

from __future__ import annotations

import pytest

from serve_fakes import FakeEngine
from serve_harness import InProcessServer


@pytest.fixture(scope="module")
def fake_engine():
    return FakeEngine()


@pytest.fixture(scope="module")
def fake_server(fake_engine):
    with InProcessServer(fake_engine, api_key="test-key", reasoning_parser=None) as server:
        yield server
