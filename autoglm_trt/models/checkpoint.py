"""Reading a Hugging Face GLM-4.1V checkpoint directory (sharded or not) into our model (models/loader.py
has the one entry point, `load_model`, for checkpoints and engine directories alike).

A checkpoint is read unit by unit (a decoder layer, the embedding, a vision block, ...): the planner maps
every checkpoint tensor to its parameter from the safetensors headers alone, then each unit's tensors are
handed to their parameters' own weight_loaders, which shard them for the current tensor-parallel state.
The builder streams rank files with the same planner and unit loader (builder/shard.py). Both key layouts
are accepted: transformers 5 (`model.language_model.*`, `model.visual.*`, `lm_head.*`) and the older one
(`model.layers.*`, `visual.*`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from autoglm_trt.config import ModelConfig
from autoglm_trt.errors import UserError
from autoglm_trt.layers import parallel
from autoglm_trt.layers.linear import default_weight_loader
from autoglm_trt.models.glm4v import Glm4vForConditionalGeneration

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class LoadEntry:
    key: str  # checkpoint tensor name
    file: Path  # the safetensors file holding it
    target: str  # our parameter name
    shard: str | None  # packed-module shard id ("q", "k", "v") or None


# ---- the checkpoint's files and names ------------------------------------------------------------
def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{index} is not a valid safetensors index ({exc})") from None
        files = [model_dir / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{model_dir} is incomplete: the index lists {', '.join(missing[:3])} which is missing")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir} has no *.safetensors weights (only safetensors checkpoints are supported)")
    return files


def hf_to_ours(name: str) -> str:
    """Map a checkpoint key to our module path."""
    for prefix, ours in (("model.language_model.", "language_model."), ("model.visual.", "visual."),
                         ("visual.", "visual."), ("model.", "language_model.")):
        if name.startswith(prefix):
            return ours + name[len(prefix):]
    return name


def resolve_param(model: nn.Module, name: str) -> tuple[str, str | None]:
    """-> (our parameter name, shard_id) for a checkpoint key already mapped to our module paths."""
    for src, (dst, shard) in getattr(model, "packed_modules", {}).items():
        if f".{src}." in name:
            return name.replace(f".{src}.", f".{dst}."), shard
    return name, None


def resolve_dtype(requested: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cpu":
        return torch.float32  # NOTE: bf16 matmuls on CPU are slow and not what the GPU computes anyway
    return DTYPES.get(cfg.torch_dtype, torch.bfloat16)


# ---- building the model --------------------------------------------------------------------------
def build_model(cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device = "meta",
                with_vision: bool = True) -> Glm4vForConditionalGeneration:
    """The model for the current tensor-parallel state, its parameters on `device` (meta: shapes only)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return Glm4vForConditionalGeneration(cfg, with_vision=with_vision)
    except ValueError as exc:  # a size that does not divide by the tensor-parallel size
        raise UserError(f"this model cannot be split {parallel.get_tp_size()} ways: {exc}") from None
    finally:
        torch.set_default_dtype(default)


def materialize(module: nn.Module, device: str | torch.device = "cpu") -> None:
    """Give a meta module real (uninitialised) storage, keeping each parameter's attributes (weight_loader);
    computed buffers (rotary frequencies) are computed again."""
    for sub in module.modules():
        for pname, p in list(sub._parameters.items()):
            if p is not None and p.is_meta:
                new = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=False)
                new.__dict__.update(p.__dict__)
                sub._parameters[pname] = new
        for bname, b in list(sub._buffers.items()):
            if b is not None and b.is_meta:
                sub._buffers[bname] = torch.empty(b.shape, dtype=b.dtype, device=device)
        if hasattr(sub, "init_buffers"):
            sub.init_buffers()


# ---- planning and loading units ------------------------------------------------------------------
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
        with _open(path) as f:
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
    missing = sorted({unit_of(model, n) for n, _ in model.named_parameters()} - set(units))
    if missing:
        raise UserError(f"checkpoint has no tensors for {missing[0]}: incomplete download?")
    return dict(units)


def load_unit(model: nn.Module, prefix: str, entries: list[LoadEntry], progress=None) -> None:
    """Read one unit's checkpoint tensors and hand each to its parameter's weight_loader; refuse a unit
    that the checkpoint does not fully cover."""
    params = dict(model.named_parameters())
    by_file: dict[Path, list[LoadEntry]] = defaultdict(list)
    for e in entries:
        by_file[e.file].append(e)
    for path, group in by_file.items():
        with _open(path) as f:
            for e in group:
                _load_one(params[e.target], _read(f, path, e.key), e, progress)
    _check_unit_complete(model.get_submodule(prefix), prefix, entries, getattr(model, "packed_modules", {}))


def _corrupt(path: Path, exc: Exception) -> UserError:
    return UserError(f"cannot read {path}: {exc} (the file is corrupt or truncated; download it again)")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # NOTE: safetensors raises its own (Rust) error types
        raise _corrupt(path, exc) from None


def _read(f, path: Path, key: str) -> torch.Tensor:
    try:
        return f.get_tensor(key)
    except Exception as exc:  # NOTE: safetensors raises its own (Rust) error types
        raise _corrupt(path, exc) from None


def _load_one(param: nn.Parameter, tensor: torch.Tensor, e: LoadEntry, progress) -> None:
    loader = getattr(param, "weight_loader", default_weight_loader)
    try:
        loader(param, tensor.to(param.dtype), e.shard) if e.shard else loader(param, tensor.to(param.dtype))
    except ValueError as exc:
        raise UserError(f"checkpoint tensor {e.key!r}: {exc}") from None
    if progress is not None:
        progress(tensor.numel() * tensor.element_size())


def _check_unit_complete(unit: nn.Module, prefix: str, entries: list[LoadEntry], packed: dict) -> None:
    seen = {(e.target, e.shard) for e in entries}
    for name, _ in unit.named_parameters(prefix=prefix):
        shards = [s for d, s in packed.values() if f".{d}." in name] or [None]
        missing = [s for s in shards if (name, s) not in seen]
        if missing:
            label = f"{name} ({missing[0]})" if missing[0] else name
            raise UserError(f"checkpoint is missing {label}: incomplete download?")
