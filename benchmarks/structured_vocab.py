"""A byte-level BPE vocabulary of the real model's size for the structured-output benchmark.

The 9B's tokenizer cannot be downloaded here, and the tiny checkpoint's has ~1,600 regular tokens: a grammar
backend's mask time depends on the size and shape of the token trie, so a 1,600-token vocabulary flatters every
backend. This trains a BPE with GLM-4's pre-tokenizer split to 151,329 regular tokens (ids 0..151,328, as the
real vocabulary) on a varied corpus read from this machine: Python source and docs of the installed packages
(code and English), synthetic JSON records, and synthetic Chinese (pseudo-words drawn Zipf-wise from the CJK
block, since no Chinese text ships with the packages). The special tokens are pinned at their real ids
(processing/tokenizer_files.SPECIAL_TOKENS); the mask covers the embedding's 151,552 rows.

Deterministic for a given set of installed packages; a few minutes on 2 cores; cached as tokenizer.json.
"""

from __future__ import annotations

import itertools
import json
import random
import sysconfig
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from autoglm_trt.processing.tokenizer_files import _SPLIT_PATTERN, SPECIAL_TOKENS

NUM_REGULAR = SPECIAL_TOKENS[0][0]  # 151,329: the real vocabulary's regular tokens sit below the specials
CODE_BYTES = 64_000_000
CHINESE_CHARS = 2_500_000
JSON_RECORDS = 120_000
_CJK = (0x4E00, 0x9FA5)
_CJK_PUNCT = "，。、：；？！“”（）《》"


def _code_and_docs(limit: int) -> list[str]:
    """Text of the installed packages' .py/.md/.rst/.txt files, in sorted order, up to `limit` bytes."""
    root = Path(sysconfig.get_paths()["purelib"])
    out, total = [], 0
    for path in sorted(root.rglob("*")):
        if path.suffix not in (".py", ".md", ".rst", ".txt") or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        out.append(text)
        total += len(text)
        if total >= limit:
            break
    return out


def _chinese(rng: random.Random, num_chars: int) -> list[str]:
    """Sentences of pseudo-words: 6,000 characters with Zipf weights, 40,000 words of 1-4 characters."""
    chars = [chr(c) for c in rng.sample(range(*_CJK), 6000)]
    char_cw = list(itertools.accumulate(1.0 / (i + 1) for i in range(len(chars))))  # NOTE: cumulative: O(log n) draws
    words = ["".join(rng.choices(chars, cum_weights=char_cw, k=rng.choice((1, 2, 2, 2, 3, 4))))
             for _ in range(40_000)]
    word_cw = list(itertools.accumulate(1.0 / (i + 1) ** 0.9 for i in range(len(words))))
    lines, total = [], 0
    while total < num_chars:
        parts = []
        for _ in range(rng.randint(2, 5)):
            parts.append("".join(rng.choices(words, cum_weights=word_cw, k=rng.randint(3, 9))))
            parts.append(rng.choice(_CJK_PUNCT))
        line = "".join(parts)
        lines.append(line)
        total += len(line)
    return lines


def _json_records(rng: random.Random, keys: list[str], zh: list[str], n: int) -> list[str]:
    """Tool-call-like JSON objects: identifier keys, numbers, booleans, English and Chinese strings, arrays."""
    def value(depth: int):
        kind = rng.randrange(7 if depth < 2 else 5)
        if kind == 0:
            return rng.randint(-1000, 100_000)
        if kind == 1:
            return round(rng.uniform(-100, 100), rng.randint(1, 4))
        if kind == 2:
            return rng.choice((True, False, None))
        if kind == 3:
            return " ".join(rng.choices(keys, k=rng.randint(1, 6)))
        if kind == 4:
            return rng.choice(zh)[:rng.randint(2, 24)]
        if kind == 5:
            return [value(depth + 1) for _ in range(rng.randint(0, 4))]
        return obj(depth + 1)

    def obj(depth: int) -> dict:
        return {rng.choice(keys): value(depth) for _ in range(rng.randint(1, 6))}

    indent = (None, 2, 4)
    return [json.dumps(obj(0), ensure_ascii=False, indent=rng.choice(indent)) for _ in range(n)]


def corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    code = _code_and_docs(CODE_BYTES)
    zh = _chinese(rng, CHINESE_CHARS)
    keys = sorted({w for text in code[:2000] for w in text.split() if w.isidentifier() and len(w) < 20})
    return code + zh + _json_records(rng, keys, zh, JSON_RECORDS)


def train(seed: int = 0) -> Tokenizer:
    """The BPE with NUM_REGULAR regular tokens and the special tokens at their real ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=NUM_REGULAR, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(seed), trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    if len(vocab) < NUM_REGULAR:
        raise RuntimeError(f"the corpus gave only {len(vocab)} tokens (want {NUM_REGULAR}); raise CODE_BYTES")
    for token_id, content, _ in SPECIAL_TOKENS:
        vocab[content] = token_id
    data["added_tokens"] = [
        {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": special}
        for token_id, content, special in SPECIAL_TOKENS
    ]
    return Tokenizer.from_str(json.dumps(data, ensure_ascii=False))


def load_or_train(cache_dir: Path, seed: int = 0) -> Path:
    """Path of the cached tokenizer.json (trained on first use)."""
    path = cache_dir / f"bpe151552-seed{seed}" / "tokenizer.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        train(seed).save(str(path))
    return path


if __name__ == "__main__":
    import sys
    import time

    t0 = time.perf_counter()
    out = load_or_train(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/autoglm-trt-bench"))
    tok = Tokenizer.from_file(str(out))
    print(out, tok.get_vocab_size(), f"{time.perf_counter() - t0:.1f}s")
