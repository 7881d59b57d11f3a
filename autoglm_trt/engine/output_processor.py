"""A step's tokens -> per-request outputs: incremental text, stop strings, logprobs.

Stop strings are found in text, which only exists here: when one completes at some token of a
multi-token step (a window), the scheduler drops the tokens after it and finishes the request, so
the client gets exactly what one-token steps would have given.
"""

from __future__ import annotations

from autoglm_trt.engine.detokenize import TextState, new_text_state
from autoglm_trt.engine.outputs import ModelOutput, RequestOutput
from autoglm_trt.engine.scheduler import Scheduler, SchedulerOutput
from autoglm_trt.engine.sequence import Sequence
from autoglm_trt.processing.tokenizer import Tokenizer


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, scheduler: Scheduler) -> None:
        self.tokenizer, self.scheduler = tokenizer, scheduler
        self._text: dict[str, TextState] = {}
        self._sent: dict[str, int] = {}  # output tokens already handed out, per request

    def add(self, seq: Sequence) -> None:
        p = seq.params
        self._text[seq.request_id] = new_text_state(self.tokenizer, seq.prompt_token_ids, p.stop,
                                                    p.skip_special_tokens)
        self._sent[seq.request_id] = 0

    def drop(self, request_id: str) -> None:
        self._text.pop(request_id, None)
        self._sent.pop(request_id, None)

    def text_state(self, request_id: str) -> TextState | None:
        return self._text.get(request_id)

    def process(self, out: SchedulerOutput, result: ModelOutput) -> list[RequestOutput]:
        """One RequestOutput per row that produced tokens this step (after scheduler.update)."""
        outputs = []
        for i, sch in enumerate(out.scheduled):
            if sch.samples and sch.seq.request_id in self._text:
                outputs.append(self._output_for(sch.seq, result.logprobs[i] if result.logprobs else None))
        return outputs

    def _output_for(self, seq: Sequence, logprobs: list | None) -> RequestOutput:
        rid = seq.request_id
        state, sent = self._text[rid], self._sent[rid]
        new_ids = seq.output_token_ids[sent:]
        # NOTE: as vLLM does, the token that stopped the request (an eos or stop id) adds no text
        by_token = seq.finish_reason == "stop" and state.stopped_by is None and bool(new_ids)
        fed = new_ids[:-1] if by_token else new_ids
        text, kept = _feed(state, fed)
        kept = len(new_ids) if kept == len(fed) else kept
        if kept < len(new_ids):  # a stop string completed before the step's last token
            self.scheduler.finish_at(seq, sent + kept)
            new_ids, logprobs = new_ids[:kept], logprobs[:kept] if logprobs else logprobs
        elif state.stopped_by is not None and not seq.is_finished:
            self.scheduler.finish(seq, "stop")
        self._sent[rid] = seq.num_output_tokens
        if seq.is_finished:
            text += state.flush()
            self.drop(rid)
        stop = state.stopped_by or (seq.last_token if seq.finish_reason == "stop" else None)
        return RequestOutput(rid, new_ids, text, seq.is_finished, seq.finish_reason, seq.num_prompt_tokens,
                             seq.num_output_tokens, seq.num_cached_tokens, logprobs or None,
                             stop if seq.is_finished else None, seq.first_scheduled_time)


def _feed(state: TextState, new_ids: list[int]) -> tuple[str, int]:
    """Text of new_ids safe to emit, and how many of them count: all, unless a stop string completes
    earlier (tokens are then fed one at a time to find the one that completed it)."""
    if not state.stops or len(new_ids) < 2:
        return state.feed(new_ids), len(new_ids)
    text = ""
    for i, tok in enumerate(new_ids):
        text += state.feed([tok])
        if state.stopped_by is not None:
            return text, i + 1
    return text, len(new_ids)
