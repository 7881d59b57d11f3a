"""The calibration directory as the runtime reads it: SmoothQuant and INT8 statistics, in safetensors.

`autoglm-trt calibrate` writes it (calibration/cache.py: these statistics, a TensorRT calibration cache
and a JSON summary); the loader reads it to quantize a checkpoint at load time (w8a8 with SmoothQuant).

CALIB_DIR/
  act_amax.safetensors           {key: [1]}  per-tensor amax of each linear input (the chosen method)
  smoothed_act_amax.safetensors  {key: [1]}  the same for the SmoothQuant-smoothed input x / s
  channel_amax.safetensors       {key: [K]}  max |x| per input channel
  smooth_scales.safetensors      {key: [K]}  SmoothQuant s (for smooth_alpha)
  awq_scales.safetensors         {key: [K]}  AWQ's s for int4-awq (calibrate --awq; optional)
  channel_sq_mean.safetensors    {key: [K]}  E[x^2] per input channel, int4-awq's clip search (optional)
  summary.json                   format version, method, options, per-layer figures
Keys are linear keys ("layers.3.mlp.down_proj").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor

from autoglm_trt.errors import UserError

FORMAT_VERSION = 1
SUMMARY_FILE = "summary.json"
STAT_FILES = ("act_amax", "smoothed_act_amax", "channel_amax", "smooth_scales")  # {name}.safetensors
AWQ_FILES = ("awq_scales", "channel_sq_mean")  # written by calibrate --awq


@dataclass
class CalibrationResult:
    method: str  # max | percentile | entropy
    act_amax: dict[str, Tensor]  # key -> [] per-tensor amax of the linear's input
    smoothed_amax: dict[str, Tensor]  # key -> [] per-tensor amax of x / s (the SmoothQuant input)
    channel_amax: dict[str, Tensor]  # key -> [K] max |x| per input channel (over all tokens)
    smooth_scales: dict[str, Tensor]  # key -> [K] s: x / s, W * s
    smooth_alpha: float = 0.5
    percentile: float = 99.99
    num_samples: int = 0
    num_tokens: int = 0
    info: dict = field(default_factory=dict)  # model_dir, dataset, ... (summary.json)
    awq_scales: dict[str, Tensor] = field(default_factory=dict)  # key -> [K] AWQ's s (int4-awq), when searched
    channel_sq_mean: dict[str, Tensor] = field(default_factory=dict)  # key -> [K] E[x^2] (int4-awq clip search)

    @property
    def act_scales(self) -> dict[str, Tensor]:
        """Per-tensor INT8 scales (amax / 127) of the linear inputs: TensorRT's meaning of a scale."""
        return {k: v / 127.0 for k, v in self.act_amax.items()}

    @property
    def smoothed_act_scales(self) -> dict[str, Tensor]:
        return {k: v / 127.0 for k, v in self.smoothed_amax.items()}


def load_calibration(calib_dir: str | Path) -> CalibrationResult:
    """Read a directory written by `autoglm-trt calibrate` (or save_calibration)."""
    d = Path(calib_dir)
    summary_path = d / SUMMARY_FILE
    if not summary_path.is_file():
        raise UserError(f"{d} is not a calibration directory (no {SUMMARY_FILE}); run `autoglm-trt calibrate`")
    summary = json.loads(summary_path.read_text())
    if summary.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{d} has calibration format {summary.get('format_version')}, this version reads "
                        f"{FORMAT_VERSION}: run `autoglm-trt calibrate` again")
    try:
        tensors = [load_file(str(d / f"{n}.safetensors")) for n in STAT_FILES]
    except (OSError, RuntimeError) as exc:
        raise UserError(f"{d}: cannot read the statistics ({exc}); run `autoglm-trt calibrate` again") from None
    act, smoothed, channel, smooth = tensors
    awq, sq = ({} if not (d / f"{n}.safetensors").is_file() else load_file(str(d / f"{n}.safetensors"))
               for n in AWQ_FILES)
    info_keys = ("model_dir", "dataset", "device", "dtype", "max_pixels")
    return CalibrationResult(
        method=summary["method"], act_amax={k: v.reshape(()) for k, v in act.items()},
        smoothed_amax={k: v.reshape(()) for k, v in smoothed.items()}, channel_amax=channel,
        smooth_scales=smooth, smooth_alpha=float(summary["smooth_alpha"]),
        percentile=float(summary.get("percentile", 99.99)), num_samples=int(summary.get("num_samples", 0)),
        num_tokens=int(summary.get("num_tokens", 0)), info={k: summary[k] for k in info_keys if k in summary},
        awq_scales=awq, channel_sq_mean=sq)
