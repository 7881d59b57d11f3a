"""Runtime processing code needs no transformers, and its text half needs no torch."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    probe = code + "\nimport sys\nprint(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_text_modules_import_no_torch():
    loaded = _modules_after("from autoglm_trt.processing import Tokenizer, IncrementalDetokenizer, "
                            "ChatTemplate, ReasoningParser, split")
    assert "torch" not in loaded and "transformers" not in loaded


def test_no_transformers_at_runtime():
    loaded = _modules_after("from autoglm_trt.processing import InputProcessor, ImageProcessor, mrope_positions, "
                            "write_processing_files\nimport autoglm_trt.processing.inputs")
    assert "torch" in loaded and "transformers" not in loaded
