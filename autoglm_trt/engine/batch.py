"""Turn a SchedulerOutput into the ModelStep every rank runs: one flat token batch (ids, M-RoPE positions,
cache slots, block tables) plus how many tokens each row produces.

A ModelStep is plain data (lists and CPU tensors) so that rank 0 can send it to tensor-parallel workers,
which then run exactly the same forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from autoglm_trt.engine.scheduler import SchedulerOutput
from autoglm_trt.engine.sequence import Sequence


@dataclass
class ImageChunk:
    content_hash: str  # which image (embeddings come from the encoder cache)
    row_start: int  # first embedding row used by this step
    row_end: int


@dataclass
class StepBatch:
    input_ids: list[int]  # [T] flat over sequences
    positions: torch.Tensor  # [3, T] int64, M-RoPE (t, h, w)
    slot_mapping: list[int]  # [T] cache slot of each token's K/V
    cu_seqlens_q: list[int]  # [B+1]
    seq_lens: list[int]  # [B] KV length after this step
    block_tables: list[list[int]]  # [B][blocks]
    logits_indices: list[int]  # rows of T whose logits are sampled, one per sampling sequence
    image_chunks: list[ImageChunk] = field(default_factory=list)  # in flat-token order
    is_decode: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_image_rows(self) -> int:
        return sum(c.row_end - c.row_start for c in self.image_chunks)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)  # NOTE: a numpy array pickles ~10x faster than a torch tensor
        state["positions"] = self.positions.numpy()
        return state

    def __setstate__(self, state: dict) -> None:
        state["positions"] = torch.from_numpy(state["positions"])
        self.__dict__.update(state)


@dataclass
class ModelStep:
    """One step for the model runner of every rank: a forward pass and its sampling, or a window of
    `num_steps` greedy tokens decoded on the device."""

    batch: StepBatch  # the inputs (a continuation uses only slot_mapping: each row's first slot, and block_tables)
    samples: list[bool]  # per scheduled row: it produces tokens this step
    num_steps: int = 1  # > 1: a greedy window of num_steps tokens per row, with no CPU round trip
    continues: bool = False  # the window carries on the previous window's rows (ids, positions on the device)
    penalties: list[tuple[float, float, list[int]]] | None = None  # window rows: (frequency, presence, output ids)
    sampling: list[Sequence] | None = None  # rank 0 only: the sampling rows (never sent to other ranks)
    drafts: list[list[int]] | None = None  # rank 0 only: per scheduled row, the draft tokens to verify
    logits_mask: Callable | None = None  # rank 0 only: -> (bitmask, logits rows) of constrained rows, or None

    @property
    def is_window(self) -> bool:
        """Decoded on the device by the multi-step buffers (a continuation may be one step long)."""
        return self.num_steps > 1 or self.continues

    def for_workers(self) -> "ModelStep":
        """What the other tensor-parallel ranks get (sampling is rank 0's business)."""
        return replace(self, sampling=None, drafts=None, logits_mask=None)


def seq_positions(seq: Sequence, start: int, end: int) -> torch.Tensor:
    """M-RoPE positions of tokens [start, end) of seq -> [3, end - start] int64."""
    parts = []
    n_prompt = seq.num_prompt_tokens if seq.mrope_positions is not None else 0
    if start < n_prompt:
        parts.append(torch.as_tensor(seq.mrope_positions)[:, start:min(end, n_prompt)])
    if end > max(start, n_prompt):
        lo = max(start, n_prompt)
        parts.append(torch.arange(lo, end).add_(seq.mrope_delta).unsqueeze(0).expand(3, -1))
    return torch.cat(parts, dim=1).long()


def slot_of(seq: Sequence, index: int, block_size: int) -> int:
    """Cache slot of token `index` of seq (its block from the block table, then the offset)."""
    return seq.block_table[index // block_size] * block_size + index % block_size


def slots_for(seq: Sequence, start: int, end: int, block_size: int) -> list[int]:
    return [slot_of(seq, i, block_size) for i in range(start, end)]


def image_chunks_for(seq: Sequence, start: int, end: int) -> list[ImageChunk]:
    chunks = []
    for s, e, h in seq.image_spans:
        lo, hi = max(start, s), min(end, e)
        if lo < hi:
            chunks.append(ImageChunk(h, lo - s, hi - s))
    return chunks


def build_decode_batch(out: SchedulerOutput, block_size: int) -> StepBatch:
    """Fast path: one generated token per sequence, positions index + delta on all three axes."""
    seqs = [s.seq for s in out.scheduled]
    ids = [s.token_ids[-1] for s in seqs]
    idx = [s.num_tokens - 1 for s in seqs]
    pos = torch.tensor([i + s.mrope_delta for i, s in zip(idx, seqs)], dtype=torch.long).expand(3, -1)
    slots = [slot_of(s, i, block_size) for i, s in zip(idx, seqs)]
    n = len(seqs)
    return StepBatch(ids, pos, slots, list(range(n + 1)), [i + 1 for i in idx], [s.block_table for s in seqs],
                     list(range(n)), [], True)


def build_verify_batch(out: SchedulerOutput, block_size: int) -> StepBatch:
    """Drafts to verify, as a decode batch: each row's last known token and each draft token is a row of its
    own that attends to the sequence's KV up to itself (seq_len = its index + 1; every row's K/V is stored
    before attention runs), so the step replays a decode CUDA graph of 1 + k rows per sequence instead of an
    eager prefill. Row order is the sampler's: a sequence's positions in order, sequences in batch order."""
    ids, pos, slots, lens, tables = [], [], [], [], []
    for sch in out.scheduled:
        seq = sch.seq
        for j, tok in enumerate(sch.input_ids):
            i = sch.start + j
            ids.append(tok)
            pos.append(i + seq.mrope_delta)
            slots.append(slot_of(seq, i, block_size))
            lens.append(i + 1)
            tables.append(seq.block_table)
    n = len(ids)
    positions = torch.tensor(pos, dtype=torch.long).expand(3, -1)
    return StepBatch(ids, positions, slots, list(range(n + 1)), lens, tables, list(range(n)), [], True)


def build_batch(out: SchedulerOutput, block_size: int) -> StepBatch:
    past_prompts = all(s.start >= s.seq.num_prompt_tokens for s in out.scheduled)
    if out.is_decode and past_prompts:
        return build_decode_batch(out, block_size)
    if out.has_drafts and past_prompts and all(s.num_new_tokens == 1 + len(s.draft) for s in out.scheduled):
        return build_verify_batch(out, block_size)
    ids, pos, slots, cu, lens, tables, logits_idx, images = [], [], [], [0], [], [], [], []
    for sch in out.scheduled:
        seq, start, end = sch.seq, sch.start, sch.start + sch.num_new_tokens
        ids += sch.input_ids
        pos.append(seq_positions(seq, start, end))
        slots += slots_for(seq, start, end, block_size)
        cu.append(cu[-1] + sch.num_new_tokens)
        lens.append(end)
        tables.append(list(seq.block_table))
        images += image_chunks_for(seq, start, end)
        if sch.samples:  # NOTE: a draft is verified at every position: its logits, and the one after it
            logits_idx += list(range(cu[-1] - 1 - len(sch.draft), cu[-1]))
    return StepBatch(ids, torch.cat(pos, dim=1), slots, cu, lens, tables, logits_idx, images, out.is_decode)


def padded_tables(tables: list[list[int]], width: int | None = None) -> torch.Tensor:
    """Block tables as one [B, width] int32 tensor, -1 padded (a single conversion, no per-row tensors)."""
    width = width or max(1, max(len(t) for t in tables))
    return torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)


def continuation_batch(out: SchedulerOutput, block_size: int) -> StepBatch:
    """A continued window's inputs: only each row's first cache slot and its (grown) block table."""
    seqs = [s.seq for s in out.scheduled]
    slots = [slot_of(s.seq, s.start, block_size) for s in out.scheduled]
    empty = torch.zeros(3, 0, dtype=torch.long)
    return StepBatch([], empty, slots, [], [], [s.block_table for s in seqs], [], [], True)


def window_penalties(seqs: list[Sequence]) -> list[tuple[float, float, list[int]]] | None:
    rows = [(s.params.frequency_penalty, s.params.presence_penalty, s.output_token_ids) for s in seqs]
    return rows if any(f or p for f, p, _ in rows) else None


def prepare_step(out: SchedulerOutput, block_size: int) -> ModelStep:
    """The ModelStep of a scheduler output (rank 0 builds it; every rank runs it)."""
    samples = [s.samples for s in out.scheduled]
    if out.continues:
        return ModelStep(continuation_batch(out, block_size), samples, out.num_steps, continues=True)
    batch = build_batch(out, block_size)
    if out.num_steps > 1:
        return ModelStep(batch, samples, out.num_steps, penalties=window_penalties([s.seq for s in out.scheduled]))
    drafts = [s.draft for s in out.scheduled] if out.has_drafts else None
    return ModelStep(batch, samples, sampling=out.sampling_seqs, drafts=drafts)
