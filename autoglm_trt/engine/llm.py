"""Offline API: `LLM(model_dir).generate(prompts, SamplingParams)` and `.chat(messages)`, over LLMEngine."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from autoglm_trt.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from autoglm_trt.engine.llm_engine import LLMEngine
from autoglm_trt.engine.outputs import RequestOutput
from autoglm_trt.engine.sampling_params import SamplingParams
from autoglm_trt.processing.inputs import ProcessedPrompt

Messages = list[dict]


# Defaults of the options an engine directory's build also fixes (engine_defaults there wins over these).
DEFAULTS = {"max_model_len": 8192, "max_num_seqs": 64, "max_num_batched_tokens": 8192, "block_size": 16,
            "cuda_graph_batch_sizes": None, "tensor_parallel_size": 1, "quant": "none", "act_quant": "dynamic"}


def engine_config_from_kwargs(model_dir: str, *, dtype: str = "auto", device: str = "auto",
                              max_model_len: int | None = None, max_num_seqs: int | None = None,
                              max_num_batched_tokens: int | None = None, block_size: int | None = None,
                              gpu_memory_utilization: float = 0.90, num_blocks: int | None = None,
                              enable_prefix_caching: bool = True, enforce_eager: bool = False,
                              tensor_parallel_size: int | None = None, seed: int = 0,
                              cuda_graph_batch_sizes: tuple[int, ...] | None = None,
                              num_decode_steps: int | None = None, quant: str | None = None, calib_dir: str | None = None,
                              act_quant: str | None = None, image_preprocess_device: str = "auto") -> EngineConfig:
    """The EngineConfig of `LLM(model_dir, **kwargs)`.

    Options left as None take, in order: the build's value when model_dir is an engine directory
    (limits, page size, CUDA-graph sizes, TP, quant: builder.engine_dir.engine_defaults), else DEFAULTS.
    Explicit values win, except TP and quant that contradict the engine's rank files (UserError).
    """
    named = {"max_model_len": max_model_len, "max_num_seqs": max_num_seqs,
             "max_num_batched_tokens": max_num_batched_tokens, "block_size": block_size,
             "cuda_graph_batch_sizes": cuda_graph_batch_sizes, "tensor_parallel_size": tensor_parallel_size,
             "quant": quant, "act_quant": act_quant}
    given = {k: v for k, v in named.items() if v is not None}
    o = {**DEFAULTS, **_build_defaults(model_dir, given), **given}
    graphs = o["cuda_graph_batch_sizes"]
    extra = {"cuda_graph_batch_sizes": tuple(graphs)} if graphs else {}
    return EngineConfig(
        model_dir=str(model_dir), dtype=dtype, device=device, enforce_eager=enforce_eager, seed=seed,
        quant=o["quant"], calib_dir=calib_dir, act_quant=o["act_quant"],
        image_preprocess_device=image_preprocess_device,
        cache=CacheConfig(o["block_size"], gpu_memory_utilization, num_blocks, enable_prefix_caching),
        scheduler=SchedulerConfig(o["max_num_seqs"], max(o["max_num_batched_tokens"], 1), o["max_model_len"],
                                  num_decode_steps),
        parallel=ParallelConfig(o["tensor_parallel_size"]), **extra)


def _build_defaults(model_dir: str, given: dict) -> dict:
    """An engine directory's build options (checked against the explicit ones); {} for a checkpoint."""
    # NOTE: manifest is a torch-free leaf module; engine_dir is imported only for engine directories
    from autoglm_trt.builder.manifest import is_engine_dir

    if not is_engine_dir(model_dir):
        return {}
    from autoglm_trt.builder.engine_dir import check_fixed_options, engine_defaults

    defaults = engine_defaults(model_dir)
    check_fixed_options(model_dir, defaults, given)
    return defaults


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
        self.engine = LLMEngine(engine_config_from_kwargs(model_dir, **engine_kwargs))
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
