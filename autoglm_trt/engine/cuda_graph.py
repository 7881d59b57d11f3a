"""CUDA Graphs for decode steps: one graph per batch-size bucket, sharing one memory pool.

Each graph runs embed -> decoder -> LM head for a padded batch whose inputs live in static buffers;
replay copies the step's inputs into those buffers. Padding rows store nothing (slot -1) and read
one valid block, so they cost a little work and never touch a live sequence's cache.
"""

from __future__ import annotations

import torch

from autoglm_trt.engine.batch import padded_tables
from autoglm_trt.layers.context import AttentionContext, reset_context, set_context


class DecodeGraphs:
    def __init__(self, model, kv_caches, batch_sizes: list[int], max_blocks: int, device: torch.device) -> None:
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.batch_sizes = sorted(set(batch_sizes))
        n = self.batch_sizes[-1]
        self.ids = torch.zeros(n, dtype=torch.long, device=device)
        self.pos = torch.zeros(3, n, dtype=torch.long, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.cu = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.max_blocks = max_blocks
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _forward(self, bs: int) -> torch.Tensor:
        ctx = AttentionContext(self.slots[:bs], self.cu[:bs + 1], self.seq_lens[:bs], self.tables[:bs],
                               max_seqlen_q=1, max_seqlen_k=self.max_blocks * self.kv_caches[0][0].shape[1],
                               is_decode=True, kv_caches=self.kv_caches)
        set_context(ctx)
        try:
            hidden = self.model(self.model.embed(self.ids[:bs]), self.pos[:, :bs])  # [bs, hidden]
            return self.model.compute_logits(hidden)  # [bs, vocab] fp32
        finally:
            reset_context()

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        for bs in reversed(self.batch_sizes):  # largest first: later graphs reuse its pool
            self._forward(bs)  # warm-up: Triton compiles and autotunes outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(bs)
            pool = graph.pool()
            self.graphs[bs] = (graph, out)
        torch.cuda.synchronize(self.device)

    def bucket(self, bs: int) -> int | None:
        return next((b for b in self.batch_sizes if b >= bs), None)

    def run(self, ids: list[int], positions: torch.Tensor, slots: list[int], seq_lens: list[int],
            tables: list[list[int]]) -> torch.Tensor:
        """Replay the graph of the smallest bucket >= len(ids); returns logits [len(ids), vocab]."""
        bs = len(ids)
        padded = self.bucket(bs)
        graph, out = self.graphs[padded]
        dev = self.device
        self.ids[:bs].copy_(torch.tensor(ids), non_blocking=True)
        self.pos[:, :bs].copy_(positions, non_blocking=True)
        self.slots[:padded].fill_(-1)
        self.slots[:bs].copy_(torch.tensor(slots), non_blocking=True)
        self.seq_lens[:padded].fill_(1)
        self.seq_lens[:bs].copy_(torch.tensor(seq_lens, dtype=torch.int32), non_blocking=True)
        table = padded_tables(tables).clamp_(min=0)  # [bs, width]; pads read block 0, never stored to
        self.tables[bs:padded].zero_()
        self.tables[:bs, :table.shape[1]].copy_(table.to(dev, non_blocking=True))
        graph.replay()
        return out[:bs]
