"""The engine: requests in, token deltas out. `step()` is schedule -> run -> postprocess."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import torch

from autoglm_trt.config import EngineConfig, ModelConfig
from autoglm_trt.engine.batch import build_batch, slot_of
from autoglm_trt.engine.detokenize import TextState, new_text_state
from autoglm_trt.engine.executor import shutdown_on_error, start_executor
from autoglm_trt.engine.model_runner import ModelRunner
from autoglm_trt.engine.outputs import EngineStats, RequestOutput
from autoglm_trt.engine.sampling_params import SamplingParams
from autoglm_trt.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from autoglm_trt.engine.sequence import Sequence, SequenceStatus
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
        from autoglm_trt.models.loader import apply_quantization, load_model

        self.config = config
        self.device = pick_device(config.device)
        self.model_config = ModelConfig.from_dir(config.model_dir)
        self.tokenizer = Tokenizer.from_dir(config.model_dir)
        self.processor = InputProcessor.from_dir(config.model_dir)
        self.processor.image_processor.pixels_in_preprocess = (
            self.device.type != "cuda" or config.image_preprocess_device == "cpu")
        t0 = time.perf_counter()
        torch.manual_seed(config.seed)
        # -- tensor parallelism (engine/executor.py): the workers start and the group forms before any
        # -- layer is built (layers shard by the group state); executor.build_runner broadcasts each step
        self.executor = start_executor(config, self.device, self.model_config)  # None at TP 1
        with shutdown_on_error(self.executor):
            self.model = model or load_model(config.model_dir, config.dtype, self.device)
            apply_quantization(self.model, config.quant, config.calib_dir, config.act_quant)
            self.load_seconds = time.perf_counter() - t0
            self.runner = (self.executor.build_runner(self.model, self.model_config, config) if self.executor
                           else ModelRunner(self.model, self.model_config, config, self.device))
        self.scheduler = Scheduler(config.scheduler, config.cache, self.runner.num_blocks,
                                   eos_token_ids=self.tokenizer.eos_token_ids or self.model_config.eos_token_ids)
        self.sampler = Sampler()
        self._text: dict[str, TextState] = {}
        self._sent_tokens: dict[str, int] = {}
        self._window: _Window | None = None  # a multi-step window launched on the GPU, not yet read
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
        if self._window is not None:  # a multi-step window is on the GPU: its tokens first
            return self._finish_window()
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        steps = self._multi_steps(out)
        if steps > 1 and self._reserve_lookahead(out, steps):
            self._launch_window(out, steps)
            return self._finish_window()
        sampled, logprobs = self._run(out)
        self.scheduler.update(out, sampled)
        return self._postprocess(out, logprobs)

    # ---- multi-step greedy decode (GPU) ----------------------------------------------------------
    def _multi_steps(self, out: SchedulerOutput) -> int:
        """How many tokens this decode batch may produce in one go on the GPU (1 = the normal path)."""
        if not out.is_decode or not self.runner.can_run_multi(len(out.scheduled)):
            return 1
        for sch in out.scheduled:
            seq, p = sch.seq, sch.seq.params
            if (sch.start < seq.num_prompt_tokens or not p.is_greedy or p.repetition_penalty != 1.0
                    or p.logprobs is not None):
                return 1
        return self._window_steps([s.seq for s in out.scheduled], 0)

    def _window_steps(self, seqs: list[Sequence], ahead: int) -> int:
        """Tokens for a window starting `ahead` tokens past the seqs' known ones: at most
        num_decode_steps, never past max_model_len, never past the longest remaining max_tokens."""
        limit = self.config.scheduler.max_model_len
        room = min(limit - s.num_tokens - ahead for s in seqs)
        wanted = max(s.params.max_tokens - s.num_output_tokens - ahead for s in seqs)
        return max(0, min(self.config.num_decode_steps, room, wanted))

    def _reserve_lookahead(self, out: SchedulerOutput, steps: int, ahead: int = 0) -> bool:
        bm = self.scheduler.block_manager
        return all(bm.allocate(s.seq, 1, lookahead=ahead + steps - 1).ok for s in out.scheduled)

    def _launch_window(self, out: SchedulerOutput, steps: int) -> None:
        seqs = [s.seq for s in out.scheduled]
        penalties = [(s.params.frequency_penalty, s.params.presence_penalty, s.output_token_ids) for s in seqs]
        has_pen = any(f or p for f, p, _ in penalties)
        self.runner.launch_multi(build_batch(out, self.config.cache.block_size), steps,
                                 penalties if has_pen else None)
        self._window = _Window(out, steps)

    def _finish_window(self) -> list[RequestOutput]:
        """Read the window on the GPU; launch the next one of the same rows when nothing stops them
        and no request waits; then do this window's CPU work (it overlaps the next window)."""
        win, self._window = self._window, None
        tokens = self.runner.collect_multi(win.steps, len(win.out.scheduled))  # [steps][B]
        nxt = self._continue_window(win, tokens)
        outputs = self._apply_window(win.out, tokens)
        # NOTE: rows that finished (a stop string) or were aborted since stay in place (rows are fixed on
        # the device) and their tokens are dropped; a window whose rows all ended is simply never read.
        if nxt and any(s.seq.status is SequenceStatus.RUNNING for s in win.out.scheduled):
            self._window = _Window(SchedulerOutput([ScheduledSeq(s.seq, 1) for s in win.out.scheduled], [], []), nxt)
        return outputs

    def _continue_window(self, win: _Window, tokens: list[list[int]]) -> int:
        """Launch the next window (before this one's tokens are applied) -> its steps, 0 if none."""
        seqs = [s.seq for s in win.out.scheduled]
        if not self.runner.can_pipeline or self.scheduler.num_waiting:
            return 0
        for i, seq in enumerate(seqs):
            if seq.status is not SequenceStatus.RUNNING or self.scheduler.stops_within(seq, [t[i] for t in tokens]):
                return 0
        steps = self._window_steps(seqs, win.steps)
        if steps < 1 or not self._reserve_lookahead(win.out, steps, ahead=win.steps):
            return 0
        bsz = self.config.cache.block_size  # NOTE: the next window's first input is token num_computed + steps
        slots = [slot_of(s, s.num_computed_tokens + win.steps, bsz) for s in seqs]
        self.runner.continue_multi(slots, [s.block_table for s in seqs], steps)
        return steps

    def _apply_window(self, out: SchedulerOutput, tokens: list[list[int]]) -> list[RequestOutput]:
        seqs = [s.seq for s in out.scheduled]
        row = {s.request_id: i for i, s in enumerate(seqs)}
        start = {s.request_id: s.num_computed_tokens for s in seqs}
        # NOTE: stop strings must be checked token by token (to cut exactly); otherwise the text of all
        # K tokens is produced once per request, which is most of the CPU cost at large batches.
        per_token = any(s.params.stop for s in seqs)
        merged: dict[str, RequestOutput] = {}
        cur = out
        for step_tokens in tokens:
            self.scheduler.update(cur, [step_tokens[row[s.seq.request_id]] for s in cur.scheduled])
            if per_token:
                for o in self._postprocess(cur, {}):
                    merged[o.request_id] = _merge(merged.get(o.request_id), o)
            live = [ScheduledSeq(s.seq, 1) for s in cur.scheduled if s.seq.status is SequenceStatus.RUNNING]
            if not live:
                break
            cur = SchedulerOutput(live, [], [])
        if not per_token:
            merged = {o.request_id: o for o in self._postprocess(out, {})}
        for seq in seqs:
            if not seq.is_finished:
                self.scheduler.block_manager.register_computed(seq, start[seq.request_id], seq.num_computed_tokens)
        return list(merged.values())

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
                             [logprob] if logprob is not None else None, stop if seq.is_finished else None,
                             seq.first_scheduled_time)

    # ---- lifecycle (tensor parallelism) ------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        """False once a tensor-parallel rank died or hung (steps then raise TensorParallelError)."""
        return self.executor is None or self.executor.healthy

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (no-op at TP 1); the engine cannot step afterwards."""
        if getattr(self, "executor", None) is not None:
            self.executor.shutdown()

    def get_stats(self) -> EngineStats:
        bm = self.scheduler.block_manager
        return EngineStats(self.scheduler.num_running, self.scheduler.num_waiting, bm.usage, bm.num_free_blocks,
                           bm.num_blocks, bm.prefix_cache_queries, bm.prefix_cache_hits, self.config.cache.block_size)


@dataclass
class _Window:
    out: SchedulerOutput  # its rows, in batch order; starts = num_computed_tokens when it was launched
    steps: int


def _merge(prev: RequestOutput | None, new: RequestOutput) -> RequestOutput:
    """Fold several steps' outputs of one request into one delta."""
    if prev is None:
        return new
    new.new_token_ids = prev.new_token_ids + new.new_token_ids
    new.new_text = prev.new_text + new.new_text
    return new
