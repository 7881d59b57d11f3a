"""Plugin test setup: make plugin_cases importable, register the triton_interp marker."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config) -> None:
    # NOTE: the lead owns pyproject.toml; registering here keeps --strict-markers happy meanwhile.
    config.addinivalue_line(
        "markers", "triton_interp: Triton kernels under TRITON_INTERPRET=1 on CPU (needs triton)"
    )
