"""The engine: requests in, token deltas out. `step()` is schedule -> execute -> postprocess.

One step is in flight at most: a multi-step window launched on the device is collected at the next
step, and when the scheduler continues it, the next window is launched before the finished window's
tokens are applied, so the CPU's work for window N overlaps the device's work on window N+1.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, replace

import torch

from autoglm_trt.config import MODEL_MAXIMUM, EngineConfig, ModelConfig
from autoglm_trt.engine.batch import prepare_step
from autoglm_trt.engine.constraints import Constraints
from autoglm_trt.engine.executor import shutdown_on_error, start_executor
from autoglm_trt.engine.output_processor import OutputProcessor
from autoglm_trt.engine.outputs import EngineStats, RequestOutput, StepFuture
from autoglm_trt.engine.sampling_params import SamplingParams
from autoglm_trt.engine.scheduler import Scheduler, SchedulerOutput
from autoglm_trt.engine.sequence import Sequence
from autoglm_trt.engine.speculative import Proposer
from autoglm_trt.errors import RequestError, UserError
from autoglm_trt.processing.inputs import InputProcessor, ProcessedPrompt
from autoglm_trt.processing.tokenizer import Tokenizer
from autoglm_trt.utils.logging import log

DECODE_STEPS_WITH_GRAPHS = 8  # greedy tokens per window when num_decode_steps is left to the engine


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible (run `autoglm-trt doctor`)")
    return torch.device(requested)


def resolve_decode_steps(config: EngineConfig, device: torch.device) -> EngineConfig:
    """num_decode_steps None: windows of 8 where decode runs in CUDA graphs, single steps elsewhere."""
    if config.scheduler.num_decode_steps is not None:
        return config
    graphs = device.type == "cuda" and not config.enforce_eager
    steps = DECODE_STEPS_WITH_GRAPHS if graphs else 1
    return replace(config, scheduler=replace(config.scheduler, num_decode_steps=steps))


@dataclass
class _InFlight:
    out: SchedulerOutput  # what the scheduler planned
    future: StepFuture  # its tokens, once the device is done


class LLMEngine:
    supports_structured_outputs = True  # SamplingParams.structured_outputs is honoured (engine/constraints.py)

    def __init__(self, config: EngineConfig, model=None) -> None:
        from autoglm_trt.models.loader import apply_quantization, load_model

        self.device = pick_device(config.device)
        self.config = config = resolve_decode_steps(config, self.device)
        self.model_config = ModelConfig.from_dir(config.model_dir)
        self.tokenizer = Tokenizer.from_dir(config.model_dir)
        self.processor = InputProcessor.from_dir(config.model_dir)
        self.processor.image_processor.pixels_in_preprocess = (
            self.device.type != "cuda" or config.image_preprocess_device == "cpu")
        t0 = time.perf_counter()
        torch.manual_seed(config.seed)
        # -- tensor parallelism (engine/executor.py): the workers start and the group forms before any
        # -- layer is built (layers shard by the group state); every step then runs on every rank
        self.executor = start_executor(config, self.device, self.model_config)
        with shutdown_on_error(self.executor):
            self.model = model or load_model(config.model_dir, config.dtype, self.device)
            apply_quantization(self.model, config.quant, config.calib_dir, config.act_quant)
            self.load_seconds = time.perf_counter() - t0
            self.runner = self.executor.build_runner(self.model, self.model_config, config)  # rank 0's
        self._fit_max_model_len()
        self.scheduler = Scheduler(config.scheduler, config.cache, self.runner.num_blocks,
                                   eos_token_ids=self.tokenizer.eos_token_ids or self.model_config.eos_token_ids,
                                   max_window_rows=self.runner.max_window_rows,
                                   proposer=Proposer(config.speculative) if config.speculative.enabled else None,
                                   max_verify_rows=self.runner.max_graph_rows)
        self.output = OutputProcessor(self.tokenizer, self.scheduler)
        self.constraints = Constraints(self.tokenizer, self.model_config.text.vocab_size,
                                       config.scheduler.max_num_seqs, self.device)
        self._inflight: _InFlight | None = None  # the step launched on the device, not yet read
        gc.collect()
        gc.freeze()  # NOTE: start-up objects leave the GC's generations: fewer, shorter pauses per step
        log(f"engine ready on {self.device}: {self.runner.num_blocks} KV blocks "
            f"= {self.kv_capacity_tokens} tokens, weights loaded in {self.load_seconds:.1f} s")

    @property
    def kv_capacity_tokens(self) -> int:
        return self.runner.num_blocks * self.config.cache.block_size

    def _fit_max_model_len(self) -> None:
        """Left to the engine, max_model_len is the model's maximum lowered to what the KV cache holds (as
        vLLM does); the log says which and why."""
        sched, cap = self.config.scheduler, self.kv_capacity_tokens
        if self.config.max_model_len_origin == MODEL_MAXIMUM and cap < sched.max_model_len:
            log(f"max-model-len {cap}: the model's maximum is {sched.max_model_len}, but the KV cache holds {cap} "
                "tokens here (more needs gpu_memory_utilization, INT8/FP8 weights or tensor parallelism)")
            sched.max_model_len = cap
            self.config.max_model_len_origin = f"the model's maximum, lowered to the KV cache's {cap} tokens"
        else:
            log(f"max-model-len {sched.max_model_len} ({self.config.max_model_len_origin})")

    # ---- requests --------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams) -> None:
        n, limit = len(prompt.prompt_token_ids), self.config.scheduler.max_model_len
        if n + params.max_tokens > limit:
            raise RequestError(f"this request needs {n} prompt tokens + max_tokens {params.max_tokens} = "
                               f"{n + params.max_tokens} tokens, but max_model_len is {limit}; shorten the "
                               "prompt or lower max_tokens", param="max_tokens")
        seq = Sequence.from_prompt(request_id, prompt, params)
        self.constraints.attach(seq)
        self.scheduler.add(seq)
        self.output.add(seq)

    def abort_request(self, request_id: str) -> None:
        self.scheduler.abort(request_id)
        self.output.drop(request_id)
        self._forget_if_ended()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        done = self._inflight or self._launch(self.scheduler.schedule())
        if done is None:
            return []
        result = done.future.result()
        result.token_ids = self.constraints.accept(done.out, result.token_ids)
        self._inflight = self._launch(self.scheduler.schedule_continuation(done.out, result.token_ids))
        self.scheduler.update(done.out, result.token_ids)
        outputs = self.output.process(done.out, result)
        self._forget_if_ended()
        return outputs

    def _launch(self, out: SchedulerOutput | None) -> _InFlight | None:
        """Start `out` on every rank (rank 0's vision tower first, for the prompts' new images)."""
        if out is None or not out.scheduled:
            return None
        first_chunks = [s.seq for s in out.scheduled if s.seq.images and s.start < s.seq.num_prompt_tokens]
        self.runner.encode_images(first_chunks)
        step = prepare_step(out, self.config.cache.block_size)
        step.logits_mask = self.constraints.mask_fn(step)
        return _InFlight(out, self.executor.execute(step))

    def _forget_if_ended(self) -> None:
        """A window in flight whose rows all ended (stop strings, aborts) is never read: its device work
        runs before anything launched after it, and its tokens belong to no one."""
        if self._inflight is not None and all(s.seq.is_finished for s in self._inflight.out.scheduled):
            self._inflight = None

    # ---- lifecycle (tensor parallelism) ------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        """False once a tensor-parallel rank died or hung (steps then raise TensorParallelError)."""
        return self.executor.healthy

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (no-op at TP 1); the engine cannot step afterwards."""
        if getattr(self, "executor", None) is not None:
            self.executor.shutdown()

    def get_stats(self) -> EngineStats:
        bm, proposer = self.scheduler.block_manager, self.scheduler.proposer
        return EngineStats(self.scheduler.num_running, self.scheduler.num_waiting, bm.usage, bm.num_free_blocks,
                           bm.num_blocks, bm.prefix_cache_queries, bm.prefix_cache_hits, self.config.cache.block_size,
                           spec=proposer.stats if proposer is not None else None)
