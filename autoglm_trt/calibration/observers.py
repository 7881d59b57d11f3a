"""Observation: forward pre-hooks on every decoder linear record what its input looks like.

Two passes over the calibration set, because a histogram needs its range before the first value:
1. `AmaxObserver`: max |x| per input channel ([K], fp32) -- the SmoothQuant statistic, and the
   per-tensor max that bounds the histograms.
2. `HistogramObserver`: a 2048-bin histogram of |x| over [0, amax] per linear, optionally also of
   the smoothed input |x * m| (m = 1 / s), from which percentile and entropy pick a per-tensor amax.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from autoglm_trt.layers.quant import decoder_linears

NUM_BINS = 2048


class _Hooks:
    """Context manager: one forward pre-hook per decoder linear, calling self.observe(key, x [T, K])."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.handles = model, []

    def __enter__(self):
        for key, lin in decoder_linears(self.model):
            self.handles.append(lin.register_forward_pre_hook(
                lambda _m, args, key=key: self.observe(key, args[0].detach().reshape(-1, args[0].shape[-1]))))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def observe(self, key: str, x: Tensor) -> None:
        raise NotImplementedError


class AmaxObserver(_Hooks):
    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.channel_amax: dict[str, Tensor] = {}  # key -> [K] fp32
        self.num_tokens = 0

    def observe(self, key: str, x: Tensor) -> None:
        amax = x.abs().amax(dim=0).float()  # [K]
        prev = self.channel_amax.get(key)
        self.channel_amax[key] = amax if prev is None else torch.maximum(prev, amax)
        if key == "layers.0.self_attn.qkv_proj":
            self.num_tokens += x.shape[0]


class HistogramObserver(_Hooks):
    """|x| histograms over fixed ranges; `muls[key]` ([K]) adds a second one of |x * mul|."""

    def __init__(self, model: nn.Module, ranges: dict[str, float], muls: dict[str, Tensor] | None = None,
                 mul_ranges: dict[str, float] | None = None, bins: int = NUM_BINS) -> None:
        super().__init__(model)
        self.ranges, self.muls, self.mul_ranges, self.bins = ranges, muls or {}, mul_ranges or {}, bins
        self.hists: dict[str, Tensor] = {}  # key -> [bins] float64 counts
        self.mul_hists: dict[str, Tensor] = {}

    def observe(self, key: str, x: Tensor) -> None:
        x = x.float()
        _accumulate(self.hists, key, x.abs(), self.ranges[key], self.bins)
        mul = self.muls.get(key)
        if mul is not None:
            _accumulate(self.mul_hists, key, (x * mul.to(x.device)).abs(), self.mul_ranges[key], self.bins)


def _accumulate(hists: dict[str, Tensor], key: str, ax: Tensor, hi: float, bins: int) -> None:
    rows = max(1, (1 << 24) // ax.shape[1])  # NOTE: histc counts in fp32: exact below 2**24 per call
    for chunk in ax.split(rows):
        h = torch.histc(chunk, bins=bins, min=0.0, max=max(hi, 1e-12)).double().cpu()  # [bins]
        hists[key] = h if key not in hists else hists[key] + h
