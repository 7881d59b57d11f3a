"""Load a Hugging Face GLM-4.1V checkpoint directory (sharded or not) into our model.

Both key layouts are accepted: transformers 5 (`model.language_model.*`, `model.visual.*`, `lm_head.*`)
and the older one (`model.layers.*`, `visual.*`). Each parameter's own weight_loader does the sharding.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from autoglm_trt.config import ModelConfig
from autoglm_trt.errors import UserError
from autoglm_trt.layers.linear import default_weight_loader
from autoglm_trt.models.glm4v import Glm4vForConditionalGeneration

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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


def iter_checkpoint(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except Exception as exc:  # NOTE: safetensors raises its own (Rust) error types
            raise UserError(f"cannot read {path}: {exc} (the file is corrupt or truncated; download it again)") \
                from None


def resolve_param(model: nn.Module, name: str) -> tuple[str, str | None]:
    """-> (our parameter name, shard_id) for a checkpoint key already mapped to our module paths."""
    for src, (dst, shard) in getattr(model, "packed_modules", {}).items():
        if f".{src}." in name:
            return name.replace(f".{src}.", f".{dst}."), shard
    return name, None


def load_weights(model: nn.Module, files: list[Path], progress=None) -> None:
    params = dict(model.named_parameters())
    seen: set[str] = set()
    for key, tensor in iter_checkpoint(files):
        name = hf_to_ours(key)
        if name.startswith("visual.") and getattr(model, "visual", True) is None:
            continue
        target, shard = resolve_param(model, name)
        param = params.get(target)
        if param is None:
            if "rotary" in name or name.endswith("inv_freq"):
                continue
            raise UserError(f"checkpoint tensor {key!r} has no place in a GLM-4.1V model: wrong checkpoint?")
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            loader(param, tensor.to(param.dtype), shard) if shard else loader(param, tensor.to(param.dtype))
        except ValueError as exc:
            raise UserError(f"checkpoint tensor {key!r}: {exc}") from None
        seen.add(f"{target}:{shard}" if shard else target)
        if progress is not None:
            progress(tensor.numel() * tensor.element_size())
    _check_complete(model, params, seen)


def _check_complete(model: nn.Module, params: dict[str, nn.Parameter], seen: set[str]) -> None:
    packed = {dst: [s for _, (d, s) in getattr(model, "packed_modules", {}).items() if d == dst]
              for dst in {d for d, _ in getattr(model, "packed_modules", {}).values()}}
    missing = []
    for name in params:
        parts = [p for dst, shards in packed.items() if f".{dst}." in name
                 for p in (f"{name}:{s}" for s in shards)] or [name]
        missing += [p for p in parts if p not in seen]
    if missing:
        raise UserError(f"checkpoint is missing {len(missing)} tensors (first: {missing[0]}): incomplete download?")


def resolve_dtype(requested: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cpu":
        return torch.float32  # NOTE: bf16 matmuls on CPU are slow and not what the GPU computes anyway
    return DTYPES.get(cfg.torch_dtype, torch.bfloat16)


def load_model(model_dir: str | Path, dtype: str = "auto", device: str | torch.device = "cpu",
               with_vision: bool = True, show_progress: bool = True, rank: int | None = None,
               tp_size: int | None = None) -> Glm4vForConditionalGeneration:
    """Build the model from `model_dir/config.json` and load its safetensors weights.

    An engine directory (`autoglm-trt build`) is recognised by its manifest: its pre-sharded, pre-quantized
    `rank{rank}.safetensors` is loaded after the manifest checks (rank/tp_size default to the TP state).
    A checkpoint is sharded by the weight loaders for the current TP state (rank/tp_size are not used).
    """
    from autoglm_trt.builder.manifest import is_engine_dir  # NOTE: torch-free leaf module
    from autoglm_trt.utils.progress import byte_progress

    if is_engine_dir(model_dir):
        from autoglm_trt.builder.engine_dir import load_engine_model

        return load_engine_model(model_dir, dtype, device, with_vision, rank=rank, tp_size=tp_size,
                                 show_progress=show_progress)
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    files = checkpoint_files(model_dir)
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, cfg, device)
    with torch.device(device):
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch_dtype)
        try:
            model = Glm4vForConditionalGeneration(cfg, with_vision=with_vision)
        finally:
            torch.set_default_dtype(default)
    total = sum(f.stat().st_size for f in files)
    with byte_progress("Loading weights", total, enabled=show_progress) as advance:
        load_weights(model, files, advance)
    return model.eval()


def apply_quantization(model, quant: str, calib_dir: str | None, act_quant: str = "dynamic") -> None:
    """Quantize a freshly loaded (already sharded) model in place: "none", "int8-wo", "w8a8" or "fp8"."""
    if quant == "none":
        return
    from autoglm_trt.layers.quant import quantize_model, quantize_vision

    if not getattr(model, "quant_config", None):  # engine dirs come pre-quantized
        from autoglm_trt.calibration.cache import load_calibration

        calib = load_calibration(calib_dir) if calib_dir else None
        quantize_model(model, quant, calib, act_quant=act_quant)
    quantize_vision(model, quant)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
