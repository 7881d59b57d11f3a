"""Continuous batching with chunked prefill and preemption by recompute. Pure Python, no torch.

There are no prefill or decode phases: each step, every sequence's computed tokens catch up with its
known tokens (prompt + output) as far as the token budget allows. Running sequences go first, in
admission order, then waiting ones (lower priority value first, preempted before new, then arrival).
When blocks run out, the running sequence with the lowest priority and the latest arrival is
preempted: its blocks are freed, its computed tokens reset to 0, and it goes back to the head of the
waiting queue; its output tokens are kept and recomputed with the prompt when it is admitted again.

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
from autoglm_trt.errors import RequestError


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # compute tokens [start, start + num_new_tokens) this step
    start: int = field(init=False)  # seq.num_computed_tokens when scheduled
    samples: bool = field(init=False)  # the chunk reaches the last known token: sample one more

    def __post_init__(self) -> None:
        self.start = self.seq.num_computed_tokens
        self.samples = self.start + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]  # in the order of the flat token batch
    preempted: list[Sequence]  # lost their blocks this step (KV gone; will be recomputed)
    finished_aborted: list[Sequence]  # aborted since the last schedule(): drop per-request state
    is_decode: bool = field(init=False)  # every scheduled seq computes exactly one token
    num_batched_tokens: int = field(init=False)  # sum of num_new_tokens

    def __post_init__(self) -> None:
        self.num_batched_tokens = sum(s.num_new_tokens for s in self.scheduled)
        self.is_decode = bool(self.scheduled) and all(s.num_new_tokens == 1 for s in self.scheduled)

    @property
    def sampling_seqs(self) -> list[Sequence]:
        """Sequences that need logits this step (rows of the sampler), in batch order."""
        return [s.seq for s in self.scheduled if s.samples]


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig, num_blocks: int,
                 eos_token_ids: Iterable[int] = ()) -> None:
        self.config = scheduler_config
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
        return SchedulerOutput(scheduled, preempted, aborted)

    def update(self, output: SchedulerOutput, sampled: list[int | None]) -> list[Sequence]:
        """Advance computed tokens, append sampled tokens, finish sequences; returns those finished.

        `sampled[i]` belongs to output.scheduled[i]; it is read only where that chunk `samples`.
        """
        if len(sampled) != len(output.scheduled):
            raise ValueError(f"{len(sampled)} sampled tokens for {len(output.scheduled)} scheduled seqs")
        finished = []
        for sch, token in zip(output.scheduled, sampled):
            seq = sch.seq
            if seq.status is not SequenceStatus.RUNNING:  # aborted or finished since schedule()
                continue
            seq.num_computed_tokens = sch.start + sch.num_new_tokens
            if not sch.samples:
                continue
            if token is None:
                raise ValueError(f"request {seq.request_id!r} reached its last token: it needs a sample")
            seq.append_token(token)
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

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
