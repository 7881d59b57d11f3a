"""The processing files of a random-weight checkpoint load in tokenizers and in transformers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
from tokenizers import Tokenizer as RawTokenizer

from autoglm_trt.processing import tokenizer_files as tf

REAL_SPECIALS = {
    151329: "<|endoftext|>", 151330: "[MASK]", 151331: "[gMASK]", 151332: "[sMASK]", 151333: "<sop>",
    151334: "<eop>", 151335: "<|system|>", 151336: "<|user|>", 151337: "<|assistant|>",
    151338: "<|observation|>", 151339: "<|begin_of_image|>", 151340: "<|end_of_image|>",
    151341: "<|begin_of_video|>", 151342: "<|end_of_video|>", 151343: "<|image|>", 151344: "<|video|>",
}

TEXTS = [
    "Hello, world! How are you today?",
    "打开设置应用，开启深色模式。然后回到主屏幕。",
    "mixed 中文 and English 123456 with emoji 😀🚀 and accents: café, naïve, Ωμέγα",
    "do(action=\"Tap\", element=[500, 820])\n\n\tindented\r\nwindows line",
    "  leading and trailing spaces   ",
    "\u0000\u0001 control chars and \U0010ffff plane-16 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "<think>reasoning</think><answer>do(action=\"Back\")</answer>",
    "",
]


def test_files_written(model_dir):
    names = {p.name for p in model_dir.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
            "generation_config.json", "config.json"} <= names
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == tf.CHAT_TEMPLATE == (model_dir / "chat_template.jinja").read_text()
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151329, 151336, 151338, 151348] and gen["pad_token_id"] == 151329


def test_chat_template_is_the_published_one():
    # the reference document's code block, minus the markdown fence's final newline
    assert tf.CHAT_TEMPLATE.startswith("[gMASK]<sop>\n{%- for msg in messages %}")
    assert "<|user|>{{ '\\n' }}" in tf.CHAT_TEMPLATE
    assert tf.CHAT_TEMPLATE.endswith("{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_preprocessor_config_values(model_dir):
    cfg = json.loads((model_dir / "preprocessor_config.json").read_text())
    assert cfg["size"] == {"shortest_edge": 12544, "longest_edge": 9633792}
    assert (cfg["patch_size"], cfg["temporal_patch_size"], cfg["merge_size"]) == (14, 2, 2)
    assert cfg["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert cfg["image_std"] == [0.26862954, 0.26130258, 0.27577711]
    assert cfg["image_processor_type"] == "Glm4vImageProcessor" and cfg["resample"] == 3


def test_special_tokens_at_real_ids(model_dir):
    raw = RawTokenizer.from_file(str(model_dir / "tokenizer.json"))
    for token_id, content in REAL_SPECIALS.items():
        assert raw.token_to_id(content) == token_id
        assert raw.id_to_token(token_id) == content
        assert raw.encode(f"a{content}b").ids.count(token_id) == 1
    for content, token_id in (("<think>", 151345), ("</think>", 151346), ("<answer>", 151347), ("</answer>", 151348)):
        assert raw.token_to_id(content) == token_id
    regular = [i for i in raw.get_vocab().values() if i < 151329]
    assert max(regular) < 10_000  # regular BPE tokens stay well below the special block
    assert max(raw.get_vocab().values()) < tf.VOCAB_SIZE


def test_build_is_fast_and_deterministic(tmp_path):
    start = time.perf_counter()
    first = tf.build_tokenizer().to_str()
    assert time.perf_counter() - start < 2.0
    assert tf.build_tokenizer().to_str() == first
    # another interpreter (another hash seed) builds the same file byte for byte
    code = ("import hashlib; from autoglm_trt.processing.tokenizer_files import build_tokenizer; "
            "print(hashlib.sha256(build_tokenizer().to_str().encode()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert out.stdout.strip() == hashlib.sha256(first.encode()).hexdigest()


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(model_dir, text):
    raw = RawTokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = raw.encode(text).ids
    assert raw.decode(ids, skip_special_tokens=False) == text
    assert all(i < 151329 or i in REAL_SPECIALS or 151345 <= i <= 151348 for i in ids)


def test_transformers_tokenizer(model_dir, hf_tokenizer):
    from transformers import PreTrainedTokenizerFast

    assert isinstance(hf_tokenizer, PreTrainedTokenizerFast)
    assert hf_tokenizer.eos_token_id == 151329 and hf_tokenizer.pad_token_id == 151329
    assert hf_tokenizer.convert_tokens_to_ids("<|image|>") == 151343
    raw = RawTokenizer.from_file(str(model_dir / "tokenizer.json"))
    for text in TEXTS + ["[gMASK]<sop><|user|>\nhi<|assistant|>\n"]:
        assert hf_tokenizer(text)["input_ids"] == raw.encode(text).ids
        for skip in (True, False):
            ids = raw.encode(text).ids
            assert hf_tokenizer.decode(ids, skip_special_tokens=skip) == raw.decode(ids, skip_special_tokens=skip)


def test_transformers_processor(model_dir, hf_processor):
    from transformers import AutoProcessor, Glm4vProcessor

    assert isinstance(hf_processor, Glm4vProcessor)
    assert hf_processor.image_token_id == 151343
    try:
        assert isinstance(AutoProcessor.from_pretrained(model_dir), Glm4vProcessor)
    except ImportError as exc:  # no torchvision: transformers' Glm4vVideoProcessor needs it
        assert "orchvision" in str(exc)


def test_unknown_preset(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        tf.write_processing_files(tmp_path, "gpt-9")


def test_generation_config_not_overwritten(tmp_path):
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 7}')
    tf.write_processing_files(tmp_path, "tiny")
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {"eos_token_id": 7}
