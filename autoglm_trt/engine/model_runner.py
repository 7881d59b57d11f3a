"""Runs one ModelStep on this rank: images through the vision tower once (rank 0), the decoder over the
paged KV, then the sampler (rank 0) -> the tokens each row produced.

The runner owns the device state (weights, KV cache, CUDA graphs, encoder cache); the scheduler never
sees a tensor. Decode steps replay a CUDA graph on GPU; greedy decode windows run k steps in self-advancing
graphs (on the CPU the same buffers run eagerly); everything else runs eagerly.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import torch

from autoglm_trt.config import EngineConfig, ModelConfig
from autoglm_trt.engine import kv_cache as kvc
from autoglm_trt.engine.batch import ModelStep, StepBatch, padded_tables
from autoglm_trt.engine.distributed import broadcast_rows, min_over_tp_ranks
from autoglm_trt.engine.outputs import ModelOutput, StepFuture
from autoglm_trt.engine.sequence import Sequence
from autoglm_trt.layers import parallel
from autoglm_trt.layers.context import AttentionContext, reset_context, set_context
from autoglm_trt.layers.sampler import Sampler, SamplingMetadata
from autoglm_trt.plugins.bitmask import apply_token_bitmask_
from autoglm_trt.utils.logging import log


class EncoderCache:
    """Image embeddings by content hash, LRU-bounded in rows (repeated screenshots skip the tower)."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows, self.rows = max_rows, 0
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, key: str) -> torch.Tensor | None:
        if key in self.entries:
            self.entries.move_to_end(key)
        return self.entries.get(key)

    def put(self, key: str, value: torch.Tensor) -> None:
        self.entries[key] = value
        self.rows += value.shape[0]
        while self.rows > self.max_rows and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.rows -= old.shape[0]


class ModelRunner:
    def __init__(self, model, model_cfg: ModelConfig, cfg: EngineConfig, device: torch.device) -> None:
        self.model, self.model_cfg, self.cfg, self.device = model, model_cfg, cfg, device
        self.dtype = next(model.parameters()).dtype
        self.block_size = cfg.cache.block_size
        self.encoder_cache = EncoderCache(max_rows=4 * cfg.scheduler.max_num_batched_tokens + 16384)
        heads = model.language_model.layers[0].self_attn.num_kv_heads
        self.spec = kvc.spec_for(model_cfg, cfg.cache, heads, self.dtype)
        self.steps = cfg.scheduler.num_decode_steps or 1  # resolved by the engine (8 on a GPU by default)
        self.num_blocks = min_over_tp_ranks(self._size_cache())  # TP: every rank holds the same blocks
        self.kv_caches = kvc.allocate_kv_cache(self.spec, self.num_blocks, device)
        self.sampler = Sampler()
        self.graphs = None
        if (device.type == "cuda" and not cfg.enforce_eager) or self.steps > 1:
            self._make_graphs()
        if device.type == "cuda":
            self._warm_dense_attention()

    # ---- start-up --------------------------------------------------------------------------------
    def _size_cache(self) -> int:
        if self.cfg.cache.num_blocks:
            return self.cfg.cache.num_blocks
        if self.device.type != "cuda":
            return kvc.cpu_num_blocks(self.spec, self.cfg.scheduler)
        peak = self._profile_peak_bytes()
        graphs = 0 if self.cfg.enforce_eager else kvc.graph_output_bytes(
            self._graph_sizes(), self.model_cfg.text.vocab_size, self.steps > 1)
        return kvc.gpu_num_blocks(self.spec, self.cfg.cache, self.device, peak, graphs)

    def _graph_sizes(self) -> list[int]:
        return [b for b in self.cfg.cuda_graph_batch_sizes if b <= self.cfg.scheduler.max_num_seqs] or [1]

    @torch.inference_mode()
    def _profile_peak_bytes(self) -> int:
        """Peak memory of the largest prefill step (plain attention, no cache) on top of the weights."""
        torch.cuda.reset_peak_memory_stats(self.device)
        n = min(self.cfg.scheduler.max_num_batched_tokens, self.cfg.scheduler.max_model_len)
        ids = torch.randint(0, 1000, (n,), device=self.device)
        pos = torch.arange(n, device=self.device).expand(3, -1)
        hidden = self.model(self.model.embed(ids), pos)
        self.model.compute_logits(hidden[-self.cfg.scheduler.max_num_seqs:])
        del hidden
        self._profile_vision()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.empty_cache()
        return peak

    def _profile_vision(self) -> None:
        """The vision tower on the largest image the processor lets through (its peak joins the
        profile, so a full-size screenshot can never run out of memory after the KV cache took the rest)."""
        from autoglm_trt.processing.image_processor import ImageProcessor

        if getattr(self.model, "visual", None) is None:
            return
        proc = ImageProcessor.from_dir(self.cfg.model_dir)
        side = int(proc.max_pixels ** 0.5)
        h, w = proc.resized_size(side, side)
        grid = (1, h // proc.patch_size, w // proc.patch_size)
        width = 3 * proc.temporal_patch_size * proc.patch_size ** 2
        pixels = torch.zeros(grid[1] * grid[2], width, dtype=self.dtype, device=self.device)
        self.model.encode_images(pixels, [grid])

    def _make_graphs(self) -> None:
        """Decode buffers per batch bucket: CUDA graphs on a GPU; on the CPU (multi-step windows asked for
        explicitly) the same buffers run eagerly."""
        from autoglm_trt.engine.cuda_graph import DecodeGraphs

        t0 = time.perf_counter()
        sizes = self._graph_sizes()
        max_blocks = -(-self.cfg.scheduler.max_model_len // self.block_size)
        self.graphs = DecodeGraphs(self.model, self.kv_caches, sizes, max_blocks, self.device, max_steps=self.steps)
        self.graphs.capture()
        if not self.graphs.eager:
            log(f"captured {len(self.graphs.graphs)} CUDA graphs (batch {sizes}) in {time.perf_counter() - t0:.1f} s")

    def _warm_dense_attention(self) -> None:
        """cuDNN's SDPA plans for every padded whole-prompt length (layers/attention.py), built now."""
        from autoglm_trt.layers.attention import warm_dense_plans

        t0 = time.perf_counter()
        attn = self.model.language_model.layers[0].self_attn.attn
        most = min(self.cfg.scheduler.max_num_batched_tokens, self.cfg.scheduler.max_model_len)
        try:
            n = warm_dense_plans(attn, most, self.device, self.dtype)
        except Exception as exc:  # NOTE: a warm-up only: requests would build the plans themselves
            log(f"warning: whole-prompt attention warm-up failed ({type(exc).__name__}: {exc}); continuing")
            return
        log(f"whole-prompt attention ready for {n} padded prompt lengths in {time.perf_counter() - t0:.1f} s")

    # ---- one step ------------------------------------------------------------------------------
    def encode_images(self, seqs: list[Sequence]) -> None:
        """Rank 0: run the vision tower once for every image of `seqs` not yet in the encoder cache."""
        todo = {img.content_hash: img for s in seqs for img in s.images if self.encoder_cache.get(img.content_hash) is None}
        if not todo:
            return
        images = list(todo.values())
        exact = self.cfg.image_preprocess_device == "cpu"
        pixels = torch.cat([i.pixels_on(self.device, self.dtype, exact) for i in images])  # [patches, 1176]
        grids = [tuple(i.grid_thw) for i in images]
        with torch.inference_mode():
            embeds = self.model.encode_images(pixels, grids)  # [sum tokens, hidden]
        sizes = [t * h * w // self.model_cfg.vision.spatial_merge_size ** 2 for t, h, w in grids]
        for img, emb in zip(images, embeds.split(sizes)):
            self.encoder_cache.put(img.content_hash, emb)

    @property
    def max_graph_rows(self) -> int:
        """The largest decode batch that replays a CUDA graph (0: none captured)."""
        return self.graphs.batch_sizes[-1] if self.graphs is not None and not self.graphs.eager else 0

    @property
    def max_window_rows(self) -> int:
        """The largest decode batch a multi-step window can run (0: no multi-step buffers)."""
        return self.graphs.batch_sizes[-1] if self.graphs is not None and self.graphs.max_steps > 1 else 0

    @torch.inference_mode()
    def execute(self, step: ModelStep) -> StepFuture:
        """Run one step on this rank's shard -> its tokens (rank 0; other ranks' futures hold None)."""
        if step.is_window:
            return self._launch_window(step)
        logits = self.forward_logits(step.batch)  # [sampling rows, vocab] fp32
        if step.sampling is None:  # NOTE: another tensor-parallel rank: rank 0 samples
            return StepFuture.done(None)
        return StepFuture.done(self._sample(logits, step))

    def _sample(self, logits: torch.Tensor, step: ModelStep) -> ModelOutput:
        if step.drafts is not None:
            return self._verify(logits, step)
        mask = step.logits_mask() if step.logits_mask is not None else None  # NOTE: the CPU works, the GPU runs
        if mask is not None:
            apply_token_bitmask_(logits, *mask)
        meta = SamplingMetadata.from_sequences(step.sampling, self.model_cfg.text.vocab_size, logits.device)
        result = self.sampler(logits, meta)
        tokens, lps = iter(result.token_ids), iter(result.logprobs or [])
        token_ids = [[next(tokens)] if s else [] for s in step.samples]
        if result.logprobs is None:
            return ModelOutput(token_ids)
        logprobs = [[lp] if (lp := next(lps) if s else None) is not None else [] for s in step.samples]
        return ModelOutput(token_ids, logprobs)

    def _verify(self, logits: torch.Tensor, step: ModelStep) -> ModelOutput:
        """Drafts checked against greedy decoding: logits row j of a row with draft d is sampled as if d[:j] had
        been generated (penalties count them), so the kept prefix is exactly what one-token steps would give.
        logits [sum over sampling rows of 1 + len(draft), vocab] -> per row: accepted drafts + the next token."""
        drafts = [d for d, s in zip(step.drafts, step.samples) if s]
        rows = [_Drafted(seq, d[:j]) for seq, d in zip(step.sampling, drafts) for j in range(len(d) + 1)]
        meta = SamplingMetadata.from_sequences(rows, self.model_cfg.text.vocab_size, logits.device)
        tokens = iter(self.sampler(logits, meta).token_ids)
        out = []
        for draft, samples in zip(step.drafts, step.samples):
            if not samples:
                out.append([])
                continue
            picked = [next(tokens) for _ in range(len(draft) + 1)]
            n = next((i for i, (d, t) in enumerate(zip(draft, picked)) if d != t), len(draft))
            out.append(draft[:n] + [picked[n]])
        return ModelOutput(out)

    def _launch_window(self, step: ModelStep) -> StepFuture:
        """Start a window of greedy tokens on the device; the future reads them back in one copy."""
        b, steps, rows = step.batch, step.num_steps, len(step.samples)
        if step.continues:
            self.graphs.continue_multi(b.slot_mapping, b.block_tables, steps)
        else:
            self.graphs.launch_multi(b.input_ids, b.positions.to(self.device), b.slot_mapping, b.seq_lens,
                                     b.block_tables, steps, step.penalties)
        return StepFuture(lambda: ModelOutput([list(r) for r in zip(*self.graphs.collect(steps, rows))]))

    def _image_embeds(self, batch: StepBatch) -> torch.Tensor | None:
        """The step's image-embedding rows: rank 0 reads its encoder cache, and under tensor
        parallelism sends them to the other ranks (which load no vision tower)."""
        rows = batch.num_image_rows
        if not rows:
            return None
        embeds = None
        if parallel.get_tp_rank() == 0:
            embeds = torch.cat([self.encoder_cache.get(c.content_hash)[c.row_start:c.row_end]
                                for c in batch.image_chunks])  # [rows, hidden]
        if parallel.get_tp_size() > 1:
            embeds = broadcast_rows(embeds, rows, self.model_cfg.text.hidden_size, self.dtype)
        return embeds

    def _tables(self, tables: list[list[int]]) -> torch.Tensor:
        return padded_tables(tables).to(self.device, non_blocking=True)

    def _context(self, batch: StepBatch) -> AttentionContext:
        dev, i32 = self.device, torch.int32
        cu = batch.cu_seqlens_q
        return AttentionContext(
            slot_mapping=torch.tensor(batch.slot_mapping, dtype=torch.long).to(dev, non_blocking=True),
            cu_seqlens_q=torch.tensor(cu, dtype=i32).to(dev, non_blocking=True),
            seq_lens=torch.tensor(batch.seq_lens, dtype=i32).to(dev, non_blocking=True),
            block_tables=self._tables(batch.block_tables),
            max_seqlen_q=max(b - a for a, b in zip(cu, cu[1:])), max_seqlen_k=max(batch.seq_lens),
            is_decode=batch.is_decode, kv_caches=self.kv_caches)

    @torch.inference_mode()
    def forward_logits(self, batch: StepBatch) -> torch.Tensor:
        """-> logits [len(batch.logits_indices), vocab] float32 (a decode step replays its CUDA graph)."""
        if batch.is_decode and self.graphs is not None and self.graphs.bucket(batch.num_tokens):
            return self.graphs.run(batch.input_ids, batch.positions.to(self.device), batch.slot_mapping,
                                   batch.seq_lens, batch.block_tables)
        ids = torch.tensor(batch.input_ids, dtype=torch.long).to(self.device, non_blocking=True)
        embeds = self.model.embed(ids, self._image_embeds(batch))
        set_context(self._context(batch))
        try:
            hidden = self.model(embeds, batch.positions.to(self.device))  # [T, hidden]
        finally:
            reset_context()
        rows = torch.tensor(batch.logits_indices, dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, rows))


class _Drafted:
    """A sequence as it would be with `extra` tokens generated (duck-typed for SamplingMetadata)."""

    def __init__(self, seq: Sequence, extra: list[int]) -> None:
        self.seq, self.extra, self.params = seq, extra, seq.params
        self.num_output_tokens = seq.num_output_tokens + len(extra)

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids + self.extra

    @property
    def output_token_ids(self) -> list[int]:
        return self.seq.output_token_ids + self.extra
