"""AWQ (Lin et al., 2023): activation-aware per-input-channel scales for INT4 weights, as pure functions.

Feeding x / s to W * s leaves a linear's float output unchanged, but the channels that s enlarges lose less to
rounding: AWQ enlarges the channels that large activations multiply. For each linear (q/k/v are one fused
qkv_proj and gate/up one gate_up_proj, so each search covers the linears that share an input):
    s = a ** alpha, normalised to geometric mean 1,   a = mean |x| per input channel (amax when only that exists)
    alpha in {0, 1/20, ..., 19/20}, the one minimising the output error of the quantized linear:
      "samples": ||X W^T - (X / s) Q(W s)^T||^2 over calibration rows X [T, K]   (the published search)
      "stats":   sum_k E[x_k^2] sum_n (W - Q(W s) / s)_nk^2   (a diagonal proxy when only per-channel
                 statistics were recorded; E[x^2] ~ amax^2 when even that is missing)
alpha = 0 (s = 1, plain round-to-nearest) is in the grid, so AWQ never does worse than RTN on its own objective.
o_proj's s is tied across the query heads of one kv head (it folds into v rows: layers/int4_model.py).
Q is layers/int4.py's group-wise quantizer (group 128, asymmetric, fp16 scale). Observation: `AwqObserver`.
GPTQ is not built here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from autoglm_trt.calibration.observers import _Hooks
from autoglm_trt.layers import int4
from autoglm_trt.layers.int4_model import heads_of_kv
from autoglm_trt.layers.quant import decoder_layers

GRID = 20
SAMPLE_ROWS = 256  # calibration rows kept per linear for the "samples" objective


@dataclass
class ChannelStats:
    """What calibration knows about one linear's input x [T, K]."""

    mean_abs: Tensor  # [K] mean |x|: AWQ's activation statistic
    sq_mean: Tensor  # [K] E[x^2]: the diagonal output-error weight (and the clipping search's)
    samples: Tensor | None = None  # [T', K] some calibration rows (None: the "stats" objective)


@dataclass
class AwqResult:
    scale: Tensor  # [K] s: W * s, x / s
    alpha: float  # the exponent chosen (0: plain round-to-nearest won)
    err_rtn: float  # the objective at s = 1
    err_awq: float  # the objective at the chosen s (<= err_rtn)
    objective: str  # "samples" | "stats"


def stats_from_amax(channel_amax: Mapping[str, Tensor]) -> dict[str, ChannelStats]:
    """Today's calibration directories hold max |x| per channel only: a ~ amax, E[x^2] ~ amax^2."""
    return {k: ChannelStats(v.float(), v.float() ** 2) for k, v in channel_amax.items()}


def tied(stat: Tensor, tie: Tensor | None) -> Tensor:
    """Average a per-channel statistic over channels that must share one scale (tie[k]: k's group index)."""
    if tie is None:
        return stat
    tie = tie.to(stat.device)
    sums = torch.zeros(int(tie.max()) + 1, device=stat.device).index_add_(0, tie, stat.float())
    counts = torch.zeros_like(sums).index_add_(0, tie, torch.ones_like(stat, dtype=torch.float32))
    return (sums / counts)[tie]


def candidate_scale(a: Tensor, alpha: float) -> Tensor:
    """s = a ** alpha / geometric mean; channels that never fired keep s = 1."""
    a = a.float()
    live = a > 0
    s = torch.where(live, a.clamp(min=1e-8) ** alpha, torch.ones_like(a))
    s = s / torch.exp(torch.log(s[live]).mean()) if bool(live.any()) else s
    return torch.where(live, s.clamp(1e-4, 1e4), torch.ones_like(s))


def fake_quant(w: Tensor, s: Tensor, group: int) -> Tensor:
    """Q(W s) / s: what the quantized linear multiplies x with, fp32 [N, K]."""
    return int4.dequantize_int4(*int4.quantize_int4(w.float() * s[None, :], group), group) / s[None, :]


def objective(w: Tensor, wq: Tensor, stats: ChannelStats, ref: Tensor | None) -> float:
    """Output error of wq in place of w: on the samples (ref = X W^T) or by the diagonal proxy."""
    if stats.samples is not None:
        x = stats.samples.to(w.device).float()
        return float(((x @ wq.t() - ref) ** 2).sum())
    return float((((w.float() - wq) ** 2) * stats.sq_mean.to(w.device).float()[None, :]).sum())


@torch.no_grad()
def search_scale(w: Tensor, stats: ChannelStats, group: int = int4.GROUP_SIZE, grid: int = GRID,
                 tie: Tensor | None = None) -> AwqResult:
    """AWQ's grid search of alpha for one linear W [N, K] (module docstring)."""
    a = tied(stats.mean_abs.to(w.device).float(), tie)
    ref = stats.samples.to(w.device).float() @ w.float().t() if stats.samples is not None else None  # [T, N]
    best = (None, 0.0, None)  # (err, alpha, s)
    err_rtn = None
    for i in range(grid):
        alpha = i / grid
        s = candidate_scale(a, alpha)
        err = objective(w, fake_quant(w, s, group), stats, ref)
        if i == 0:
            err_rtn = err
        if best[0] is None or err < best[0]:
            best = (err, alpha, s)
    return AwqResult(best[2].cpu(), best[1], err_rtn, best[0], "samples" if ref is not None else "stats")


@torch.no_grad()
def search_model(model: nn.Module, stats: Mapping[str, ChannelStats], group: int = int4.GROUP_SIZE,
                 grid: int = GRID) -> dict[str, AwqResult]:
    """AWQ scales for every decoder linear of an unsharded float model that `stats` covers (keys 'layers.3...')."""
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        for name, lin in (("self_attn.qkv_proj", attn.qkv_proj), ("self_attn.o_proj", attn.o_proj),
                          ("mlp.gate_up_proj", mlp.gate_up_proj), ("mlp.down_proj", mlp.down_proj)):
            key = f"layers.{i}.{name}"
            if key in stats:
                tie = heads_of_kv(attn) if name == "self_attn.o_proj" else None
                out[key] = search_scale(lin.weight, stats[key], group, grid, tie)
    return out


class AwqObserver(_Hooks):
    """Forward pre-hooks on every decoder linear: sum |x|, sum x^2 and up to `rows` sampled rows per linear.

        with AwqObserver(model) as obs:
            run the calibration prompts
        stats = obs.stats()   # {key: ChannelStats}
    """

    def __init__(self, model: nn.Module, rows: int = SAMPLE_ROWS, seed: int = 0) -> None:
        super().__init__(model)
        self.rows, self.gen = rows, torch.Generator().manual_seed(seed)
        self.abs_sum: dict[str, Tensor] = {}  # key -> [K] fp32
        self.sq_sum: dict[str, Tensor] = {}
        self.count: dict[str, int] = {}
        self.kept: dict[str, Tensor] = {}  # key -> [<= rows, K] on the CPU, in the model's dtype

    def observe(self, key: str, x: Tensor) -> None:
        xf = x.float()
        self.abs_sum[key] = xf.abs().sum(0) + self.abs_sum.get(key, 0.0)
        self.sq_sum[key] = (xf * xf).sum(0) + self.sq_sum.get(key, 0.0)
        seen = self.count.get(key, 0)
        self.count[key] = seen + x.shape[0]
        if self.rows:
            self.kept[key] = self._merge(self.kept.get(key), seen, x.detach().cpu())

    def _merge(self, old: Tensor | None, seen: int, new: Tensor) -> Tensor:
        """A uniform-ish sample of all rows so far, at most `rows`: old and new share it by their row counts."""
        total = seen + new.shape[0]
        n_old = 0 if old is None else min(old.shape[0], round(self.rows * seen / total))
        n_new = min(new.shape[0], self.rows - n_old)
        parts = [new[torch.randperm(new.shape[0], generator=self.gen)[:n_new]]]
        if n_old:
            parts.insert(0, old[torch.randperm(old.shape[0], generator=self.gen)[:n_old]])
        return torch.cat(parts)

    def stats(self) -> dict[str, ChannelStats]:
        return {key: ChannelStats((self.abs_sum[key] / n).cpu(), (self.sq_sum[key] / n).cpu(), self.kept.get(key))
                for key, n in self.count.items()}


def scales_of(results: Mapping[str, AwqResult]) -> dict[str, Tensor]:
    """{key: s [K]}: what layers/int4_model.quantize_model_int4 takes (and a calibration cache stores)."""
    return {k: r.scale for k, r in results.items()}


def summary(results: Mapping[str, AwqResult]) -> dict[str, dict]:
    """Per linear: alpha and the objective's drop, for summary.json and reports."""
    return {k: {"alpha": r.alpha, "objective": r.objective, "err_rtn": r.err_rtn, "err_awq": r.err_awq,
                "ratio": r.err_awq / r.err_rtn if r.err_rtn else None} for k, r in results.items()}


__all__ = ["AwqObserver", "AwqResult", "ChannelStats", "GRID", "candidate_scale", "fake_quant", "objective",
           "scales_of", "search_model", "search_scale", "stats_from_amax", "summary", "tied"]
