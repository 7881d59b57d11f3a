"""vLLM's and SGLang's flag spellings -> `serve`'s own (serve/flags.py), and the README's table of them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from autoglm_trt.errors import UserError
from autoglm_trt.serve.flags import ACCEPTED_FLAG, ALIASES, accepted_flag_note, normalize_serve_argv

README = Path(__file__).resolve().parents[2] / "README.md"


def test_other_commands_pass_through():
    argv = ["generate", "m", "--max_tokens", "5"]
    assert normalize_serve_argv(argv) == argv


def test_underscores_aliases_and_equals_forms():
    out = normalize_serve_argv(["serve", "--model", "m", "--mm_processor_kwargs", '{"max_pixels":5}',
                                "--context-length=25480", "--tp-size", "2", "--tensor_parallel_size=2",
                                "--mem-fraction-static", "0.8", "--disable-radix-cache", "--random_seed", "7"])
    assert out == ["serve", "--model", "m", "--mm-processor-kwargs", '{"max_pixels":5}', "--max-model-len", "25480",
                   "--tp", "2", "--tp", "2", "--gpu-memory-utilization", "0.8", "--no-prefix-caching", "--seed", "7"]


def test_flags_without_meaning_are_carried_to_be_logged():
    out = normalize_serve_argv(["serve", "m", "--mm-encoder-tp-mode", "data", "--trust-remote-code",
                                "--mm_processor_cache_type=shm", "--port", "1"])
    assert out == ["serve", "m", ACCEPTED_FLAG, "mm-encoder-tp-mode=data", ACCEPTED_FLAG, "trust-remote-code",
                   ACCEPTED_FLAG, "mm-processor-cache-type=shm", "--port", "1"]
    assert accepted_flag_note("mm-encoder-tp-mode=data") == \
        "accepted --mm-encoder-tp-mode data: no effect here (the vision tower is placed by the engine itself)"


def test_sglang_mm_process_config_becomes_max_pixels():
    out = normalize_serve_argv(["serve", "--mm-process-config", '{"image":{"max_pixels":5000000}}'])
    assert out == ["serve", "--mm-processor-kwargs", '{"max_pixels": 5000000}']
    for bad in ("{nope", '{"video": {}}', "[1]"):
        with pytest.raises(UserError, match="--mm-process-config"):
            normalize_serve_argv(["serve", "--mm-process-config", bad])


def test_a_value_flag_at_the_end_without_its_value():
    with pytest.raises(UserError, match="--context-length needs a value"):
        normalize_serve_argv(["serve", "m", "--context-length"])


def test_values_and_positionals_are_never_rewritten():
    argv = ["serve", "my_model_dir", "--served-model-name", "my_name", "--", "--tp_size"]
    assert normalize_serve_argv(argv) == argv


def test_the_readme_table_names_every_flag():
    table = README.read_text().split("| vLLM / SGLang flag | here |", 1)[1].split("\n\n", 1)[0]
    named = set(re.findall(r"`--([a-z0-9-]+)", table))
    assert set(ALIASES) <= named, sorted(set(ALIASES) - named)
