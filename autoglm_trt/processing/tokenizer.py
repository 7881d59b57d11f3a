"""Tokenizer over the `tokenizers` library (no transformers) and a streaming detokenizer.

`Tokenizer.from_dir` reads a Hugging Face checkpoint: tokenizer.json for the vocabulary,
tokenizer_config.json for the eos/pad token names, generation_config.json / config.json for the
eos ids the model stops on (GLM-4.1V: <|endoftext|>, <|user|>, <|observation|>, id 151348).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from autoglm_trt.errors import UserError

REPLACEMENT_CHAR = "\ufffd"  # what a decode of an incomplete UTF-8 sequence ends with


def read_json(path: Path) -> dict:
    """Read a JSON object from a checkpoint file, {} if the file is absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object")
    return data


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _token_name(value) -> str | None:
    # tokenizer_config may hold "<|endoftext|>" or {"content": "<|endoftext|>", ...}
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """Byte-level BPE tokenizer of a GLM-4.1V checkpoint (encode/decode, special and eos ids)."""

    def __init__(self, backend: _HFTokenizer, eos_token_ids: list[int], pad_token_id: int | None = None):
        self.backend = backend
        self.eos_token_ids = list(dict.fromkeys(eos_token_ids))  # dedup, keep order
        self.pad_token_id = pad_token_id
        added = backend.get_added_tokens_decoder()  # {id: AddedToken}
        self.special_token_ids = frozenset(i for i, t in added.items() if t.special)
        self.added_token_ids = frozenset(added)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        path = Path(model_dir)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise UserError(f"{path} has no tokenizer.json: is it a Hugging Face model directory?")
        try:
            backend = _HFTokenizer.from_file(str(tok_file))
        except Exception as exc:  # the Rust library raises a bare Exception
            raise UserError(f"{tok_file} could not be loaded by the tokenizers library ({exc})") from None
        tok_cfg = read_json(path / "tokenizer_config.json")
        eos_ids = _eos_ids_from_configs(path)
        eos_name = _token_name(tok_cfg.get("eos_token"))
        if eos_name is not None and backend.token_to_id(eos_name) is not None:
            eos_ids.append(backend.token_to_id(eos_name))
        pad_name = _token_name(tok_cfg.get("pad_token"))
        pad_id = backend.token_to_id(pad_name) if pad_name else None
        return cls(backend, eos_ids, pad_id)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for: a text of N characters has at least
        N / max_token_chars tokens (lets a server refuse a huge prompt without tokenizing it)."""
        ids = self.backend.get_vocab(with_added_tokens=True).values()  # NOTE: added tokens' ids may lie past the BPE's
        texts = self.backend.decode_batch([[i] for i in ids], skip_special_tokens=False)
        return max((len(t) for t in texts), default=1)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text ("<|image|>") become their ids."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def convert_tokens_to_ids(self, token: str) -> int:
        """Id of a token that must exist (the special tokens of the chat format)."""
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise UserError(f"the tokenizer has no token {token!r}; is this a GLM-4.1V checkpoint?")
        return token_id

    @property
    def vocab_size(self) -> int:
        """Number of tokens the tokenizer knows (not the model's embedding rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def image_token_id(self) -> int:
        return self.convert_tokens_to_ids("<|image|>")


def _eos_ids_from_configs(path: Path) -> list[int]:
    """eos ids: generation_config.json first (what generate() stops on), else config.json."""
    gen = read_json(path / "generation_config.json")
    if gen.get("eos_token_id") is not None:
        return _as_id_list(gen["eos_token_id"])
    cfg = read_json(path / "config.json")
    text_cfg = cfg.get("text_config") or {}
    return _as_id_list(text_cfg.get("eos_token_id", cfg.get("eos_token_id")))


class IncrementalDetokenizer:
    """Turns a stream of generated ids into text deltas that are always whole UTF-8 characters.

    Byte-level BPE splits one character over several tokens; a decode that ends inside a
    character ends with U+FFFD. Such text is held back until the character completes, so the
    concatenated deltas (plus `flush()`) equal `tokenizer.decode(all_generated_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids or [])
        # NOTE: the prompt ends on a whole character, so decoding can start right after it; the
        # window [prefix, read) is text already emitted, [read, end) text not yet emitted.
        self._prefix = self._read = len(self.ids)

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.ids[start:end], self.skip_special_tokens)

    def step(self, new_ids: list[int]) -> str:
        """Append generated ids; return the text they complete (possibly "")."""
        self.ids.extend(new_ids)
        emitted = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix, len(self.ids))
        if text.endswith(REPLACEMENT_CHAR):
            return ""  # an unfinished character: wait for its next bytes
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(emitted):]

    def flush(self) -> str:
        """Text still held back at the end of generation (a dangling partial character)."""
        emitted = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix, len(self.ids))
        self._prefix = self._read = len(self.ids)
        return text[len(emitted):]
