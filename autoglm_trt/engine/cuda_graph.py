"""CUDA Graphs for decode steps: one graph per batch-size bucket, sharing one memory pool.

Each graph runs embed -> decoder -> LM head for a padded batch whose inputs live in static buffers;
replay copies the step's inputs into those buffers. Padding rows store nothing (slot -1) and read
one valid block, so they cost a little work and never touch a live sequence's cache.

Multi-step graphs go further for greedy batches: they also apply frequency/presence penalties, take
the argmax, record it, and advance ids/positions/slots in place, so K replays decode K tokens with no
CPU round trip in between (the CPU's per-step work is paid once per K tokens). A window is launched
(`launch_multi`), read back (`collect`) and may be continued (`continue_multi`) with only the inputs
that do not depend on its tokens (slots, block tables): the engine launches window N+1 before it
does window N's CPU work, so that work overlaps the GPU.

On the CPU (tests) nothing is captured: a "replay" runs the same step eagerly on the same buffers.
"""

from __future__ import annotations

import torch

from autoglm_trt.engine.batch import padded_tables
from autoglm_trt.layers.context import AttentionContext, reset_context, set_context
from autoglm_trt.layers.sampler import SamplingMetadata, apply_penalties


class DecodeGraphs:
    def __init__(self, model, kv_caches, batch_sizes: list[int], max_blocks: int, device: torch.device,
                 max_steps: int = 1) -> None:
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.eager = device.type != "cuda"  # CPU (tests): "replays" run the step eagerly
        self.batch_sizes = sorted(set(batch_sizes))
        n, dev = self.batch_sizes[-1], device
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.pos = torch.zeros(3, n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=dev)
        self.cu = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.max_blocks, self.page = max_blocks, kv_caches[0][0].shape[1]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.max_steps = max_steps
        self.multi: dict[int, torch.cuda.CUDAGraph] = {}
        if max_steps > 1:
            vocab = model.cfg.text.vocab_size
            self.valid = torch.zeros(n, dtype=torch.bool, device=dev)
            self.freq = torch.zeros(n, dtype=torch.float32, device=dev)
            self.pres = torch.zeros(n, dtype=torch.float32, device=dev)
            self.counts = torch.zeros(n, vocab, dtype=torch.float32, device=dev)  # generated-token counts
            self.ones = torch.ones(n, 1, dtype=torch.float32, device=dev)
            self.history = torch.zeros(max_steps, n, dtype=torch.long, device=dev)  # [K, n] argmax per step
            self.step = torch.zeros(1, dtype=torch.long, device=dev)
            self.host_history = torch.zeros(max_steps, n, dtype=torch.long, pin_memory=not self.eager)
            self.done = None if self.eager else torch.cuda.Event()  # the last window's history is on the host

    def _forward(self, bs: int) -> torch.Tensor:
        ctx = AttentionContext(self.slots[:bs], self.cu[:bs + 1], self.seq_lens[:bs], self.tables[:bs],
                               max_seqlen_q=1, max_seqlen_k=self.max_blocks * self.page,
                               is_decode=True, kv_caches=self.kv_caches)
        set_context(ctx)
        try:
            hidden = self.model(self.model.embed(self.ids[:bs]), self.pos[:, :bs])  # [bs, hidden]
            return self.model.compute_logits(hidden)  # [bs, vocab] fp32
        finally:
            reset_context()

    def _advance(self, bs: int) -> None:
        """One greedy step that feeds itself: logits -> penalties -> argmax -> next inputs."""
        meta = SamplingMetadata(temperature=self.freq[:bs], greedy=self.valid[:bs], all_greedy=True,
                                frequency_penalty=self.freq[:bs], presence_penalty=self.pres[:bs],
                                output_counts=self.counts[:bs])
        tok = apply_penalties(self._forward(bs), meta).argmax(-1)  # [bs]
        self.history[:, :bs].index_copy_(0, self.step, tok.unsqueeze(0))
        self.step.add_(1)
        self.counts[:bs].scatter_add_(1, tok.unsqueeze(1), self.ones[:bs])
        self.ids[:bs].copy_(tok)
        self.pos[:, :bs].add_(1)
        valid = self.valid[:bs]
        self.seq_lens[:bs] = torch.where(valid, self.seq_lens[:bs] + 1, 1)
        idx = self.seq_lens[:bs].long() - 1  # [bs] position of the next token
        blk = self.tables[:bs].gather(1, (idx // self.page).unsqueeze(1)).squeeze(1).long()
        self.slots[:bs] = torch.where(valid, blk * self.page + idx % self.page, -1)

    @torch.inference_mode()
    def capture(self) -> None:
        if self.eager:
            return
        pool = None
        for bs in reversed(self.batch_sizes):  # largest first: later graphs reuse its pool
            self._forward(bs)  # warm-up: Triton compiles and autotunes outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(bs)
            pool = graph.pool()
            self.graphs[bs] = (graph, out)
            if self.max_steps > 1:
                self.multi[bs] = self._capture_advance(bs, pool)
        torch.cuda.synchronize(self.device)

    def _capture_advance(self, bs: int, pool) -> torch.cuda.CUDAGraph:
        saved = [t.clone() for t in (self.ids, self.pos, self.slots, self.seq_lens)]
        self.step.zero_()
        self._advance(bs)  # warm-up (writes into buffers we restore below)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self._advance(bs)
        for buf, old in zip((self.ids, self.pos, self.slots, self.seq_lens), saved):
            buf.copy_(old)
        return graph

    def bucket(self, bs: int) -> int | None:
        return next((b for b in self.batch_sizes if b >= bs), None)

    def _load(self, ids: list[int], positions: torch.Tensor, slots: list[int], seq_lens: list[int],
              tables: list[list[int]]) -> int:
        """Copy one step's inputs into the static buffers; returns the padded batch size."""
        bs, padded, dev = len(ids), self.bucket(len(ids)), self.device
        self.ids[:bs].copy_(torch.tensor(ids), non_blocking=True)
        self.pos[:, :bs].copy_(positions, non_blocking=True)
        self.slots[:padded].fill_(-1)
        self.slots[:bs].copy_(torch.tensor(slots), non_blocking=True)
        self.seq_lens[:padded].fill_(1)
        self.seq_lens[:bs].copy_(torch.tensor(seq_lens, dtype=torch.int32), non_blocking=True)
        table = padded_tables(tables).clamp_(min=0)  # [bs, width]; pads read block 0, never stored to
        self.tables[bs:padded].zero_()
        self.tables[:bs, :table.shape[1]].copy_(table.to(dev, non_blocking=True))
        return padded

    def run(self, ids, positions, slots, seq_lens, tables) -> torch.Tensor:
        """Replay the graph of the smallest bucket >= len(ids); returns logits [len(ids), vocab]."""
        padded = self._load(ids, positions, slots, seq_lens, tables)
        if self.eager:
            return self._forward(padded)[:len(ids)]
        graph, out = self.graphs[padded]
        graph.replay()
        return out[:len(ids)]

    def launch_multi(self, ids, positions, slots, seq_lens, tables, steps: int,
                     penalties: list[tuple[float, float, list[int]]] | None) -> None:
        """Start a window of `steps` greedy tokens (asynchronous on the GPU; read it with `collect`).

        `penalties[i]` = (frequency, presence, generated token ids so far) of row i, or None for none.
        """
        bs = len(ids)
        padded = self._load(ids, positions, slots, seq_lens, tables)
        self.valid[:padded].fill_(False)
        self.valid[:bs].fill_(True)
        self.counts[:padded].zero_()
        self.freq[:padded].zero_()
        self.pres[:padded].zero_()
        if penalties:
            self._load_penalties(penalties)
        self._replay(padded, bs, steps)

    def continue_multi(self, slots: list[int], tables: list[list[int]], steps: int) -> None:
        """Start the next window of the same rows: ids, positions, lengths and penalty counts carry on
        on the device; only the first token's cache slots and the (grown) block tables are new."""
        bs, dev = len(slots), self.device
        self.slots[:bs].copy_(torch.tensor(slots), non_blocking=True)
        table = padded_tables(tables).clamp_(min=0)  # [bs, width]
        self.tables[:bs, :table.shape[1]].copy_(table.to(dev, non_blocking=True))
        self._replay(self.bucket(bs), bs, steps)

    def _replay(self, padded: int, bs: int, steps: int) -> None:
        self.step.zero_()
        for _ in range(steps):
            if self.eager:
                self._advance(padded)
            else:
                self.multi[padded].replay()
        self.host_history[:steps, :bs].copy_(self.history[:steps, :bs], non_blocking=True)
        if not self.eager:
            self.done.record()

    def collect(self, steps: int, bs: int) -> list[list[int]]:
        """Wait for the last launched window -> its tokens [steps][bs]."""
        if not self.eager:
            self.done.synchronize()
        return self.host_history[:steps, :bs].tolist()

    def _load_penalties(self, penalties: list[tuple[float, float, list[int]]]) -> None:
        bs = len(penalties)
        self.freq[:bs].copy_(torch.tensor([p[0] for p in penalties], dtype=torch.float32), non_blocking=True)
        self.pres[:bs].copy_(torch.tensor([p[1] for p in penalties], dtype=torch.float32), non_blocking=True)
        for i, (_, _, toks) in enumerate(penalties):
            if toks:
                ids = torch.tensor(toks, dtype=torch.long, device=self.device)
                self.counts[i].scatter_add_(0, ids, torch.ones(len(toks), device=self.device))
