"""OpenAI request fields -> the engine's SamplingParams (one per choice when n > 1)."""

from __future__ import annotations

from typing import Any

from autoglm_trt.engine.sampling_params import SamplingParams
from autoglm_trt.serve.errors import ServeError

# request field -> SamplingParams field, for the fields copied when present
_SAME = ("temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
         "repetition_penalty", "ignore_eos", "skip_special_tokens")


def default_max_tokens(num_prompt_tokens: int, max_model_len: int) -> int:
    """OpenAI's 'until the context is full' when the request sets no max_tokens."""
    return max(max_model_len - num_prompt_tokens, 1)


def sampling_params(req: Any, max_tokens: int | None, logprobs: int | None,
                    num_prompt_tokens: int, max_model_len: int) -> list[SamplingParams]:
    """The n SamplingParams of one request; a bad value is a 400 naming the field."""
    if num_prompt_tokens >= max_model_len:
        raise ServeError(f"the prompt has {num_prompt_tokens} tokens, but max_model_len is {max_model_len} "
                         "(prompt + generated tokens); shorten the prompt or use smaller images",
                         param="messages" if hasattr(req, "messages") else "prompt")
    if req.logit_bias:
        raise ServeError("logit_bias is not supported by this server", param="logit_bias")
    kwargs: dict[str, Any] = {k: getattr(req, k) for k in _SAME if getattr(req, k) is not None}
    kwargs["max_tokens"] = max_tokens or default_max_tokens(num_prompt_tokens, max_model_len)
    if req.stop is not None:
        kwargs["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    if req.stop_token_ids:
        kwargs["stop_token_ids"] = list(req.stop_token_ids)
    if logprobs is not None:
        kwargs["logprobs"] = logprobs
    params = []
    for i in range(req.n):
        seed = None if req.seed is None else req.seed + i  # NOTE: n seeded choices still differ
        try:
            params.append(SamplingParams(seed=seed, **kwargs))
        except ValueError as exc:
            raise ServeError(str(exc), param=str(exc).split(" ", 1)[0]) from None
    return params
