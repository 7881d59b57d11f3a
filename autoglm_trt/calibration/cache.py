"""The calibration directory: statistics in safetensors, a TensorRT calibration cache, a JSON summary.

CALIB_DIR/
  act_amax.safetensors           {key: [1]}  per-tensor amax of each linear input (the chosen method)
  smoothed_act_amax.safetensors  {key: [1]}  the same for the SmoothQuant-smoothed input x / s
  channel_amax.safetensors       {key: [K]}  max |x| per input channel
  smooth_scales.safetensors      {key: [K]}  SmoothQuant s (for smooth_alpha)
  calibration.cache              TensorRT text cache: "<key>.input" and "<key>.smoothed_input" lines
  summary.json                   method, options, per-layer figures, onnx and report results
Keys are linear keys ("layers.3.mlp.down_proj"); ONNX tensor names derive from them (names.py).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from autoglm_trt.calibration.names import onnx_input_name, onnx_smoothed_input_name
from autoglm_trt.errors import UserError
from autoglm_trt.formats.calibration import (AWQ_FILES, FORMAT_VERSION, SUMMARY_FILE,  # noqa: F401 (re-exported)
                                             CalibrationResult, load_calibration)

CACHE_FILE = "calibration.cache"
DEFAULT_TRT_VERSION = "10.0.0"  # NOTE: the header only; pass the installed TensorRT's version when known
_ALGOS = {"entropy": "EntropyCalibration2", "percentile": "EntropyCalibration2", "max": "MinMaxCalibration"}


# ---- TensorRT calibration cache ------------------------------------------------------------------
def float_to_hex(x: float) -> str:
    """The 8 hex digits of the big-endian IEEE float32 (TensorRT's cache encoding)."""
    return struct.pack(">f", x).hex()


def hex_to_float(h: str) -> float:
    return struct.unpack(">f", bytes.fromhex(h))[0]


def trt_version_tag(version: str) -> str:
    """'10.3.0' -> '100300' (NV_TENSORRT_VERSION since 10.0); '8.6.1' -> '8601' (before)."""
    major, minor, patch = (int(p) for p in (version.split(".") + ["0", "0"])[:3])
    return str(major * 10000 + minor * 100 + patch if major >= 10 else major * 1000 + minor * 100 + patch)


def write_trt_cache(path: Path, scales: dict[str, float], method: str, trt_version: str = DEFAULT_TRT_VERSION) -> None:
    lines = [f"TRT-{trt_version_tag(trt_version)}-{_ALGOS[method]}"]
    lines += [f"{name}: {float_to_hex(scale)}" for name, scale in scales.items()]
    Path(path).write_text("\n".join(lines) + "\n")


def read_trt_cache(path: Path) -> tuple[str, dict[str, float]]:
    """-> (header line, {tensor name: scale})."""
    lines = Path(path).read_text().splitlines()
    if not lines or not lines[0].startswith("TRT-"):
        raise UserError(f"{path} is not a TensorRT calibration cache (first line {lines[:1]})")
    scales = {}
    for line in lines[1:]:
        if line.strip():
            name, _, value = line.rpartition(":")
            scales[name.strip()] = hex_to_float(value.strip())
    return lines[0], scales


def trt_cache_scales(result: CalibrationResult) -> dict[str, float]:
    """ONNX tensor name -> scale, for both the plain and the smoothed linear inputs."""
    out = {}
    for key in result.act_amax:
        out[onnx_input_name(key)] = float(result.act_amax[key]) / 127.0
        out[onnx_smoothed_input_name(key)] = float(result.smoothed_amax[key]) / 127.0
    return out


# ---- save / load ---------------------------------------------------------------------------------
def _scalars(d: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().float().reshape(1).cpu().contiguous() for k, v in d.items()}


def _vectors(d: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().float().cpu().contiguous() for k, v in d.items()}


def save_calibration(result: CalibrationResult, out_dir: str | Path, trt_version: str = DEFAULT_TRT_VERSION,
                     extra_summary: dict | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(_scalars(result.act_amax), str(out / "act_amax.safetensors"))
    save_file(_scalars(result.smoothed_amax), str(out / "smoothed_act_amax.safetensors"))
    save_file(_vectors(result.channel_amax), str(out / "channel_amax.safetensors"))
    save_file(_vectors(result.smooth_scales), str(out / "smooth_scales.safetensors"))
    for name in AWQ_FILES:  # NOTE: only when calibrate --awq searched them (int4-awq)
        if getattr(result, name):
            save_file(_vectors(getattr(result, name)), str(out / f"{name}.safetensors"))
    write_trt_cache(out / CACHE_FILE, trt_cache_scales(result), result.method, trt_version)
    summary = {"format_version": FORMAT_VERSION, "method": result.method, "percentile": result.percentile,
               "smooth_alpha": result.smooth_alpha, "num_samples": result.num_samples,
               "num_tokens": result.num_tokens, "trt_cache": CACHE_FILE, "trt_version": trt_version,
               **result.info, "layers": layer_summary(result), **(extra_summary or {})}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return out


def layer_summary(result: CalibrationResult) -> dict[str, dict]:
    """Per linear: amax, smoothed amax, and how outlier-heavy its channels are (max / median)."""
    rows = {}
    for key, ch in result.channel_amax.items():
        med = float(ch.float().median())
        rows[key] = {"amax": round(float(result.act_amax[key]), 6), "max": round(float(ch.max()), 6),
                     "smoothed_amax": round(float(result.smoothed_amax[key]), 6),
                     "channel_outlier_ratio": round(float(ch.max()) / med, 3) if med > 0 else None}
    return rows


def update_summary(calib_dir: str | Path, **fields) -> None:
    path = Path(calib_dir) / SUMMARY_FILE
    summary = json.loads(path.read_text())
    summary.update(fields)
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False))

