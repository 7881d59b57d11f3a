"""The model's vocabulary as the grammar backend sees it: each token id's bytes, and which ids are special.

llguidance matches grammars on bytes, so it needs every id's byte string. A byte-level BPE stores tokens in
GPT-2's printable alphabet (`Ġ` for a space byte, ...); added tokens (the chat format's `<|user|>`, the
reasoning tags `<think>`, `</think>`, `<answer>`, `</answer>`) are stored as their text. Every added token is
special to the grammar: a text rule (a JSON string, a regex) can never produce one, only a grammar that names
it (`<think>`, `<[151346]>`). Ids no token uses (the embedding's padding rows) get b"" and are never allowed.
"""

from __future__ import annotations

import json
from functools import lru_cache

from tokenizers import Tokenizer as HFTokenizer


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, printable character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_byte_table(tokenizer: HFTokenizer, vocab_size: int) -> tuple[list[bytes], list[int]]:
    """(bytes of ids 0..vocab_size-1, sorted added-token ids) of a `tokenizers` tokenizer."""
    data = json.loads(tokenizer.to_str())
    byte_level = (data.get("decoder") or {}).get("type") == "ByteLevel"
    added = tokenizer.get_added_tokens_decoder()  # {id: AddedToken}
    table = [b""] * vocab_size
    decoder = _byte_decoder()
    for text, token_id in tokenizer.get_vocab(with_added_tokens=True).items():
        if token_id >= vocab_size:
            raise ValueError(f"token {text!r} has id {token_id}, beyond the model's {vocab_size} rows")
        if token_id in added or not byte_level:
            table[token_id] = added[token_id].content.encode() if token_id in added else \
                tokenizer.decode([token_id]).encode()
        else:
            table[token_id] = bytes(decoder[c] for c in text)
    return table, sorted(added)


class _Wrapped:
    """What llguidance.TokenizerWrapper reads: token bytes, special ids, eos, and an encode function."""

    bos_token_id = None

    def __init__(self, tokenizer: HFTokenizer, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.tokens, self.special_token_ids = token_byte_table(tokenizer, vocab_size)
        self.eos_token_id = eos_token_ids[0]
        self._tokenizer = tokenizer

    def __call__(self, text: bytes | str) -> list[int]:
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        return self._tokenizer.encode(text, add_special_tokens=False).ids


# The action grammar's thought (actions.lark THOUGHT): a precomputed token set makes its mask ~20 us a token
# instead of a walk of the whole vocabulary (~1 ms).
THOUGHT_SLICE = "[^=<]+"


def ll_tokenizer(tokenizer: HFTokenizer, vocab_size: int, eos_token_ids: list[int]):
    """An llguidance LLTokenizer over the model's `vocab_size` rows (~1 s for 151,552 ids: build once)."""
    import llguidance

    if not eos_token_ids:
        raise ValueError("the tokenizer has no eos token ids: a grammar needs one to end on")
    wrapped = llguidance.TokenizerWrapper(_Wrapped(tokenizer, vocab_size, eos_token_ids))
    slices = llguidance.LLTokenizer.general_slices() + [THOUGHT_SLICE]
    return llguidance.LLTokenizer(wrapped, n_vocab=vocab_size, eos_token=list(eos_token_ids), slices=slices)
