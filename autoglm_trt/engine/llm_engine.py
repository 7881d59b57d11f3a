"""The engine: requests in, token deltas out. `step()` is schedule -> run -> postprocess."""

from __future__ import annotations

import gc
import time

import torch

from autoglm_trt.config import EngineConfig, ModelConfig
from autoglm_trt.engine.batch import build_batch
from autoglm_trt.engine.detokenize import TextState, new_text_state
from autoglm_trt.engine.model_runner import ModelRunner
from autoglm_trt.engine.outputs import EngineStats, RequestOutput
from autoglm_trt.engine.sampling_params import SamplingParams
from autoglm_trt.engine.scheduler import Scheduler, SchedulerOutput
from autoglm_trt.engine.sequence import Sequence
from autoglm_trt.errors import RequestError
from autoglm_trt.layers.sampler import Sampler, SamplingMetadata
from autoglm_trt.processing.inputs import InputProcessor, ProcessedPrompt
from autoglm_trt.processing.tokenizer import Tokenizer
from autoglm_trt.utils.logging import log


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        from autoglm_trt.errors import UserError

        raise UserError("--device cuda was asked for but no CUDA GPU is visible (run `autoglm-trt doctor`)")
    return torch.device(requested)


class LLMEngine:
    def __init__(self, config: EngineConfig, model=None) -> None:
        from autoglm_trt.models.loader import load_model

        self.config = config
        self.device = pick_device(config.device)
        self.model_config = ModelConfig.from_dir(config.model_dir)
        self.tokenizer = Tokenizer.from_dir(config.model_dir)
        self.processor = InputProcessor.from_dir(config.model_dir)
        t0 = time.perf_counter()
        torch.manual_seed(config.seed)
        self.model = model or load_model(config.model_dir, config.dtype, self.device)
        self.load_seconds = time.perf_counter() - t0
        self.runner = ModelRunner(self.model, self.model_config, config, self.device)
        self.scheduler = Scheduler(config.scheduler, config.cache, self.runner.num_blocks,
                                   eos_token_ids=self.tokenizer.eos_token_ids or self.model_config.eos_token_ids)
        self.sampler = Sampler()
        self._text: dict[str, TextState] = {}
        self._sent_tokens: dict[str, int] = {}
        gc.collect()
        gc.freeze()  # NOTE: start-up objects leave the GC's generations: fewer, shorter pauses per step
        log(f"engine ready on {self.device}: {self.runner.num_blocks} KV blocks "
            f"= {self.kv_capacity_tokens} tokens, weights loaded in {self.load_seconds:.1f} s")

    @classmethod
    def from_model_dir(cls, model_dir: str, **kwargs) -> "LLMEngine":
        from autoglm_trt.engine.llm import engine_config_from_kwargs

        return cls(engine_config_from_kwargs(model_dir, **kwargs))

    @property
    def kv_capacity_tokens(self) -> int:
        return self.runner.num_blocks * self.config.cache.block_size

    # ---- requests --------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams) -> None:
        n, limit = len(prompt.prompt_token_ids), self.config.scheduler.max_model_len
        if n + params.max_tokens > limit:
            raise RequestError(f"this request needs {n} prompt tokens + max_tokens {params.max_tokens} = "
                               f"{n + params.max_tokens} tokens, but max_model_len is {limit}; shorten the "
                               "prompt or lower max_tokens", param="max_tokens")
        seq = Sequence.from_prompt(request_id, prompt, params, self.model_config.image_token_id)
        self.scheduler.add(seq)
        self._text[request_id] = new_text_state(self.tokenizer, seq.prompt_token_ids, params.stop,
                                                params.skip_special_tokens)
        self._sent_tokens[request_id] = 0

    def abort_request(self, request_id: str) -> None:
        self.scheduler.abort(request_id)
        self._text.pop(request_id, None)
        self._sent_tokens.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        sampled, logprobs = self._run(out)
        self.scheduler.update(out, sampled)
        return self._postprocess(out, logprobs)

    def _run(self, out: SchedulerOutput) -> tuple[list[int | None], dict[str, object]]:
        first_chunks = [s.seq for s in out.scheduled if s.seq.images and s.start < s.seq.num_prompt_tokens]
        self.runner.encode_images(first_chunks)
        batch = build_batch(out, self.config.cache.block_size)
        logits = self.runner.run(batch)
        seqs = out.sampling_seqs
        meta = SamplingMetadata.from_sequences(seqs, self.model_config.text.vocab_size, logits.device)
        result = self.sampler(logits, meta)
        by_id = dict(zip((s.request_id for s in seqs), result.token_ids))
        lps = dict(zip((s.request_id for s in seqs), result.logprobs or [None] * len(seqs)))
        return [by_id.get(s.seq.request_id) if s.samples else None for s in out.scheduled], lps

    def _postprocess(self, out: SchedulerOutput, logprobs: dict[str, object]) -> list[RequestOutput]:
        outputs = []
        for sch in out.scheduled:
            seq = sch.seq
            if not sch.samples or seq.request_id not in self._text:
                continue
            outputs.append(self._output_for(seq, logprobs.get(seq.request_id)))
        return outputs

    def _output_for(self, seq: Sequence, logprob) -> RequestOutput:
        rid = seq.request_id
        start = self._sent_tokens[rid]
        new_ids = seq.output_token_ids[start:]
        self._sent_tokens[rid] = seq.num_output_tokens
        state = self._text[rid]
        text = state.feed(new_ids)
        if state.stopped_by is not None and not seq.is_finished:
            self.scheduler.finish(seq, "stop")
        if seq.is_finished:
            text += state.flush()
            del self._text[rid], self._sent_tokens[rid]
        stop = state.stopped_by or (seq.last_token if seq.finish_reason == "stop" else None)
        return RequestOutput(rid, new_ids, text, seq.is_finished, seq.finish_reason, seq.num_prompt_tokens,
                             seq.num_output_tokens, seq.num_cached_tokens,
                             [logprob] if logprob is not None else None, stop if seq.is_finished else None)

    def get_stats(self) -> EngineStats:
        bm = self.scheduler.block_manager
        return EngineStats(self.scheduler.num_running, self.scheduler.num_waiting, bm.usage, bm.num_free_blocks,
                           bm.num_blocks, bm.prefix_cache_queries, bm.prefix_cache_hits, self.config.cache.block_size)
