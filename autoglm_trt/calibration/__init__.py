"""INT8 calibration: activation statistics, SmoothQuant scales, TensorRT cache, Q/DQ ONNX, accuracy report.

    calibrate(model_dir, out_dir, dataset=None, opts=CalibrateOptions(method="entropy"))  # writes CALIB_DIR
    load_calibration(calib_dir) -> CalibrationResult      # replay: layers.quant.quantize_model(model, mode, result)
    insert_qdq(onnx_in, onnx_out, result, smooth=True)    # explicit Q/DQ graph for TensorRT
    accuracy_report(model_dir, calib_dir, mode) -> dict   # INT8 in memory vs float
    engine_accuracy_report(model_dir, engine_dir) -> dict  # a built engine vs its checkpoint (build --report)
Names of linears and ONNX tensors: names.py. The heavy parts (model loading, onnx) import on first use.
"""

from __future__ import annotations

import importlib

from autoglm_trt.calibration.cache import (
    CalibrationResult,
    load_calibration,
    read_trt_cache,
    save_calibration,
)
from autoglm_trt.calibration.names import (
    onnx_input_name,
    onnx_smoothed_input_name,
    onnx_weight_name,
)

_LAZY = {"calibrate": "runner", "CalibrateOptions": "runner", "accuracy_report": "report",
         "engine_accuracy_report": "report",
         "insert_qdq": "onnx_qdq", "canonicalize_linear_inputs": "onnx_qdq", "check_qdq": "onnx_qdq"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"autoglm_trt.calibration.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'autoglm_trt.calibration' has no attribute {name!r}")


__all__ = ["CalibrateOptions", "CalibrationResult", "accuracy_report", "calibrate", "canonicalize_linear_inputs",
           "engine_accuracy_report",
           "check_qdq", "insert_qdq", "load_calibration", "onnx_input_name", "onnx_smoothed_input_name",
           "onnx_weight_name", "read_trt_cache", "save_calibration"]
