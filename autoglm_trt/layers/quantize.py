"""The one quantization transform, by mode: INT8 and FP8 (layers/quant.py), INT4 with AWQ (layers/int4_model.py).

Quantization is observation, then this transform: `calibrate` observes (activation statistics, SmoothQuant and
AWQ scales, saved as a calibration directory), and `quantize_model` rewrites the decoder's linears from them.
The same call runs at build time on each rank's float weights, at load time on a loaded checkpoint, and on a
meta-device model, where it only lays out the quantized parameters that an engine's rank file then fills.
"""

from __future__ import annotations

from torch import nn

from autoglm_trt.layers import quant
from autoglm_trt.layers.int4_model import MODE as INT4_MODE
from autoglm_trt.layers.int4_model import quantize_model_int4


def quantize_model(model: nn.Module, mode: str, calib=None, *, act_quant: str = "dynamic", lm_head: bool = True,
                   smooth_alpha: float | None = None) -> None:
    """Quantize the decoder linears (and the LM head, unless lm_head=False) in place, after TP sharding.

    calib: a CalibrationResult (duck-typed: SmoothQuant's channel_amax / smooth_scales for w8a8, AWQ's awq_scales
    and channel_sq_mean for int4-awq), a {linear key: per-channel amax} table (w8a8), or None."""
    if mode == INT4_MODE:
        quantize_model_int4(model, _table(calib, "awq_scales"), _table(calib, "channel_sq_mean"), lm_head=lm_head)
        return
    alpha = smooth_alpha if smooth_alpha is not None else getattr(calib, "smooth_alpha", None) or 0.5
    quant.quantize_model(model, mode, calib, alpha, act_quant=act_quant, lm_head=lm_head)


def _table(calib, name: str) -> dict | None:
    table = getattr(calib, name, None)
    return dict(table) if table else None
