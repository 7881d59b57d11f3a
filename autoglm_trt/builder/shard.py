"""Stream one tensor-parallel rank's weights from a checkpoint into `rank{N}.safetensors`.

The model is built on the meta device with the rank's parallel state set, so every parameter has its
sharded shape and its own weight_loader, but no memory. Then, one unit at a time (a decoder layer,
the embedding, a vision block, ...): materialise the unit on the CPU, read just its checkpoint tensors,
let the weight loaders shard them, quantize the unit (INT8 builds), write its state dict at its planned
offsets, and drop it. Peak memory is about two units (the largest: the 1.2 GB embedding of the 9B).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from autoglm_trt.config import ModelConfig
from autoglm_trt.formats.safetensors_io import SafetensorsWriter
from autoglm_trt.models.checkpoint import build_model, load_unit, materialize, plan_entries


@dataclass
class QuantPlan:
    """How each rank's units are quantized (mode "none": not at all)."""

    mode: str = "none"  # none | int8-wo | w8a8 | fp8
    act_quant: str = "dynamic"  # w8a8 activations: dynamic per token, or static per tensor (calibrated)
    calibration: object | None = None  # calibration.CalibrationResult (SmoothQuant statistics), or None


def release(module: nn.Module) -> None:
    """Drop a unit's storage again (back to meta) once it is written."""
    module.to_empty(device="meta")


_CALIB_DICTS = ("channel_amax", "act_amax", "act_scales", "smooth_scales", "smoothed_amax", "awq_scales",
                "channel_sq_mean")


def layer_calibration(calib, layer_idx: int):
    """The calibration of decoder layer `layer_idx`, renamed to layer 0 (a one-layer holder is quantized).

    Duck-typed like layers.quant: the dict attributes keyed by linear name (`...layers.{i}.mlp.down_proj`)
    are filtered to this layer; everything else (smooth_alpha, ...) is kept.
    """
    if calib is None:
        return None
    tag = f"layers.{layer_idx}."
    out = SimpleNamespace(**{k: v for k, v in vars(calib).items() if k not in _CALIB_DICTS}) \
        if hasattr(calib, "__dict__") else SimpleNamespace()
    for attr in _CALIB_DICTS:
        table = getattr(calib, attr, None)
        if isinstance(table, dict):
            setattr(out, attr, {"layers.0." + k[k.find(tag) + len(tag):]: v for k, v in table.items() if tag in k})
    if not hasattr(calib, "channel_amax"):  # a plain {linear: per-channel amax} table is what quant wants then
        return getattr(out, "act_scales", None)
    return out


def quantize_unit(unit: nn.Module, prefix: str, plan: QuantPlan) -> None:
    """INT8 touches the decoder linears (a layer is quantized through a one-layer holder) and the LM head."""
    from autoglm_trt.layers.quant import quantize_lm_head
    from autoglm_trt.layers.quantize import quantize_model

    if prefix == "lm_head":
        quantize_lm_head(unit)
    if not prefix.startswith("language_model.layers."):
        return

    holder = nn.Module()
    holder.layers = nn.ModuleList([unit])
    calib = layer_calibration(plan.calibration, int(prefix.rsplit(".", 1)[1]))
    alpha = getattr(plan.calibration, "smooth_alpha", None) or 0.5
    quantize_model(holder, plan.mode, calib, smooth_alpha=alpha, act_quant=plan.act_quant)


def planned_specs(cfg: ModelConfig, dtype: torch.dtype, plan: QuantPlan) -> dict[str, tuple[torch.dtype, tuple]]:
    """name -> (dtype, shape) of every tensor of this rank's file: the quantization transform run on a meta
    model lays out exactly what quantize_unit will write (and what the engine loader will read)."""
    model = build_model(cfg, dtype)
    if plan.mode != "none":
        from autoglm_trt.layers.quantize import quantize_model

        quantize_model(model, plan.mode, act_quant=plan.act_quant, lm_head=True)
    return {n: (t.dtype, tuple(t.shape)) for n, t in model.state_dict().items()}


def write_rank(cfg: ModelConfig, files: list[Path], out_path: Path, dtype: torch.dtype, plan: QuantPlan,
               metadata: dict[str, str], advance=lambda n=1: None) -> list[str]:
    """Write the current rank's `rank{N}.safetensors`; returns the units in the order written."""
    specs = planned_specs(cfg, dtype, plan)
    model = build_model(cfg, dtype)
    units = plan_entries(model, files)
    with SafetensorsWriter(out_path, specs, metadata) as writer:
        for prefix, entries in units.items():
            unit = model.get_submodule(prefix)
            materialize(unit)
            load_unit(model, prefix, entries)
            if plan.mode != "none":
                quantize_unit(unit, prefix, plan)
            for name, tensor in unit.state_dict(prefix=f"{prefix}.").items():
                writer.write(name, tensor)
            release(unit)
            advance(1)
    return list(units)
