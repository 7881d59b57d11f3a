"""A scripted stand-in for LLMEngine, for unit tests of the HTTP/gRPC layers only.

It honours the engine API the server uses (add_request / abort_request / step /
has_unfinished_requests / get_stats, tokenizer, processor, config) and "generates" a fixed script
one character per step, so tests can check SSE framing, reasoning splitting, n fan-out, aborts and
KV accounting deterministically. The end-to-end tests use the real engine, never this.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from autoglm_trt.engine.outputs import EngineStats, RequestOutput
from autoglm_trt.errors import RequestError, UserError
from autoglm_trt.layers.sampler import TokenLogprob

IMAGE_TOKEN = 9999
BLOCK = 4  # tokens per fake KV block


class CharTokenizer:
    """One token per character (token id = code point)."""

    eos_token_ids = [0]
    backend = None
    added_token_ids = frozenset()
    max_token_chars = 1

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i != IMAGE_TOKEN)


@dataclass
class FakePrompt:
    prompt_token_ids: list[int]
    images: list = field(default_factory=list)
    prompt_text: str | None = None


class FakeProcessor:
    def __init__(self, tokenizer: CharTokenizer) -> None:
        self.tokenizer = tokenizer
        self.calls: list[dict] = []  # what the server passed, for assertions

    def process_chat(self, messages: list[dict], chat_template_kwargs: dict | None = None,
                     max_pixels: int | None = None, add_generation_prompt: bool = True) -> FakePrompt:
        self.calls.append({"messages": messages, "chat_template_kwargs": chat_template_kwargs,
                           "max_pixels": max_pixels})
        ids: list[int] = []
        images = []
        for m in messages:
            ids += self.tokenizer.encode(f"<{m['role']}>")
            content = m["content"]
            if isinstance(content, str):
                if "RAISE_USER_ERROR" in content:
                    raise UserError("the template refused this message")
                ids += self.tokenizer.encode(content)
                continue
            for part in content:
                if part["type"] == "text":
                    ids += self.tokenizer.encode(part["text"])
                else:
                    images.append(part["image"])
                    ids += [IMAGE_TOKEN] * 4
        return FakePrompt(ids, images)

    def process_text(self, prompt: str) -> FakePrompt:
        return FakePrompt(self.tokenizer.encode(prompt), prompt_text=prompt)

    def process_ids(self, ids: list[int]) -> FakePrompt:
        return FakePrompt(list(ids))


@dataclass
class _Req:
    prompt: FakePrompt
    params: Any
    out: list[int] = field(default_factory=list)
    first_scheduled: float | None = None  # time.monotonic() of its first step


class FakeEngine:
    """Generates `script` (one char per step) for every request; blocks of BLOCK tokens."""

    def __init__(self, script: str = "<think>hmm</think><answer>do(action=\"Tap\")</answer>",
                 max_model_len: int = 4096, max_num_seqs: int = 8, num_blocks: int = 4096,
                 step_delay: float = 0.001) -> None:
        self.script = script
        self.step_delay = step_delay
        self.tokenizer = CharTokenizer()
        self.processor = FakeProcessor(self.tokenizer)
        self.model_config = SimpleNamespace(text=SimpleNamespace(vocab_size=200_000))
        self.config = SimpleNamespace(scheduler=SimpleNamespace(max_model_len=max_model_len,
                                                                max_num_seqs=max_num_seqs),
                                      cache=SimpleNamespace(block_size=BLOCK))
        self.num_blocks = num_blocks
        self.requests: dict[str, _Req] = {}
        self.added: list[str] = []
        self.aborted: list[str] = []
        self.fail_next_step = False
        self.thread_ids: set[int] = set()  # which threads touched the engine (must be one)

    def _touch(self) -> None:
        self.thread_ids.add(threading.get_ident())

    def add_request(self, request_id: str, prompt: FakePrompt, params: Any) -> None:
        self._touch()
        n, limit = len(prompt.prompt_token_ids), self.config.scheduler.max_model_len
        if n + params.max_tokens > limit:
            raise RequestError(f"this request needs {n} prompt tokens + max_tokens {params.max_tokens} = "
                               f"{n + params.max_tokens} tokens, but max_model_len is {limit}",
                               param="max_tokens")
        self.requests[request_id] = _Req(prompt, params)
        self.added.append(request_id)

    def abort_request(self, request_id: str) -> None:
        self._touch()
        if self.requests.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        self._touch()
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("simulated kernel failure")
        time.sleep(self.step_delay)
        outputs = []
        running = list(self.requests.items())[: self.config.scheduler.max_num_seqs]
        for rid, req in running:
            req.first_scheduled = req.first_scheduled or time.monotonic() - self.step_delay
            outputs.append(self._advance(rid, req))
        return outputs

    def _advance(self, rid: str, req: _Req) -> RequestOutput:
        i = len(req.out)
        tok = ord(self.script[i % len(self.script)])
        req.out.append(tok)
        text = chr(tok)
        reason = None
        if len(req.out) >= req.params.max_tokens:
            reason = "length"
        elif len(req.out) >= len(self.script) and not req.params.ignore_eos:
            reason = "stop"
        for stop in req.params.stop:
            if self.tokenizer.decode(req.out).endswith(stop):
                reason, text = "stop", ""
        lp = None
        if req.params.logprobs is not None:
            lp = [TokenLogprob(tok, -0.5, [(tok, -0.5), (tok + 1, -1.5)][: req.params.logprobs])]
        if reason:
            del self.requests[rid]
        return RequestOutput(rid, [tok], text, reason is not None, reason, len(req.prompt.prompt_token_ids),
                             len(req.out), 0, lp, first_scheduled_time=req.first_scheduled)

    def blocks_in_use(self) -> int:
        return sum(-(-(len(r.prompt.prompt_token_ids) + len(r.out)) // BLOCK) for r in self.requests.values())

    def get_stats(self) -> EngineStats:
        used = self.blocks_in_use()
        running = min(len(self.requests), self.config.scheduler.max_num_seqs)
        return EngineStats(running, len(self.requests) - running, used / self.num_blocks,
                           self.num_blocks - used, self.num_blocks, 100, 25, BLOCK)
