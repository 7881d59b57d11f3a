"""One step's bitmasks for the rows that carry a constraint, ready for plugins.bitmask.apply_token_bitmask_.

The engine keeps one StepBitmasks for its largest batch. Per step it lists the rows whose grammar state
constrains the next token; `fill` computes their masks on the CPU (llguidance's thread pool, GIL released)
into pinned memory and copies them to the logits' device without blocking. Rows without a constraint are not
listed: their logits are never touched, and a step without any constrained row costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autoglm_trt.processing.structured.state import GrammarState, allocate_bitmask, fill_bitmasks

if TYPE_CHECKING:
    import torch


class StepBitmasks:
    def __init__(self, max_rows: int, vocab_size: int, device: "torch.device | str" = "cpu") -> None:
        import torch

        self.device = torch.device(device)
        pin = self.device.type == "cuda"
        self.cpu = allocate_bitmask(max_rows, vocab_size, pin_memory=pin)  # [max_rows, W] int32
        self.rows_cpu = torch.zeros(max_rows, dtype=torch.int64, pin_memory=pin)  # [max_rows]
        if pin:
            self.dev, self.rows_dev = self.cpu.to(self.device), self.rows_cpu.to(self.device)
        else:
            self.dev, self.rows_dev = self.cpu, self.rows_cpu

    def fill(self, rows: list[tuple[GrammarState, int]]) -> "tuple[torch.Tensor, torch.Tensor] | None":
        """(bitmask `[R, W]`, logits rows `[R]`) on the device for the constrained (state, logits row)
        pairs of `rows`; None when none is constrained (the step skips masking altogether)."""
        live = [(state, row) for state, row in rows if state.constrained]
        if not live:
            return None
        n = len(live)
        if n > self.cpu.shape[0]:
            raise ValueError(f"{n} constrained rows, but the buffer holds {self.cpu.shape[0]}")
        fill_bitmasks([(state, i) for i, (state, _) in enumerate(live)], self.cpu)
        for i, (_, row) in enumerate(live):
            self.rows_cpu[i] = row
        if self.dev is self.cpu:
            return self.cpu[:n], self.rows_cpu[:n]
        # NOTE: async from pinned memory; the next fill must wait for the copy (the engine's step order
        # does: it reads the sampled tokens, a sync, before it fills again)
        self.dev[:n].copy_(self.cpu[:n], non_blocking=True)
        self.rows_dev[:n].copy_(self.rows_cpu[:n], non_blocking=True)
        return self.dev[:n], self.rows_dev[:n]
