"""Continuous batching with chunked prefill, multi-step windows and preemption by recompute. Pure Python.

There are no prefill or decode phases: each step, every sequence's computed tokens catch up with its
known tokens (prompt + output) as far as the token budget allows. Running sequences go first, in
admission order, then waiting ones (lower priority value first, preempted before new, then arrival).
When blocks run out, the running sequence with the lowest priority and the latest arrival is
preempted: its blocks are freed, its computed tokens reset to 0, and it goes back to the head of the
waiting queue; its output tokens are kept and recomputed with the prompt when it is admitted again.

The scheduler decides how many tokens each row computes in a step and owns every piece of KV and stop
bookkeeping: a prompt chunk, one decode token, or a window of k greedy decode tokens that the device
produces without a CPU round trip (`num_steps`; lookahead blocks reserved here), and the next window of
the same rows (`schedule_continuation`), planned from the tokens a finished window produced before they
are applied, so the device can start it while the CPU does the finished window's work.

Call order, from one thread: add / abort / finish between steps, then schedule -> run -> update.
"""

from __future__ import annotations

import bisect
import itertools
import time
from dataclasses import dataclass, field
from typing import Iterable

from autoglm_trt.config import CacheConfig, SchedulerConfig
from autoglm_trt.engine.block_manager import BlockManager
from autoglm_trt.engine.sequence import FINISH_STATUS, Sequence, SequenceStatus
from autoglm_trt.engine.speculative import Proposer
from autoglm_trt.errors import RequestError


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # compute tokens [start, start + num_new_tokens) this step (drafts included)
    start: int | None = None  # first token computed; None: seq.num_computed_tokens when scheduled
    samples: bool | None = None  # the chunk reaches the last known token: it produces tokens; None: derive
    draft: list[int] = field(default_factory=list)  # speculated tokens after the last known one, to verify

    def __post_init__(self) -> None:
        if self.start is None:
            self.start = self.seq.num_computed_tokens
        if self.samples is None:
            self.samples = self.start + self.num_new_tokens == self.seq.num_tokens

    @property
    def input_ids(self) -> list[int]:
        """The tokens this step computes: known ones, then the draft."""
        known = self.num_new_tokens - len(self.draft)
        return self.seq.token_ids[self.start:self.start + known] + self.draft


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]  # in the order of the flat token batch
    preempted: list[Sequence]  # lost their blocks this step (KV gone; will be recomputed)
    finished_aborted: list[Sequence]  # aborted since the last schedule(): drop per-request state
    num_steps: int = 1  # tokens each row produces: > 1 is a greedy window decoded on the device
    continues: bool = False  # the rows continue the window before this one (their inputs are on the device)
    is_decode: bool = field(init=False)  # every scheduled seq computes exactly one token
    num_batched_tokens: int = field(init=False)  # sum of num_new_tokens

    def __post_init__(self) -> None:
        self.count()

    def count(self) -> None:
        self.num_batched_tokens = sum(s.num_new_tokens for s in self.scheduled)
        self.is_decode = bool(self.scheduled) and all(s.num_new_tokens == 1 for s in self.scheduled)

    @property
    def has_drafts(self) -> bool:
        return any(s.draft for s in self.scheduled)

    @property
    def sampling_seqs(self) -> list[Sequence]:
        """Sequences that need logits this step (rows of the sampler), in batch order."""
        return [s.seq for s in self.scheduled if s.samples]


def out_is_window(out: SchedulerOutput) -> bool:
    return out.num_steps > 1 or out.continues


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig, num_blocks: int,
                 eos_token_ids: Iterable[int] = (), max_window_rows: int = 0, proposer: Proposer | None = None,
                 max_verify_rows: int = 0) -> None:
        self.config = scheduler_config
        self.proposer = proposer  # speculative drafts for small greedy decode batches (engine/speculative.py)
        # a verification runs as a decode batch of 1 + k rows per sequence: at most this many rows (the largest
        # decode CUDA graph; 0: no bound, eager steps)
        self.max_verify_rows = max_verify_rows
        # windows of num_decode_steps greedy tokens for decode batches of at most this many rows (0: never;
        # the runner's multi-step buffers set it)
        self.max_window_rows = max_window_rows if (scheduler_config.num_decode_steps or 1) > 1 else 0
        self.block_manager = BlockManager(num_blocks, cache_config.block_size,
                                          cache_config.enable_prefix_caching)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.kv_capacity = num_blocks * cache_config.block_size  # tokens of KV one sequence may hold
        self.waiting: list[Sequence] = []  # sorted by _queue_key
        self.running: list[Sequence] = []  # admission order
        self._seqs: dict[str, Sequence] = {}  # unfinished sequences by request id
        self._arrival_no: dict[str, int] = {}  # tie-break for equal arrival times
        self._counter = itertools.count()
        self._aborted: list[Sequence] = []

    # ---- requests ----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; RequestError if it can never run."""
        rid, n = seq.request_id, seq.num_prompt_tokens
        if rid in self._seqs:
            raise RequestError(f"request id {rid!r} is already in use")
        if seq.status is not SequenceStatus.WAITING or seq.num_computed_tokens or seq.block_table:
            raise ValueError(f"request {rid!r}: only a fresh sequence can be added, got {seq}")
        if n > self.kv_capacity:
            raise RequestError(
                f"request {rid!r}: the prompt has {n} tokens but the KV cache holds only "
                f"{self.kv_capacity} ({self.block_manager.num_blocks} blocks of "
                f"{self.block_manager.block_size}); shorten the prompt or give the KV cache more "
                "memory (gpu_memory_utilization or num_blocks)")
        if n >= self.config.max_model_len:
            raise RequestError(f"request {rid!r}: the prompt has {n} tokens, max_model_len is "
                               f"{self.config.max_model_len}: no room to generate")
        self._seqs[rid] = seq
        self._arrival_no[rid] = next(self._counter)
        self._enqueue(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Abort a waiting or running request, freeing its blocks at once. Unknown ids are ignored."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return None
        self.finish(seq, "abort")
        self._aborted.append(seq)
        return seq

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish `seq` with reason "stop" | "length" | "abort" (the engine calls it for stop strings)."""
        if reason not in FINISH_STATUS:
            raise ValueError(f"finish reason must be one of {sorted(FINISH_STATUS)}, got {reason!r}")
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = FINISH_STATUS[reason], reason
        self.block_manager.free(seq)
        if self.proposer is not None:
            self.proposer.finish(seq)
        del self._seqs[seq.request_id]
        del self._arrival_no[seq.request_id]

    def get(self, request_id: str) -> Sequence | None:
        return self._seqs.get(request_id)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    # ---- one step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        budget = self._schedule_running(scheduled, preempted, self.config.max_num_batched_tokens)
        if not preempted:  # NOTE: admitting new work right after a preemption would thrash
            self._schedule_waiting(scheduled, budget)
        aborted, self._aborted = self._aborted, []
        out = SchedulerOutput(scheduled, preempted, aborted)
        if self._speculate(out):
            return out
        if self._window_eligible(out):
            seqs = [s.seq for s in scheduled]
            steps = self._window_steps(seqs, ahead=0)
            if steps > 1 and self._reserve_window(seqs, 0, steps):
                out.num_steps = steps
        return out

    def schedule_continuation(self, out: SchedulerOutput, produced: list[list[int]]) -> SchedulerOutput | None:
        """The next window of `out`'s rows, planned from the tokens `out` produced before they are applied
        (update(out, produced) comes after): None when a row stops within them, a request waits, or no room."""
        if out.num_steps < 2 or self.waiting or self._speculation_wanted(out):
            return None
        for sch, tokens in zip(out.scheduled, produced):
            if (sch.seq.status is not SequenceStatus.RUNNING or len(tokens) < out.num_steps
                    or self.stops_within(sch.seq, tokens)):
                return None  # NOTE: fewer tokens: a grammar cut the row, the device's state went past it
        seqs = [s.seq for s in out.scheduled]
        steps = self._window_steps(seqs, ahead=out.num_steps)
        if steps < 1 or not self._reserve_window(seqs, out.num_steps, steps):
            return None
        rows = [ScheduledSeq(s.seq, 1, start=s.start + out.num_steps, samples=True) for s in out.scheduled]
        return SchedulerOutput(rows, [], [], num_steps=steps, continues=True)

    def update(self, output: SchedulerOutput, produced: list[list[int]]) -> list[Sequence]:
        """Append each row's produced tokens (one by one: a stop ends the row and drops the rest), advance
        computed tokens, finish sequences; returns those finished.

        `produced[i]` belongs to output.scheduled[i] and is read only where that chunk `samples`.
        """
        if len(produced) != len(output.scheduled):
            raise ValueError(f"{len(produced)} token lists for {len(output.scheduled)} scheduled seqs")
        finished = []
        for sch, tokens in zip(output.scheduled, produced):
            seq = sch.seq
            if seq.status is not SequenceStatus.RUNNING:  # aborted or finished since schedule()
                continue
            if not sch.samples:
                seq.num_computed_tokens = sch.start + sch.num_new_tokens
                continue
            if not tokens:
                if out_is_window(output):  # NOTE: a grammar refused the window's first token: no progress
                    continue
                raise ValueError(f"request {seq.request_id!r} reached its last token: it needs a sample")
            reason = self._append(seq, tokens)
            if sch.draft:
                self.proposer.record(seq, len(sch.draft), min(len(tokens) - 1, len(sch.draft)))
            seq.num_computed_tokens = seq.num_tokens - 1  # NOTE: every token but the newest has its KV now
            allocated = sch.start + sch.num_new_tokens - len(sch.draft)  # allocate() hashed the blocks up to here
            if seq.num_computed_tokens > allocated:  # a window computed more on the device
                self.block_manager.register_computed(seq, allocated, seq.num_computed_tokens)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def _append(self, seq: Sequence, tokens: list[int]) -> str | None:
        for token in tokens:
            seq.append_token(token)
            reason = self._stop_reason(seq, token)
            if reason is not None:
                return reason
        return None

    def finish_at(self, seq: Sequence, num_output_tokens: int) -> None:
        """A stop string completed with output token `num_output_tokens` (the engine reads text): drop the
        tokens after it and finish the sequence with reason "stop", as if it had stopped there (also when
        a later token of the same step had already finished it)."""
        extra = seq.num_output_tokens - num_output_tokens
        if extra > 0:
            del seq.output_token_ids[-extra:], seq.token_ids[-extra:]
        if seq.is_finished:
            seq.status, seq.finish_reason = FINISH_STATUS["stop"], "stop"
        else:
            self.finish(seq, "stop")

    # ---- internals ---------------------------------------------------------------------------
    def _schedule_running(self, scheduled: list[ScheduledSeq], preempted: list[Sequence],
                          budget: int) -> int:
        idx = 0
        while idx < len(self.running) and budget > 0:
            seq = self.running[idx]
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self._allocate_or_preempt(seq, num_new, idx, preempted):
                continue  # seq preempted itself and left self.running; idx now points past it
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
            idx += 1
        return budget

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, idx: int,
                             preempted: list[Sequence]) -> bool:
        """Allocate for running[idx], preempting unscheduled running seqs (running[idx:]) as needed."""
        while not self.block_manager.allocate(seq, num_new).ok:
            victim = max(self.running[idx:], key=self._victim_key)
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _schedule_waiting(self, scheduled: list[ScheduledSeq], budget: int) -> None:
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            num_cached = bm.find_cached_prefix(seq)
            num_new = min(seq.num_tokens - num_cached, budget)
            if not bm.allocate(seq, num_new, num_cached_tokens=num_cached).ok:
                break  # strict queue order: later sequences wait too
            self.waiting.pop(0)
            if seq.status is SequenceStatus.WAITING:
                seq.num_cached_tokens = num_cached
                seq.first_scheduled_time = time.monotonic()
            seq.num_computed_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.PREEMPTED
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=self._queue_key)

    def _queue_key(self, seq: Sequence) -> tuple:
        preempted_first = 0 if seq.status is SequenceStatus.PREEMPTED else 1
        return (seq.params.priority, preempted_first, seq.arrival_time, self._arrival_no[seq.request_id])

    def _victim_key(self, seq: Sequence) -> tuple:
        return (seq.params.priority, seq.arrival_time, self._arrival_no[seq.request_id])

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        if self._is_stop_token(seq.params, token):
            return "stop"
        return "length" if self._too_long(seq, seq.num_output_tokens, seq.num_tokens) else None

    def _is_stop_token(self, params, token: int) -> bool:
        return (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids

    def _too_long(self, seq: Sequence, num_output: int, num_tokens: int) -> bool:
        # NOTE: past kv_capacity the next token's KV would not fit in the whole cache
        return (num_output >= seq.params.max_tokens or num_tokens >= self.config.max_model_len
                or num_tokens > self.kv_capacity)

    # ---- speculation and multi-step windows -------------------------------------------------------
    def _speculate(self, out: SchedulerOutput) -> bool:
        """Drafts for the greedy rows of a small decode batch, their KV blocks reserved -> whether any row got one."""
        if self.proposer is None or not out.is_decode or len(out.scheduled) > self.proposer.cfg.max_batch_size:
            return False
        budget = self.config.max_num_batched_tokens - out.num_batched_tokens
        if self.max_verify_rows:
            budget = min(budget, self.max_verify_rows - out.num_batched_tokens)
        for sch in out.scheduled:
            seq, p = sch.seq, sch.seq.params
            if sch.start < seq.num_prompt_tokens or not p.is_greedy or p.logprobs is not None or seq.grammar:
                continue
            # NOTE: a step yields drafts + 1 tokens: never ask for more than max_tokens / max_model_len leave
            room = min(p.max_tokens - seq.num_output_tokens, self.config.max_model_len - seq.num_tokens,
                       self.kv_capacity - seq.num_tokens, budget + 1) - 1
            draft = self.proposer.propose(seq, room) if room > 0 else []
            if draft and self.block_manager.allocate(seq, 1, lookahead=len(draft)).ok:
                sch.draft, sch.num_new_tokens = draft, 1 + len(draft)
                budget -= len(draft)
        out.count()
        return out.has_drafts

    def _speculation_wanted(self, out: SchedulerOutput) -> bool:
        """A window's rows that might gain from speculating leave it for a step that can (schedule())."""
        p = self.proposer
        return (p is not None and len(out.scheduled) <= p.cfg.max_batch_size
                and any(p.wants(s.seq) for s in out.scheduled if s.seq.grammar is None))

    def _window_eligible(self, out: SchedulerOutput) -> bool:
        """A decode batch whose rows all take the device's greedy path (the multi-step buffers)."""
        if not out.is_decode or len(out.scheduled) > self.max_window_rows:
            return False
        for sch in out.scheduled:
            seq, p = sch.seq, sch.seq.params
            if (sch.start < seq.num_prompt_tokens or not p.is_greedy or p.repetition_penalty != 1.0
                    or p.logprobs is not None or seq.mask_next):
                return False
        return True

    def _window_steps(self, seqs: list[Sequence], ahead: int) -> int:
        """Tokens per row for a window starting `ahead` tokens past the seqs' known ones: at most
        num_decode_steps, never past max_model_len, never past the longest remaining max_tokens."""
        room = min(self.config.max_model_len - s.num_tokens - ahead for s in seqs)
        wanted = max(s.params.max_tokens - s.num_output_tokens - ahead for s in seqs)
        return max(0, min(self.config.num_decode_steps or 1, room, wanted))

    def _reserve_window(self, seqs: list[Sequence], ahead: int, steps: int) -> bool:
        """Blocks for the KV a window writes on the device (tokens past those allocate() covered)."""
        return all(self.block_manager.allocate(s, 1, lookahead=ahead + steps - 1).ok for s in seqs)

    def stops_within(self, seq: Sequence, tokens: list[int]) -> bool:
        """Would appending `tokens` to seq finish it (stop ids or a length limit)? Changes nothing."""
        n = len(tokens)
        return (any(self._is_stop_token(seq.params, t) for t in tokens)
                or self._too_long(seq, seq.num_output_tokens + n, seq.num_tokens + n))

    def check_invariants(self) -> None:
        """Raise AssertionError if queues, statuses and blocks disagree (for tests)."""
        self.block_manager.check_invariants(self.running)
        assert {s.request_id for s in self.running + self.waiting} == set(self._seqs), "lost a sequence"
        assert len(self.running) + len(self.waiting) == len(self._seqs), "sequence queued twice"
        for seq in self.running:
            assert seq.status is SequenceStatus.RUNNING, f"{seq} in running"
            assert len(seq.block_table) >= self.block_manager.blocks_needed(seq.num_computed_tokens)
        for seq in self.waiting:
            assert seq.status in (SequenceStatus.WAITING, SequenceStatus.PREEMPTED), f"{seq} waiting"
            assert not seq.block_table and seq.num_computed_tokens == 0, f"{seq} waiting with KV"
        keys = [self._queue_key(s) for s in self.waiting]
        assert keys == sorted(keys), "waiting queue out of order"
        assert len(self.running) <= self.config.max_num_seqs, "too many running sequences"
