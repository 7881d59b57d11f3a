"""Compile the exported ONNX graphs to TensorRT engines with their optimization profiles.

NOTE: untested. TensorRT is not installable on the machines this was written on (no `tensorrt` wheel
works there and the GPU hosts have none); every path below `require_tensorrt()` has never run.
"""

from __future__ import annotations

import json
from pathlib import Path

from autoglm_trt.errors import UserError

_PRECISION_FLAGS = {"float16": "FP16", "bfloat16": "BF16", "float32": None}


def require_tensorrt():
    """The tensorrt module, or a one-line UserError (the CLI exits 2)."""
    try:
        import tensorrt
    except Exception as exc:  # noqa: BLE001 -- ImportError, or a broken install raising OSError on its libs
        raise UserError(f"TensorRT is not installable here (`import tensorrt` failed: {type(exc).__name__}); "
                        "build with --backend torch, the default, which needs no TensorRT") from None
    return tensorrt


def gpu_info() -> dict:
    import torch

    if not torch.cuda.is_available():
        raise UserError("--backend tensorrt builds for the GPU it runs on, and no CUDA GPU is visible")
    major, minor = torch.cuda.get_device_capability()
    return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def compile_engine(onnx_path: Path, profiles: dict[str, dict], out_path: Path, dtype: str,
                   workspace_gb: int = 8) -> Path:  # pragma: no cover - needs TensorRT (untested)
    """profiles: name -> {input: {"min", "opt", "max"}}; one TensorRT optimization profile each."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # NOTE: from a file, so external data is found
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gb << 30)
    flag = _PRECISION_FLAGS[dtype]
    if flag is not None:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for dims in profiles.values():
        profile = builder.create_optimization_profile()
        for name, shape in dims.items():
            profile.set_shape(name, shape["min"], shape["opt"], shape["max"])
        config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise UserError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    out_path.write_bytes(bytes(blob))
    return out_path


def compile_all(engine_dir: Path, dtype: str) -> list[Path]:  # pragma: no cover - needs TensorRT (untested)
    """llm/model.onnx -> llm.engine (context + generation profiles); visual/model.onnx -> visual.engine."""
    profiles = json.loads((engine_dir / "profiles.json").read_text())
    out = []
    for graph in ("llm", "visual"):
        onnx_path = engine_dir / graph / "model.onnx"
        if onnx_path.is_file():
            out.append(compile_engine(onnx_path, profiles[graph], engine_dir / f"{graph}.engine", dtype))
    return out
