"""Tokenizer.from_dir and the streaming IncrementalDetokenizer."""

from __future__ import annotations

import json
import random

import pytest

from autoglm_trt.errors import UserError
from autoglm_trt.processing.tokenizer import IncrementalDetokenizer, Tokenizer

STREAM_TEXTS = [
    "<think>用户想打开设置。</think><answer>do(action=\"Launch\", app=\"设置\")</answer>",
    "emoji 😀👍🏽🇨🇳 and 中文标点：“你好”。",
    "plain ascii text with numbers 12345 and symbols #$%^&*",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√ ∀x∈ℝ ",
]


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer.from_dir(model_dir)


def test_from_dir_ids(tok, hf_tokenizer):
    assert tok.eos_token_ids == [151329, 151336, 151338, 151348]
    assert tok.pad_token_id == 151329
    assert tok.image_token_id == 151343
    assert {151329, 151331, 151333, 151336, 151343} <= tok.special_token_ids
    assert 151345 not in tok.special_token_ids  # <think> stays visible text
    text = "[gMASK]<sop><|user|>\n你好<|assistant|>\n<think>"
    assert tok.encode(text) == hf_tokenizer(text)["input_ids"]
    ids = tok.encode(text)
    assert tok.decode(ids) == "\n你好\n<think>"
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_eos_from_config_json(tmp_path, model_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"eos_token_id": [151329, 151336]}}))
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == [151329, 151336]


def test_missing_or_broken_tokenizer(tmp_path):
    with pytest.raises(UserError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="could not be loaded"):
        Tokenizer.from_dir(tmp_path)


def _stream(tok, prompt_ids, ids, chunk_sizes, skip=True):
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip)
    deltas, i = [], 0
    for size in chunk_sizes:
        if i >= len(ids):
            break
        deltas.append(detok.step(ids[i:i + size]))
        i += size
    deltas.append(detok.step(ids[i:]) if i < len(ids) else "")
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("text", STREAM_TEXTS)
@pytest.mark.parametrize("skip", [True, False])
def test_stream_equals_full_decode(tok, text, skip):
    prompt = tok.encode("[gMASK]<sop><|user|>\n问题<|assistant|>\n")
    ids = tok.encode(text)
    full = tok.decode(ids, skip_special_tokens=skip)
    deltas = _stream(tok, prompt, ids, [1] * len(ids), skip)
    assert "".join(deltas) == full
    assert all("\ufffd" not in d for d in deltas)  # never a broken character
    assert deltas[-1] == ""  # nothing was held back at the end


def test_multibyte_chars_are_held_back(tok):
    ids = tok.encode("界")  # a character the small BPE splits over several byte tokens
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok, [])
    assert [detok.step([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.step(ids[-1:]) == "界"


def test_stream_random_ids_and_chunks(tok):
    rng = random.Random(0)
    vocab = [i for i in range(tok.vocab_size)] + list(range(151329, 151349)) + [5000, 151500]
    for _ in range(200):
        ids = [rng.choice(vocab) for _ in range(rng.randint(0, 40))]  # broken bytes included
        chunks = [rng.randint(1, 4) for _ in range(len(ids))]
        for skip in (True, False):
            deltas = _stream(tok, [151337], ids, chunks, skip)
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
            assert all(not d.endswith("\ufffd") for d in deltas[:-1])  # only flush may end broken


def test_max_token_chars_bounds_the_token_count(tok):
    """A server refuses text longer than max_model_len * max_token_chars without tokenizing it: that is only
    safe if no text has fewer than len(text) / max_token_chars tokens, added special tokens included."""
    n = tok.max_token_chars
    assert n >= len("<|begin_of_image|>")
    texts = [*STREAM_TEXTS, "<|begin_of_image|>" * 50, " " * 500, "-" * 300, "的" * 200,
             "".join(random.Random(0).choice("ab \n的😀<|>") for _ in range(2000))]
    for text in texts:
        assert len(text) <= n * len(tok.encode(text)), (text[:40], n)
