"""The one place that names decoder linears and their ONNX tensors (the builder uses these too).

A linear key is "layers.{i}.{self_attn.qkv_proj | self_attn.o_proj | mlp.gate_up_proj | mlp.down_proj}".
In an exported decoder graph:
  "{key}.weight"          the weight initializer (what torch.onnx.export(dynamo=True) names it, with any
                          module prefix such as "language_model." before "layers.")
  "{key}.input"           the activation feeding the linear (canonicalize_linear_inputs renames it so)
  "{key}.smoothed_input"  the SmoothQuant-smoothed activation (x / s) when insert_qdq(smooth=True)
The TensorRT calibration cache is keyed by the last two.
"""

from __future__ import annotations

import re

from autoglm_trt.layers.quant import DECODER_LINEARS, canonical_key, linear_key

LINEAR_WEIGHT_RE = re.compile(r"(?:^|[./])(layers\.\d+\.(?:" + "|".join(re.escape(n) for n in DECODER_LINEARS)
                              + r"))\.weight$")


def onnx_input_name(key: str) -> str:
    return f"{key}.input"


def onnx_smoothed_input_name(key: str) -> str:
    return f"{key}.smoothed_input"


def onnx_weight_name(key: str) -> str:
    return f"{key}.weight"


def key_of_weight(initializer_name: str) -> str | None:
    """'language_model.layers.3.mlp.down_proj.weight' -> 'layers.3.mlp.down_proj'; None for other tensors."""
    m = LINEAR_WEIGHT_RE.search(initializer_name)
    return m.group(1) if m else None


__all__ = ["DECODER_LINEARS", "canonical_key", "key_of_weight", "linear_key", "onnx_input_name",
           "onnx_smoothed_input_name", "onnx_weight_name"]
