"""POST /v1/chat/completions: messages -> prompt -> n engine requests -> one response or an SSE stream."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from autoglm_trt.processing.reasoning import ReasoningStream, split as split_reasoning
from autoglm_trt.serve.async_engine import RequestStream, merge_outputs
from autoglm_trt.serve.errors import ServeError, body_for
from autoglm_trt.serve.openai import protocol as P
from autoglm_trt.serve.openai import structured as S
from autoglm_trt.serve.openai.logprobs import chat_logprobs, token_id_text
from autoglm_trt.serve.openai.messages import check_parts, text_chars, to_engine_messages
from autoglm_trt.serve.openai.prompt import run_processor
from autoglm_trt.serve.openai.sampling import sampling_params
from autoglm_trt.serve.openai.sse import DONE, StreamingResult, event
from autoglm_trt.serve.state import ServeState


@dataclass
class _Run:
    """One chat request in flight: its ids, options and the per-choice accumulators."""

    state: ServeState
    request_id: str
    streams: list[RequestStream]
    top_logprobs: int | None
    want_reasoning: bool
    include_usage: bool = False
    token_ids_as_text: bool = False
    structured: S.StructuredRequest = S.StructuredRequest(None)
    created: int = field(default_factory=P.now)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.num_output_tokens = [0] * len(self.streams)

    def account(self, i: int, out: Any) -> None:
        self.num_prompt_tokens = out.num_prompt_tokens
        self.num_cached_tokens = out.num_cached_tokens
        self.num_output_tokens[i] = out.num_output_tokens

    def usage(self) -> dict:
        return P.usage(self.num_prompt_tokens, sum(self.num_output_tokens), self.num_cached_tokens)

    def logprobs(self, entries: list | None) -> dict | None:
        if self.top_logprobs is None or not entries:
            return None
        token_text = token_id_text if self.token_ids_as_text else self.state.token_text
        return chat_logprobs(entries, token_text, self.top_logprobs)


async def create_chat_completion(state: ServeState, req: P.ChatCompletionRequest) -> dict | StreamingResult:
    """The response JSON, or (stream=True) the SSE events; errors raise ServeError."""
    state.check_model(req.model)
    engine = state.engine
    check_parts(req.messages, state.config.limit_images_per_prompt)
    state.check_prompt_chars(text_chars(req.messages), "messages")
    spec = S.structured_request(req, S.after_reasoning(state.config, req), state.config.constrain_actions)
    prompt = await state.preprocess(lambda: (S.validate(spec, engine), _build_prompt(state, engine, req))[1])
    top = (req.top_logprobs or 0) if req.logprobs else None
    params = S.attach(sampling_params(req, req.max_completion_tokens or req.max_tokens, top,
                                      len(prompt.prompt_token_ids), state.max_model_len), spec)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    ids = [request_id if req.n == 1 else f"{request_id}-{i}" for i in range(req.n)]
    state.log_request(request_id, prompt, params[0], req.stream)
    streams = await state.client.add_requests([(rid, prompt, p) for rid, p in zip(ids, params)])
    want_reasoning = bool(req.return_reasoning) or state.config.reasoning_parser is not None
    run = _Run(state, request_id, streams, top, want_reasoning,
               include_usage=bool(req.stream_options and req.stream_options.include_usage),
               token_ids_as_text=req.return_tokens_as_token_ids, structured=spec)
    run.num_prompt_tokens = len(prompt.prompt_token_ids)
    if req.stream:
        return StreamingResult(_stream(run), lambda: _abort_all(state, streams))
    return await _collect(run)


def _abort_all(state: ServeState, streams: list[RequestStream]) -> None:
    for stream in streams:
        state.client.abort(stream.request_id)


def _build_prompt(state: ServeState, engine: Any, req: P.ChatCompletionRequest) -> Any:
    """Blocking (images are decoded here): run in a worker thread."""
    messages = to_engine_messages(req.messages, state.media)
    kwargs = dict(req.chat_template_kwargs or {})
    if req.enable_thinking is not None:
        kwargs.setdefault("enable_thinking", req.enable_thinking)  # NOTE: chat_template_kwargs wins
    max_pixels = state.config.max_pixels
    if req.mm_processor_kwargs is not None and req.mm_processor_kwargs.max_pixels is not None:
        max_pixels = req.mm_processor_kwargs.max_pixels
    return run_processor(lambda: engine.processor.process_chat(
        messages, chat_template_kwargs=kwargs, max_pixels=max_pixels))


async def _collect(run: _Run) -> dict:
    n = len(run.streams)
    texts, entries, finish = [""] * n, [[] for _ in range(n)], [None] * n
    async for i, out in merge_outputs(run.state.client, run.streams):
        run.account(i, out)
        texts[i] += out.new_text
        entries[i] += out.logprobs or []
        if out.finished:
            finish[i] = out.finish_reason
    choices = []
    for i in range(n):
        reasoning, content = split_reasoning(texts[i]) if run.want_reasoning else (None, texts[i])
        choice = P.chat_choice(i, content, reasoning, finish[i], run.logprobs(entries[i]))
        choices.append(S.finish_choice(choice, run.structured))
    return P.chat_completion(run.request_id, run.state.config.served_model_name, run.created,
                             choices, run.usage())


async def _stream(run: _Run) -> AsyncIterator[bytes]:
    model = run.state.config.served_model_name
    splitters = [ReasoningStream() if run.want_reasoning else None for _ in run.streams]
    tools = [S.ToolCallStream(run.structured) if run.structured.tool_mode else None for _ in run.streams]

    def chunk(choices: list[dict], usage: dict | None = None) -> bytes:
        return event(P.chat_chunk(run.request_id, model, run.created, choices, usage, run.include_usage))

    try:
        for i in range(len(run.streams)):
            yield chunk([P.chunk_choice(i, P.delta(role="assistant", content=""))])
        async for i, out in merge_outputs(run.state.client, run.streams):
            run.account(i, out)
            d = _delta(splitters[i], out.new_text, out.finished)
            finish = out.finish_reason if out.finished else None
            if tools[i] is not None:
                d, finish = tools[i].transform(d, out.finished), tools[i].finish_reason(finish)
            lp = run.logprobs(out.logprobs)
            if d or finish or lp:
                yield chunk([P.chunk_choice(i, d, finish, lp)])
        if run.include_usage:
            yield chunk([], run.usage())
    except ServeError as exc:  # NOTE: the status line is sent already; report in the stream
        yield event(body_for(exc))
    yield DONE


def _delta(splitter: ReasoningStream | None, text: str, finished: bool) -> dict:
    if splitter is None:
        return P.delta(content=text) if text else {}
    reasoning, content = splitter.feed(text)
    if finished:
        r2, c2 = splitter.finish()
        reasoning, content = reasoning + r2, content + c2
    return P.delta(content=content or None, reasoning=reasoning or None)
