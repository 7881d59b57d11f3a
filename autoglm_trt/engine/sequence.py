"""One request as the scheduler sees it: token ids, images, KV blocks and progress. No torch here."""

from __future__ import annotations

import enum
import time
from typing import Any, Sequence as SequenceLike

from autoglm_trt.engine.sampling_params import SamplingParams

ImageSpan = tuple[int, int, str]  # (start, end, content_hash): prompt positions [start, end) of one image


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # never scheduled yet
    RUNNING = "running"  # holds KV blocks; computed tokens are catching up with total tokens
    PREEMPTED = "preempted"  # was running, lost its blocks; waits to be recomputed
    FINISHED_STOPPED = "finished_stopped"  # eos, a stop token or a stop string (reason "stop")
    FINISHED_LENGTH = "finished_length"  # max_tokens, max_model_len or KV capacity (reason "length")
    FINISHED_ABORTED = "finished_aborted"  # aborted by the client (reason "abort")

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH,
             SequenceStatus.FINISHED_ABORTED}
FINISH_STATUS = {"stop": SequenceStatus.FINISHED_STOPPED, "length": SequenceStatus.FINISHED_LENGTH,
                 "abort": SequenceStatus.FINISHED_ABORTED}


def _check_spans(spans: list[ImageSpan], num_prompt_tokens: int) -> None:
    prev_end = 0
    for start, end, _ in spans:
        if not prev_end <= start < end <= num_prompt_tokens:
            raise ValueError(f"image_spans must be sorted, non-empty, non-overlapping and inside "
                             f"the {num_prompt_tokens} prompt tokens, got {spans}")
        prev_end = end


class Sequence:
    """One request (n > 1 is fanned out by the API layer). Mutated by the scheduler only."""

    def __init__(self, request_id: str, prompt_token_ids: SequenceLike[int],
                 params: SamplingParams | None = None, *, images: SequenceLike[Any] = (),
                 image_spans: SequenceLike[ImageSpan] = (), mrope_positions: Any = None,
                 mrope_delta: int = 0, arrival_time: float | None = None) -> None:
        if len(prompt_token_ids) == 0:
            raise ValueError(f"request {request_id}: the prompt has no tokens")
        if len(images) != len(image_spans):
            raise ValueError(f"request {request_id}: {len(images)} images but "
                             f"{len(image_spans)} image_spans")
        self.request_id = request_id
        self.params = params if params is not None else SamplingParams()
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt + output, grows by append_token
        self.images: list[Any] = list(images)  # opaque to the engine core; each has `content_hash`
        self.image_spans: list[ImageSpan] = [tuple(s) for s in image_spans]
        _check_spans(self.image_spans, len(self.prompt_token_ids))
        self.mrope_positions = mrope_positions  # [3, L] int64 tensor-like (runner's business) or None
        self.mrope_delta = mrope_delta  # position of token i >= L is i + mrope_delta on all 3 axes
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None  # time.monotonic() of its first step (queue time ends)
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None  # "stop" | "length" | "abort"
        self.num_computed_tokens = 0  # tokens whose KV is in the cache (or will be after this step)
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at first schedule
        self.block_table: list[int] = []  # KV block ids, covering num_computed_tokens (+ this step)
        self.block_hashes: list[bytes] = []  # chained hashes of full blocks (filled by BlockManager)
        self.grammar: Any = None  # structured outputs: the request's grammar state (engine/constraints.py)
        self.mask_next = False  # a window's tokens were cut by the grammar: the next one comes masked

    @classmethod
    def from_prompt(cls, request_id: str, prompt: Any, params: SamplingParams | None,
                    arrival_time: float | None = None) -> "Sequence":
        """Build from a `processing.ProcessedPrompt` (prompt_token_ids, images and their image_spans,
        mrope_positions/delta)."""
        return cls(request_id, prompt.prompt_token_ids, params, images=prompt.images,
                   image_spans=prompt.image_spans, mrope_positions=prompt.mrope_positions,
                   mrope_delta=prompt.mrope_delta, arrival_time=arrival_time)

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, status={self.status.name}, "
                f"tokens={self.num_prompt_tokens}+{self.num_output_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.output_token_ids.append(token_id)

    def image_indices(self, start: int, end: int) -> list[int]:
        """Indices of the images whose spans overlap token positions [start, end)."""
        return [i for i, (s, e, _) in enumerate(self.image_spans) if s < end and start < e]

    def block_hash_extra(self, start: int, end: int) -> tuple[str, ...]:
        """Content hashes of the images overlapping [start, end): part of a KV block's identity."""
        return tuple(self.image_spans[i][2] for i in self.image_indices(start, end))

    def decode_position(self, index: int) -> int:
        """M-RoPE position (same on t/h/w) of token `index`; prompt positions come from mrope_positions."""
        if index < self.num_prompt_tokens and self.mrope_positions is not None:
            raise ValueError(f"token {index} is in the prompt: read its position from mrope_positions")
        return index + self.mrope_delta
