"""POST /v1/completions: raw prompts (no chat template), one or a batch, n choices each."""

from __future__ import annotations

import uuid
from typing import Any, AsyncIterator

from autoglm_trt.serve.async_engine import merge_outputs
from autoglm_trt.serve.errors import ServeError, body_for
from autoglm_trt.serve.openai import protocol as P
from autoglm_trt.serve.openai import structured as S
from autoglm_trt.serve.openai.logprobs import CompletionLogprobs, token_id_text
from autoglm_trt.serve.openai.prompt import run_processor
from autoglm_trt.serve.openai.sampling import sampling_params
from autoglm_trt.serve.openai.sse import DONE, StreamingResult, event
from autoglm_trt.serve.state import ServeState

MAX_BATCH = 64


def _prompts(req: P.CompletionRequest) -> list[str | list[int]]:
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise ServeError("prompt must not be empty", param="prompt")
    if all(isinstance(x, int) for x in p):
        return [list(p)]
    if len(p) > MAX_BATCH:
        raise ServeError(f"at most {MAX_BATCH} prompts per request, got {len(p)}", param="prompt")
    return list(p)


def _process(engine: Any, prompt: str | list[int]) -> Any:
    if isinstance(prompt, str):
        return run_processor(lambda: engine.processor.process_text(prompt))
    vocab = engine.model_config.text.vocab_size
    if not prompt or any(t < 0 or t >= vocab for t in prompt):
        raise ServeError(f"prompt token ids must be in [0, {vocab})", param="prompt")
    return run_processor(lambda: engine.processor.process_ids(prompt))


async def create_completion(state: ServeState, req: P.CompletionRequest) -> dict | StreamingResult:
    state.check_model(req.model)
    engine = state.engine
    if req.suffix:
        raise ServeError("suffix is not supported by this model", param="suffix")
    prompts = _prompts(req)
    state.check_prompt_chars(max((len(p) for p in prompts if isinstance(p, str)), default=0), "prompt")
    spec = S.structured_request(req)
    processed = await state.preprocess(lambda: (S.validate(spec, engine), [_process(engine, p) for p in prompts])[1])
    request_id = f"cmpl-{uuid.uuid4().hex}"
    items = []
    for k, prompt in enumerate(processed):
        params = S.attach(sampling_params(req, req.max_tokens or 16, req.logprobs,
                                          len(prompt.prompt_token_ids), state.max_model_len), spec)
        items += [(f"{request_id}-{k * req.n + i}", prompt, p) for i, p in enumerate(params)]
        state.log_request(f"{request_id}-{k}", prompt, params[0], req.stream)
    streams = await state.client.add_requests(items)
    echo = [_echo_text(engine, p, prompts[k]) if req.echo else "" for k, p in enumerate(processed)
            for _ in range(req.n)]
    num_prompt = sum(len(p.prompt_token_ids) for p in processed)
    token_text = token_id_text if req.return_tokens_as_token_ids else state.token_text
    lps = [CompletionLogprobs(token_text, req.logprobs, len(e)) if req.logprobs is not None else None
           for e in echo]
    args = (state, req, request_id, streams, echo, lps, num_prompt)
    if req.stream:
        return StreamingResult(_stream(*args), lambda: [state.client.abort(s.request_id) for s in streams])
    return await _collect(*args)


def _echo_text(engine: Any, processed: Any, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt, skip_special_tokens=False)


async def _collect(state, req, request_id, streams, echo, lps, num_prompt) -> dict:
    n = len(streams)
    texts, finish, lp_out, outputs = list(echo), [None] * n, [None] * n, [0] * n
    async for i, out in merge_outputs(state.client, streams):
        texts[i] += out.new_text
        outputs[i] = out.num_output_tokens
        if lps[i] is not None and out.logprobs:
            lp_out[i] = _extend(lp_out[i], lps[i].format(out.logprobs))
        if out.finished:
            finish[i] = out.finish_reason
    choices = [P.completion_choice(i, texts[i], finish[i], lp_out[i]) for i in range(n)]
    return P.completion(request_id, state.config.served_model_name, P.now(), choices,
                        P.usage(num_prompt, sum(outputs)))


async def _stream(state, req, request_id, streams, echo, lps, num_prompt) -> AsyncIterator[bytes]:
    model, created = state.config.served_model_name, P.now()
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    outputs = [0] * len(streams)

    def chunk(choices: list[dict], usage: dict | None = None) -> bytes:
        return event(P.completion(request_id, model, created, choices, usage, chunk=True,
                                  with_usage_field=include_usage))

    try:
        for i, text in enumerate(echo):
            if text:
                yield chunk([P.completion_choice(i, text, None, None)])
        async for i, out in merge_outputs(state.client, streams):
            outputs[i] = out.num_output_tokens
            lp = lps[i].format(out.logprobs) if lps[i] is not None and out.logprobs else None
            finish = out.finish_reason if out.finished else None
            if out.new_text or finish or lp:
                yield chunk([P.completion_choice(i, out.new_text, finish, lp)])
        if include_usage:
            yield chunk([], P.usage(num_prompt, sum(outputs)))
    except ServeError as exc:
        yield event(body_for(exc))
    yield DONE


def _extend(acc: dict | None, new: dict) -> dict:
    if acc is None:
        return new
    for key, values in new.items():
        acc[key] += values
    return acc
