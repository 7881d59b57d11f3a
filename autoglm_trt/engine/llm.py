"""Offline API: `LLM(model_dir).generate(prompts, SamplingParams)` and `.chat(messages)`, over LLMEngine."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from autoglm_trt.config import EngineArgs
from autoglm_trt.engine.llm_engine import LLMEngine
from autoglm_trt.engine.outputs import RequestOutput
from autoglm_trt.engine.sampling_params import SamplingParams
from autoglm_trt.processing.inputs import ProcessedPrompt

Messages = list[dict]


@dataclass
class CompletionOutput:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    logprobs: list | None = None


class LLM:
    def __init__(self, model_dir: str, **engine_kwargs) -> None:
        """engine_kwargs: config.EngineArgs's fields (vLLM's names: max_model_len, tensor_parallel_size, ...)."""
        self.engine = LLMEngine(EngineArgs(str(model_dir), **engine_kwargs).create_engine_config())
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def _prompt(self, p: str | ProcessedPrompt | Messages, chat_kwargs: dict | None) -> ProcessedPrompt:
        if isinstance(p, ProcessedPrompt):
            return p
        if isinstance(p, _ChatPrompt):
            p = p.messages
        elif isinstance(p, str):
            return self.engine.processor.process_text(p)
        return self.engine.processor.process_chat(p, chat_template_kwargs=chat_kwargs)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 chat_template_kwargs: dict | None = None) -> list[CompletionOutput]:
        """Run all prompts to completion with continuous batching; results in input order."""
        prompts = prompts if isinstance(prompts, list) and not _is_messages(prompts) else [prompts]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        order, results = [], {}
        for p, sp in zip(prompts, params_list):
            rid = f"offline-{next(self._ids)}"
            self.engine.add_request(rid, self._prompt(p, chat_template_kwargs), sp)
            order.append(rid)
            results[rid] = CompletionOutput(rid, "", [], None, 0, 0, [] if sp.logprobs is not None else None)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                _accumulate(results[out.request_id], out)
        return [results[r] for r in order]

    def chat(self, messages: Messages | list[Messages], params: SamplingParams | None = None,
             chat_template_kwargs: dict | None = None) -> list[CompletionOutput]:
        convs = [messages] if _is_messages(messages) else messages
        return self.generate([_ChatPrompt(c) for c in convs], params, chat_template_kwargs)

    def stream(self, prompt, params: SamplingParams | None = None,
               chat_template_kwargs: dict | None = None) -> Iterator[RequestOutput]:
        """Yield one request's outputs as they are produced (tokens and incremental text)."""
        rid = f"offline-{next(self._ids)}"
        self.engine.add_request(rid, self._prompt(prompt, chat_template_kwargs), params or SamplingParams())
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(rid)


@dataclass
class _ChatPrompt:
    messages: Messages


def _is_messages(x) -> bool:
    return isinstance(x, list) and bool(x) and isinstance(x[0], dict)


def _accumulate(res: CompletionOutput, out: RequestOutput) -> None:
    res.text += out.new_text
    res.token_ids += out.new_token_ids
    res.num_prompt_tokens, res.num_cached_tokens = out.num_prompt_tokens, out.num_cached_tokens
    if res.logprobs is not None and out.logprobs:
        res.logprobs += out.logprobs
    if out.finished:
        res.finish_reason = out.finish_reason
