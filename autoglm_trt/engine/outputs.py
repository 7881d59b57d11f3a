"""What the model runner hands back for a step, and what the engine hands back: per-request deltas and
engine-wide statistics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from autoglm_trt.layers.sampler import TokenLogprob


@dataclass
class ModelOutput:
    token_ids: list[list[int]]  # per scheduled row: the tokens it produced ([] for a chunk that does not sample)
    logprobs: list[list[TokenLogprob]] | None = None  # per scheduled row, one per token, when any row asked


class StepFuture:
    """A step launched on the device: `result()` waits for its tokens (a window's come back in one copy)."""

    def __init__(self, fetch: Callable[[], ModelOutput | None]) -> None:
        self._fetch, self._value = fetch, None

    @classmethod
    def done(cls, value: ModelOutput | None) -> "StepFuture":
        future = cls(lambda: value)
        return future

    def result(self) -> ModelOutput | None:
        if self._fetch is not None:
            self._value, self._fetch = self._fetch(), None
        return self._value


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]  # tokens produced since the last output of this request
    new_text: str  # their text, incremental; stop strings trimmed, partial stop-string prefixes held back
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int  # prompt tokens served by the prefix cache
    logprobs: list[TokenLogprob] | None = None  # one per new token, when asked for
    stop_reason: str | int | None = None  # the stop string or token that ended it, if any
    first_scheduled_time: float | None = None  # time.monotonic() when its prompt first ran (queue time ends)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of KV blocks in use, 0..1
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of which found
    block_size: int = 16
    spec: Any = None  # speculative decoding's counters (engine.speculative.SpecStats), None when it is off

    @property
    def kv_blocks_in_use(self) -> int:
        return self.num_total_blocks - self.num_free_blocks
