"""The one loader: `load_model` reads a Hugging Face checkpoint (models/checkpoint.py: the weight loaders shard
it for the current tensor-parallel state) or an engine directory (models/engine_loader.py: one pre-sharded,
pre-quantized rank file), and `apply_quantization` runs the quantization transform on a loaded checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from autoglm_trt.config import ModelConfig
from autoglm_trt.formats.manifest import is_engine_dir
from autoglm_trt.models.checkpoint import build_model, checkpoint_files, load_unit, plan_entries, resolve_dtype
from autoglm_trt.models.engine_loader import load_engine_model
from autoglm_trt.models.glm4v import Glm4vForConditionalGeneration


def load_model(model_dir: str | Path, dtype: str = "auto", device: str | torch.device = "cpu",
               with_vision: bool = True, show_progress: bool = True, rank: int | None = None,
               tp_size: int | None = None) -> Glm4vForConditionalGeneration:
    """Build the model from `model_dir/config.json` and load its weights.

    An engine directory (`autoglm-trt build`, recognised by its manifest) loads its pre-sharded,
    pre-quantized `rank{rank}.safetensors` after the manifest's checks (rank/tp_size default to the TP
    state). A checkpoint is sharded by the weight loaders for the current TP state (rank/tp_size unused).
    """
    from autoglm_trt.utils.progress import byte_progress

    if is_engine_dir(model_dir):
        return load_engine_model(model_dir, dtype, device, with_vision, rank=rank, tp_size=tp_size,
                                 show_progress=show_progress)
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    files = checkpoint_files(model_dir)
    device = torch.device(device)
    model = build_model(cfg, resolve_dtype(dtype, cfg, device), device, with_vision)
    units = plan_entries(model, files)
    total = sum(f.stat().st_size for f in files)
    with byte_progress("Loading weights", total, enabled=show_progress) as advance:
        for prefix, entries in units.items():
            load_unit(model, prefix, entries, advance)
    return model.eval()


def apply_quantization(model, quant: str, calib_dir: str | None, act_quant: str = "dynamic") -> None:
    """Quantize a freshly loaded (already sharded) model in place: "none" or one of config.QUANT_MODES."""
    if quant == "none":
        return
    from autoglm_trt.layers.quant import quantize_vision
    from autoglm_trt.layers.quantize import quantize_model

    if not getattr(model, "quant_config", None):  # engine dirs come pre-quantized
        from autoglm_trt.formats.calibration import load_calibration

        calib = load_calibration(calib_dir) if calib_dir else None
        quantize_model(model, quant, calib, act_quant=act_quant)
    quantize_vision(model, quant)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
