"""Stream one tensor-parallel rank's weights from a checkpoint into `rank{N}.safetensors`.

The model is built on the meta device with the rank's parallel state set, so every parameter has its
sharded shape and its own weight_loader, but no memory. Then, one unit at a time (a decoder layer,
the embedding, a vision block, ...): materialise the unit on the CPU, read just its checkpoint tensors,
let the weight loaders shard them, quantize the unit (INT8 builds), write its state dict at its planned
offsets, and drop it. Peak memory is about two units (the largest: the 1.2 GB embedding of the 9B).
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from torch import nn

from autoglm_trt.builder.safetensors_io import SafetensorsWriter
from autoglm_trt.config import ModelConfig
from autoglm_trt.errors import UserError
from autoglm_trt.layers import parallel
from autoglm_trt.layers.linear import default_weight_loader
from autoglm_trt.models.glm4v import Glm4vForConditionalGeneration
from autoglm_trt.models.loader import hf_to_ours, resolve_param


@dataclass(frozen=True)
class LoadEntry:
    key: str  # checkpoint tensor name
    file: Path  # the safetensors file holding it
    target: str  # our parameter name
    shard: str | None  # packed-module shard id ("q", "k", "v") or None


@dataclass
class QuantPlan:
    """How each rank's units are quantized (mode "none": not at all)."""

    mode: str = "none"  # none | int8-wo | w8a8 | fp8
    act_quant: str = "dynamic"  # w8a8 activations: dynamic per token, or static per tensor (calibrated)
    calibration: object | None = None  # calibration.CalibrationResult (SmoothQuant statistics), or None


@contextmanager
def parallel_state(rank: int, world: int):
    """Set the tensor-parallel state for building one rank; restore the caller's afterwards."""
    saved = parallel._STATE  # NOTE: read to restore exactly (group included); layers/parallel has no getter
    parallel.set_parallel_state(rank, world)
    try:
        yield
    finally:
        parallel.set_parallel_state(saved.rank, saved.world_size, saved.group)


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device = "meta",
                with_vision: bool = True) -> Glm4vForConditionalGeneration:
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return Glm4vForConditionalGeneration(cfg, with_vision=with_vision)
    except ValueError as exc:  # a size that does not divide by the tensor-parallel size
        raise UserError(f"this model cannot be split {parallel.get_tp_size()} ways: {exc}") from None
    finally:
        torch.set_default_dtype(default)


def unit_of(model: nn.Module, name: str) -> str:
    """The unit a parameter belongs to: `language_model.layers.3`, `visual.blocks.0`, `lm_head`, ..."""
    parts = name.split(".")[:-1]
    head = ".".join(parts[:2])
    if len(parts) > 2 and isinstance(model.get_submodule(head), nn.ModuleList):
        return ".".join(parts[:3])
    return head


def plan_entries(model: nn.Module, files: list[Path]) -> dict[str, list[LoadEntry]]:
    """unit -> the checkpoint tensors it loads, from the safetensors headers only (no tensor data)."""
    params = dict(model.named_parameters())
    units: dict[str, list[LoadEntry]] = defaultdict(list)
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
        for key in keys:
            name = hf_to_ours(key)
            if name.startswith("visual.") and getattr(model, "visual", None) is None:
                continue
            target, shard = resolve_param(model, name)
            if target not in params:
                if "rotary" in name or name.endswith("inv_freq"):
                    continue
                raise UserError(f"checkpoint tensor {key!r} has no place in a GLM-4.1V model: wrong checkpoint?")
            units[unit_of(model, target)].append(LoadEntry(key, path, target, shard))
    return dict(units)


def materialize(module: nn.Module, device: str | torch.device = "cpu") -> None:
    """Give a meta module real (uninitialised) storage, keeping each parameter's attributes (weight_loader)."""
    for sub in module.modules():
        for pname, p in list(sub._parameters.items()):
            if p is not None and p.is_meta:
                new = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=False)
                new.__dict__.update(p.__dict__)
                sub._parameters[pname] = new
        for bname, b in list(sub._buffers.items()):
            if b is not None and b.is_meta:
                sub._buffers[bname] = torch.empty(b.shape, dtype=b.dtype, device=device)


def release(module: nn.Module) -> None:
    """Drop a unit's storage again (back to meta) once it is written."""
    module.to_empty(device="meta")


def load_unit(model: nn.Module, entries: list[LoadEntry]) -> None:
    """Read this unit's checkpoint tensors and hand each to its parameter's weight_loader."""
    params = dict(model.named_parameters())
    by_file: dict[Path, list[LoadEntry]] = defaultdict(list)
    for e in entries:
        by_file[e.file].append(e)
    for path, group in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for e in group:
                param = params[e.target]
                loader = getattr(param, "weight_loader", default_weight_loader)
                tensor = f.get_tensor(e.key).to(param.dtype)
                try:
                    loader(param, tensor, e.shard) if e.shard else loader(param, tensor)
                except ValueError as exc:
                    raise UserError(f"checkpoint tensor {e.key!r}: {exc}") from None
                del tensor


def check_unit_complete(unit: nn.Module, prefix: str, entries: list[LoadEntry], packed: dict) -> None:
    seen = {(e.target, e.shard) for e in entries}
    for name, _ in unit.named_parameters(prefix=prefix):
        shards = [s for d, s in packed.values() if f".{d}." in name] or [None]
        missing = [s for s in shards if (name, s) not in seen]
        if missing:
            label = f"{name} ({missing[0]})" if missing[0] else name
            raise UserError(f"checkpoint is missing {label}: incomplete download?")


_CALIB_DICTS = ("channel_amax", "act_amax", "act_scales", "smooth_scales", "smoothed_amax")


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
    from autoglm_trt.layers.quant import quantize_lm_head, quantize_model

    if prefix == "lm_head":
        quantize_lm_head(unit)
    if not prefix.startswith("language_model.layers."):
        return

    holder = nn.Module()
    holder.layers = nn.ModuleList([unit])
    calib = layer_calibration(plan.calibration, int(prefix.rsplit(".", 1)[1]))
    alpha = getattr(plan.calibration, "smooth_alpha", None) or 0.5
    quantize_model(holder, plan.mode, act_scales=calib, smooth_alpha=alpha, act_quant=plan.act_quant)


def planned_specs(cfg: ModelConfig, dtype: torch.dtype, plan: QuantPlan) -> dict[str, tuple[torch.dtype, tuple]]:
    """name -> (dtype, shape) of every tensor of this rank's file, from a meta model (prepared for INT8)."""
    model = build_model(cfg, dtype)
    if plan.mode != "none":
        from autoglm_trt.layers.quant import prepare_quantized_model

        prepare_quantized_model(model, plan.mode, act_quant=plan.act_quant, lm_head=True)
    return {n: (t.dtype, tuple(t.shape)) for n, t in model.state_dict().items()}


def write_rank(cfg: ModelConfig, files: list[Path], out_path: Path, dtype: torch.dtype, plan: QuantPlan,
               metadata: dict[str, str], advance=lambda n=1: None) -> list[str]:
    """Write the current rank's `rank{N}.safetensors`; returns the units in the order written."""
    specs = planned_specs(cfg, dtype, plan)
    model = build_model(cfg, dtype)
    units = plan_entries(model, files)
    packed = getattr(model, "packed_modules", {})
    missing = sorted({unit_of(model, n) for n, _ in model.named_parameters()} - set(units))
    if missing:
        raise UserError(f"checkpoint has no tensors for {missing[0]}: incomplete download?")
    with SafetensorsWriter(out_path, specs, metadata) as writer:
        for prefix, entries in units.items():
            unit = model.get_submodule(prefix)
            materialize(unit)
            load_unit(model, entries)
            check_unit_complete(unit, prefix, entries, packed)
            if plan.mode != "none":
                quantize_unit(unit, prefix, plan)
            for name, tensor in unit.state_dict(prefix=f"{prefix}.").items():
                writer.write(name, tensor)
            release(unit)
            advance(1)
    return list(units)
