"""Compile a request's constraint into a per-request grammar state (llguidance; docs/structured-outputs.md).

One GrammarCompiler per tokenizer (the engine and the server share it): it builds llguidance's view of the
vocabulary once (~0.5 s for 151,552 ids), compiles each distinct constraint once (JSON schemas ~1 ms; the
matcher's lexer then grows lazily as masks are computed) and keeps the compiled matchers in an LRU cache
keyed by the constraint; a request's state starts from a copy of the cached matcher.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from autoglm_trt.processing.structured.spec import StructuredOutputError, StructuredOutputs
from autoglm_trt.processing.structured.state import GrammarState, ReasoningGate
from autoglm_trt.processing.structured.vocab import ll_tokenizer

if TYPE_CHECKING:
    from autoglm_trt.processing.tokenizer import Tokenizer

ACTIONS_LARK = Path(__file__).with_name("actions.lark")
THINK_START, THINK_END, ASSISTANT = "<think>", "</think>", "<|assistant|>"
# NOTE: one canonical spelling between JSON tokens (json.dumps' own ", " and ": "): with free whitespace
# a weak or random model can fill a gap with whitespace tokens forever (vLLM's disable_any_whitespace).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_LABELS = {"json": "JSON schema", "json_object": "json_object", "regex": "regex", "choice": "choice",
           "grammar": "grammar", "actions": "actions grammar"}
_MAX_ERROR = 600  # characters of llguidance's message kept in ours
# a token budget's split: the longest answer's syntax (<answer>do(action="Tap", element=[999,999], message=
# ...)</answer> with gaps: ~25 tokens on GLM-4's vocabulary, one per character at worst ~60) and its string
ACTION_SYNTAX_TOKENS = 64
ACTION_STRING_TOKENS = 128


class GrammarCompiler:
    def __init__(self, tokenizer: "Tokenizer", vocab_size: int, cache_size: int = 128) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self._ll_tokenizer = None  # built on first use
        self._cache: OrderedDict[tuple, object] = OrderedDict()  # key -> pristine LLMatcher
        self._lock = threading.Lock()
        ids = [tokenizer.token_to_id(t) for t in (THINK_START, THINK_END, ASSISTANT)]
        self.think_start_id, self.think_end_id, self.assistant_id = ids
        self._eos = frozenset(tokenizer.eos_token_ids)

    @property
    def ll_tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = ll_tokenizer(self.tokenizer.backend, self.vocab_size,
                                                  self.tokenizer.eos_token_ids)
            return self._ll_tokenizer

    def validate(self, so: StructuredOutputs) -> None:
        """Raise StructuredOutputError naming the problem when `so` cannot be compiled (a 400)."""
        self.compile(so, "reply" if so.kind == "actions" else None)

    def new_state(self, so: StructuredOutputs, prompt_token_ids: list[int]) -> GrammarState:
        """The per-request state; the prompt decides where the reply starts (reasoning open or closed)."""
        where = self.prompt_reasoning(prompt_token_ids)
        if so.kind == "actions":
            start = {"closed": "answer_only", "open": "in_thought"}.get(where, "reply")
            return GrammarState(self.compile(so, start).deep_copy(), None, self._eos)
        gate = None
        if so.after_reasoning and self.think_end_id is not None:
            gate = ReasoningGate(self.think_end_id, ended=where == "closed")
        return GrammarState(self.compile(so, None).deep_copy(), gate, self._eos)

    def prompt_reasoning(self, prompt_token_ids: list[int]) -> str:
        """"closed" / "open" / "none": the think block after the prompt's last <|assistant|> (vLLM's glm45
        scan, which stops at <|assistant|> so earlier turns' think blocks do not count)."""
        for token in reversed(prompt_token_ids):
            if token == self.think_end_id:
                return "closed"
            if token == self.think_start_id:
                return "open"
            if token == self.assistant_id:
                break
        return "none"

    def compile(self, so: StructuredOutputs, start: str | None):
        """The cached pristine matcher of `so` (copy it before use)."""
        key = (*so.key, start)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        matcher = self._build(so, start)
        with self._lock:
            self._cache[key] = matcher
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return matcher

    def _build(self, so: StructuredOutputs, start: str | None):
        import llguidance

        grammar = _grammar_text(so, start)
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise StructuredOutputError(f"invalid {_LABELS[so.kind]}: {_short(matcher.get_error())}")
        return matcher


_compilers: dict[tuple[int, int], GrammarCompiler] = {}
_compilers_lock = threading.Lock()


def compiler_for(tokenizer: "Tokenizer", vocab_size: int) -> GrammarCompiler:
    """The process's one compiler of this tokenizer: the server (validating at the door) and the engine
    (building request states) share its cache."""
    key = (id(tokenizer), vocab_size)
    with _compilers_lock:
        compiler = _compilers.get(key)
        if compiler is None or compiler.tokenizer is not tokenizer:
            compiler = _compilers[key] = GrammarCompiler(tokenizer, vocab_size)
        return compiler


def _grammar_text(so: StructuredOutputs, start: str | None) -> str:
    """llguidance's grammar definition of a constraint (no compilation yet: cheap)."""
    import llguidance

    m = llguidance.LLMatcher
    try:
        if so.kind == "json":
            return m.grammar_from_json_schema(so.spec, defaults=JSON_OPTIONS)
        if so.kind == "json_object":
            return m.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if so.kind == "regex":
            return m.grammar_from_regex(so.spec)
        if so.kind == "choice":
            return m.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(so.spec)))
        if so.kind == "grammar":
            return llguidance.grammar_from("grammar", so.spec)  # Lark, or GBNF converted to Lark
        return m.grammar_from_lark(actions_grammar(start, int(so.spec) if so.spec else None))
    except ValueError as exc:
        raise StructuredOutputError(f"invalid {_LABELS[so.kind]}: {_short(str(exc))}") from None


def actions_grammar(start: str, max_tokens: int | None) -> str:
    """actions.lark with its start rule and, given a token budget, bounds that keep the reply within it:
    a string gets at most an eighth of the budget (<= 128 tokens), the thought what the answer cannot need."""
    text = f"start: {start}\n" + ACTIONS_LARK.read_text(encoding="utf-8")
    if max_tokens is None:
        return text
    string = max(1, min(ACTION_STRING_TOKENS, max_tokens // 8))
    thought = max(1, max_tokens - ACTION_SYNTAX_TOKENS - string)
    for rule, limit in (("thought", thought), ("chars", string)):
        text = text.replace(f"\n{rule}: ", f"\n{rule}[max_tokens={limit}]: ", 1)
    return text


def _short(message: str) -> str:
    message = message.strip()
    return message if len(message) <= _MAX_ERROR else message[:_MAX_ERROR] + " ..."
