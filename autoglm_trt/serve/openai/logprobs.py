"""Token log-probabilities in OpenAI's chat and completions formats."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of byte-level BPE's printable alphabet (each byte 0..255 is one visible char)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class TokenText:
    """Per-token text and bytes, cached; a token that is part of a UTF-8 character keeps its bytes."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._lookup(token_id)
        return hit

    def _lookup(self, token_id: int) -> tuple[str, list[int]]:
        backend = getattr(self.tokenizer, "backend", None)
        piece = backend.id_to_token(token_id) if backend is not None else None
        added = getattr(self.tokenizer, "added_token_ids", frozenset())
        if piece is not None and token_id not in added:
            dec = _byte_decoder()
            if all(c in dec for c in piece):
                raw = bytes(dec[c] for c in piece)
                return raw.decode("utf-8", errors="replace"), list(raw)
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text, list(text.encode("utf-8"))


def token_id_text(token_id: int) -> tuple[str, list[int]]:
    """vLLM's return_tokens_as_token_ids: tokens shown as "token_id:N" (exact, never ambiguous)."""
    text = f"token_id:{token_id}"
    return text, list(text.encode())


def chat_logprobs(entries: list[Any], token_text: Callable[[int], tuple[str, list[int]]], top_n: int) -> dict:
    """{"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]} for the given tokens."""
    content = []
    for e in entries:
        text, raw = token_text(e.token_id)
        top = []
        for tid, lp in e.top[:top_n]:
            t, b = token_text(tid)
            top.append({"token": t, "logprob": _finite(lp), "bytes": b})
        content.append({"token": text, "logprob": _finite(e.logprob), "bytes": raw, "top_logprobs": top})
    return {"content": content, "refusal": None}


class CompletionLogprobs:
    """Completions format: parallel lists, text offsets counted across chunks."""

    def __init__(self, token_text: Callable[[int], tuple[str, list[int]]], top_n: int, offset: int = 0) -> None:
        self.token_text = token_text
        self.top_n = top_n
        self.offset = offset

    def format(self, entries: list[Any]) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            text, _ = self.token_text(e.token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(_finite(e.logprob))
            out["top_logprobs"].append({self.token_text(t)[0]: _finite(lp) for t, lp in e.top[:self.top_n]})
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out


def _finite(x: float) -> float:
    # NOTE: JSON has no -inf; a token of probability 0 (possible after top-k) gets a floor value.
    return max(float(x), -9999.0)

