"""`autoglm-trt calibrate`: run the calibration prompts, keep the statistics, write CALIB_DIR.

Observation (hooks on the decoder linears, observers.py) + statistics -> a CalibrationResult, from
which layers/quant.py replays the transform without the data; optionally a Q/DQ ONNX graph and an
accuracy report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from autoglm_trt.calibration.algorithms import METHODS, amax_from_histogram
from autoglm_trt.calibration.cache import (
    DEFAULT_TRT_VERSION,
    CalibrationResult,
    save_calibration,
    update_summary,
)
from autoglm_trt.calibration.observers import AmaxObserver, HistogramObserver
from autoglm_trt.calibration.samples import (
    DEFAULT_DATASET,
    Sample,
    encode,
    forward,
    load_samples,
)
from autoglm_trt.layers.quant import compute_smooth_scales
from autoglm_trt.processing.inputs import InputProcessor
from autoglm_trt.utils.logging import log
from autoglm_trt.utils.progress import step_progress


@dataclass(frozen=True)
class CalibrateOptions:
    method: str = "entropy"  # max | percentile | entropy
    samples: int | None = None  # first N samples of the dataset (None: all)
    smooth_alpha: float = 0.5  # SmoothQuant migration strength
    percentile: float = 99.99
    max_pixels: int | None = None  # image resize bound (None: the processor's default)
    awq: bool = False  # also search AWQ scales (int4-awq): a third pass keeping sampled rows per linear

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"smooth_alpha must be in [0, 1], got {self.smooth_alpha}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _run_all(model: nn.Module, processor: InputProcessor, samples: list[Sample], device: torch.device,
             max_pixels: int | None, label: str | None = None) -> None:
    """Forward every sample; a progress bar (or, off a terminal, a line now and then) when `label` is given."""
    with step_progress(label or "", len(samples), enabled=label is not None) as advance:
        for sample in samples:
            forward(model, encode(processor, sample, max_pixels), device)
            advance()


def collect(model: nn.Module, processor: InputProcessor, samples: list[Sample], opts: CalibrateOptions,
            device: torch.device, show_progress: bool = False) -> CalibrationResult:
    """Two passes over the samples (amax, then histograms unless method == max) -> statistics."""
    passes = 1 if opts.method == "max" else 2
    labels = [f"calibration pass {i}/{passes}" if show_progress else None for i in (1, 2)]
    with AmaxObserver(model) as obs:
        _run_all(model, processor, samples, device, opts.max_pixels, labels[0])
    channel = obs.channel_amax  # key -> [K]
    scales = compute_smooth_scales(model, channel, opts.smooth_alpha)
    inv = {k: 1.0 / s for k, s in scales.items()}
    hi = {k: float(v.max()) for k, v in channel.items()}
    smooth_hi = {k: float((channel[k] * inv[k]).max()) for k in channel}
    act, smoothed = dict(hi), dict(smooth_hi)
    if opts.method != "max":
        with HistogramObserver(model, hi, inv, smooth_hi) as hist:
            _run_all(model, processor, samples, device, opts.max_pixels, labels[1])
        act = {k: amax_from_histogram(hist.hists[k].numpy(), hi[k], opts.method, opts.percentile) for k in hi}
        smoothed = {k: amax_from_histogram(hist.mul_hists[k].numpy(), smooth_hi[k], opts.method, opts.percentile)
                    for k in hi}
    awq_scales, sq_mean = _awq(model, processor, samples, opts, device, show_progress) if opts.awq else ({}, {})
    return CalibrationResult(
        awq_scales=awq_scales, channel_sq_mean=sq_mean,
        method=opts.method, act_amax={k: torch.tensor(v) for k, v in act.items()},
        smoothed_amax={k: torch.tensor(v) for k, v in smoothed.items()},
        channel_amax={k: v.cpu() for k, v in channel.items()}, smooth_scales={k: v.cpu() for k, v in scales.items()},
        smooth_alpha=opts.smooth_alpha, percentile=opts.percentile, num_samples=len(samples),
        num_tokens=obs.num_tokens)


def _awq(model: nn.Module, processor: InputProcessor, samples: list[Sample], opts: CalibrateOptions,
         device: torch.device, show_progress: bool) -> tuple[dict, dict]:
    """AWQ's per-channel scales (searched on sampled calibration rows) and E[x^2] -> (awq_scales, channel_sq_mean)."""
    from autoglm_trt.calibration.awq import AwqObserver, scales_of, search_model

    with AwqObserver(model) as obs:
        _run_all(model, processor, samples, device, opts.max_pixels, "AWQ statistics" if show_progress else None)
    stats = obs.stats()
    if show_progress:
        log(f"searching AWQ scales for {len(stats)} linears")
    return scales_of(search_model(model, stats)), {k: st.sq_mean for k, st in stats.items()}


def calibrate(model_dir: str | Path, out_dir: str | Path, *, dataset: str | Path | None = None,
              opts: CalibrateOptions = CalibrateOptions(), device: str = "auto", dtype: str = "auto",
              onnx: str | Path | None = None, qdq_smooth: bool = True, trt_version: str = DEFAULT_TRT_VERSION,
              show_progress: bool = True) -> CalibrationResult:
    """Calibrate `model_dir` on `dataset` (default: the shipped phone-agent set) and write `out_dir`."""
    from autoglm_trt.models.loader import load_model

    samples = load_samples(dataset, opts.samples)  # NOTE: a bad dataset fails here, not after minutes of loading
    processor = InputProcessor.from_dir(model_dir)
    dev = resolve_device(device)
    model = load_model(model_dir, dtype=dtype, device=dev, show_progress=show_progress)
    if show_progress:
        log(f"calibrating on {len(samples)} samples ({dataset or 'the shipped set'}), method {opts.method}")
    result = collect(model, processor, samples, opts, dev, show_progress=show_progress)
    result.info = {"model_dir": str(Path(model_dir).resolve()), "dataset": str(dataset or DEFAULT_DATASET),
                   "device": str(dev), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                   "max_pixels": opts.max_pixels}
    del model
    save_calibration(result, out_dir, trt_version)
    if onnx is not None:
        from autoglm_trt.calibration.onnx_qdq import check_qdq, insert_qdq

        dst = Path(out_dir) / "decoder_qdq.onnx"
        sites = insert_qdq(onnx, dst, result, smooth=qdq_smooth)
        update_summary(out_dir, onnx={"source": str(onnx), "qdq": dst.name, "smooth": qdq_smooth,
                                      "linears": len(sites), "onnxruntime_rel_err": check_qdq(onnx, dst)})
    return result
