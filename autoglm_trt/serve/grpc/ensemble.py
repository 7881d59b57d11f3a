"""The tensors of Triton's TensorRT-LLM "ensemble" model, mapped onto our engine.

Clients written for `tritonclient.grpc` + TensorRT-LLM send text_input (BYTES), max_tokens,
stream, temperature, top_p, top_k, stop_words, ... and read text_output. Sampling follows
TensorRT-LLM's rules: with neither top_k nor top_p set (or both 0) decoding is greedy.
text_output holds the generated text only, unless exclude_input_in_output is sent as false.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from autoglm_trt.engine.sampling_params import SamplingParams
from autoglm_trt.serve.errors import ServeError
from autoglm_trt.serve.openai.structured import guided_decoding

MODEL_PLATFORM = "ensemble"
# name -> (datatype, shape) as ModelMetadata reports them; all optional except text_input
INPUTS = {
    "text_input": ("BYTES", [-1, 1]), "max_tokens": ("INT32", [-1, 1]), "stream": ("BOOL", [-1, 1]),
    "temperature": ("FP32", [-1, 1]), "top_p": ("FP32", [-1, 1]), "top_k": ("INT32", [-1, 1]),
    "min_p": ("FP32", [-1, 1]), "stop_words": ("BYTES", [-1, -1]), "bad_words": ("BYTES", [-1, -1]),
    "end_id": ("INT32", [-1, 1]), "pad_id": ("INT32", [-1, 1]), "beam_width": ("INT32", [-1, 1]),
    "random_seed": ("UINT64", [-1, 1]), "repetition_penalty": ("FP32", [-1, 1]),
    "presence_penalty": ("FP32", [-1, 1]), "frequency_penalty": ("FP32", [-1, 1]),
    "length_penalty": ("FP32", [-1, 1]), "min_length": ("INT32", [-1, 1]),
    "return_log_probs": ("BOOL", [-1, 1]), "return_context_logits": ("BOOL", [-1, 1]),
    "return_generation_logits": ("BOOL", [-1, 1]), "exclude_input_in_output": ("BOOL", [-1, 1]),
    "embedding_bias_words": ("BYTES", [-1, -1]), "embedding_bias_weights": ("FP32", [-1, -1]),
    # TensorRT-LLM's guided decoding: json | json_schema | regex | ebnf_grammar (serve/openai/structured.py)
    "guided_decoding_guide_type": ("BYTES", [-1, 1]), "guided_decoding_guide": ("BYTES", [-1, 1]),
}
OUTPUTS = {"text_output": ("BYTES", [-1, -1]), "cum_log_probs": ("FP32", [-1, -1]),
           "output_log_probs": ("FP32", [-1, -1, -1])}
_FLOATS = ("temperature", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


@dataclass
class EnsembleRequest:
    """One ModelInferRequest as engine work: a prompt and SamplingParams per batch row."""

    prompts: list[str]
    params: list[SamplingParams]
    stream: bool  # decoupled: one response per generated chunk (ModelStreamInfer only)
    include_input: bool  # text_output starts with the prompt (non-streaming only)
    outputs: list[str]  # output tensors to send, in order
    text_ndim: int  # rank of text_input, mirrored by text_output


def _rows(arr: np.ndarray, batch: int) -> np.ndarray:
    """[batch, k] view of a per-row input, or [1, k] for one value shared by all rows."""
    if arr.ndim >= 1 and arr.shape[0] == batch:
        return arr.reshape(batch, -1)
    return arr.reshape(1, -1)


def _row(arrays: dict[str, np.ndarray], name: str, i: int, batch: int) -> Any:
    """The value of input `name` for batch row i; None when absent."""
    arr = arrays.get(name)
    if arr is None or arr.size == 0:
        return None
    rows = _rows(arr, batch)
    value = rows[min(i, rows.shape[0] - 1)][0]
    return value if isinstance(value, bytes) else value.item()


def _words(arrays: dict[str, np.ndarray], name: str, i: int, batch: int) -> list[str]:
    arr = arrays.get(name)
    if arr is None or arr.size == 0:
        return []
    rows = _rows(arr, batch)
    return [w.decode("utf-8", "replace") for w in rows[min(i, rows.shape[0] - 1)]
            if isinstance(w, bytes) and w]


def _check_supported(arrays: dict[str, np.ndarray], i: int, batch: int) -> None:
    def val(name: str) -> Any:
        return _row(arrays, name, i, batch)

    if (val("beam_width") or 1) > 1:
        raise ServeError("beam_width > 1 is not supported (sampling or greedy only)", param="beam_width")
    if _words(arrays, "bad_words", i, batch):
        raise ServeError("bad_words is not supported by this server", param="bad_words")
    if _words(arrays, "embedding_bias_words", i, batch):
        raise ServeError("embedding_bias_words is not supported", param="embedding_bias_words")
    if (val("min_length") or 0) > 1:
        raise ServeError("min_length > 1 is not supported", param="min_length")
    for name in ("return_context_logits", "return_generation_logits"):
        if val(name):
            raise ServeError(f"{name} is not supported", param=name)


def _params(arrays: dict[str, np.ndarray], i: int, batch: int, num_prompt: int,
            max_model_len: int) -> SamplingParams:
    def val(name: str) -> Any:
        return _row(arrays, name, i, batch)

    _check_supported(arrays, i, batch)
    top_k, top_p = int(val("top_k") or 0), float(val("top_p") or 0.0)
    kwargs: dict[str, Any] = {k: float(val(k)) for k in _FLOATS if val(k) is not None}
    if top_k <= 0 and top_p <= 0:
        kwargs["temperature"] = 0.0  # NOTE: TensorRT-LLM's default is greedy
    kwargs["top_k"] = max(top_k, 0)
    kwargs["top_p"] = top_p if 0 < top_p <= 1 else 1.0
    max_tokens = val("max_tokens")
    kwargs["max_tokens"] = int(max_tokens) if max_tokens is not None else min(256, max(max_model_len - num_prompt, 1))
    if val("random_seed") is not None:
        kwargs["seed"] = int(val("random_seed"))
    if val("end_id") is not None:
        kwargs["stop_token_ids"] = [int(val("end_id"))]
    kwargs["stop"] = _words(arrays, "stop_words", i, batch)
    if val("return_log_probs"):
        kwargs["logprobs"] = 0
    guide_type, guide = val("guided_decoding_guide_type"), val("guided_decoding_guide")
    if guide_type:
        kwargs["structured_outputs"] = guided_decoding(guide_type.decode("utf-8", "replace"),
                                                       guide.decode("utf-8", "replace") if guide else None)
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise ServeError(str(exc)) from None


def prompts_of(arrays: dict[str, np.ndarray]) -> list[str]:
    """The prompts of text_input (one per batch row); checks the input names first."""
    unknown = sorted(set(arrays) - set(INPUTS))
    if unknown:
        raise ServeError(f"unexpected inputs {unknown}; this model takes {sorted(INPUTS)}")
    for name, arr in arrays.items():  # NOTE: numbers may come in any numeric type, text only as BYTES
        declared = INPUTS[name][0]
        if (declared == "BYTES") != (arr.dtype == object):
            raise ServeError(f"input {name} must be {declared}" + ("" if declared == "BYTES" else " (or another "
                             "numeric type)"), param=name)
    text = arrays.get("text_input")
    if text is None or text.size == 0:
        raise ServeError("input text_input (BYTES) is required", param="text_input")
    if text.dtype != object:
        raise ServeError("input text_input must be BYTES", param="text_input")
    return [t.decode("utf-8", "replace") for t in text.reshape(-1)]


def parse(arrays: dict[str, np.ndarray], requested: list[str], streaming_rpc: bool,
          num_prompt_tokens: list[int], max_model_len: int) -> EnsembleRequest:
    """Validate the tensors of one request (prompts_of first)."""
    prompts = prompts_of(arrays)
    text = arrays["text_input"]
    batch = len(prompts)
    params = [_params(arrays, i, batch, num_prompt_tokens[i], max_model_len) for i in range(batch)]
    stream = bool(_row(arrays, "stream", 0, batch)) and streaming_rpc
    if stream and batch > 1:
        raise ServeError("streaming requests take one prompt (text_input of batch size 1)")
    exclude = _row(arrays, "exclude_input_in_output", 0, batch)
    bad = [o for o in requested if o not in OUTPUTS]
    if bad:
        raise ServeError(f"unknown outputs {bad}; this model has {sorted(OUTPUTS)}")
    want_lp = params[0].logprobs is not None
    outputs = requested or ["text_output"] + (["cum_log_probs", "output_log_probs"] if want_lp else [])
    return EnsembleRequest(prompts, params, stream, exclude is False and not stream, outputs, text.ndim)
