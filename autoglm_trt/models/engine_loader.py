"""Load an engine directory (from `autoglm-trt build`) into our model: manifest first, then one rank file.

`models.loader.load_model` hands engine directories here. Nothing is re-sharded or re-quantized: the model is
built on the meta device with the rank's parallel state, the build's quantization transform lays out its
quantized parameters there (layers.quantize.quantize_model, the same transform the build ran), and the rank's
tensors are copied into fresh storage one at a time, so the float weights never exist in memory.
"""

from __future__ import annotations

import hashlib
import struct
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch

from autoglm_trt.config import ModelConfig
from autoglm_trt.errors import UserError
from autoglm_trt.formats.manifest import (EngineManifest, check_gpu, check_tp, checksums_enabled, files_to_verify,
                                          rank_file, read_manifest, rebuild_hint, verify_files)
from autoglm_trt.formats.safetensors_io import iter_tensors
from autoglm_trt.layers import parallel
from autoglm_trt.models.glm4v import Glm4vForConditionalGeneration
from autoglm_trt.models.checkpoint import build_model, materialize, resolve_dtype


def copy_state(model: torch.nn.Module, path: Path, with_vision: bool, rebuild: str, sha256: str | None = None,
               progress=None) -> None:
    """Copy every tensor of `path` into the model's state, in one read that also checks the file's sha256.

    Both sides must name exactly the same tensors (visual.* skipped without the vision tower).
    """
    state = model.state_dict(keep_vars=True)
    want = {k for k in state if with_vision or not k.startswith("visual.")}
    hasher, seen = hashlib.sha256(), set()
    try:
        _copy_tensors(iter_tensors(path, hasher), state, with_vision, seen, f"{path}", rebuild, progress)
    except (ValueError, KeyError, EOFError, OverflowError, struct.error) as exc:  # a damaged header or body
        raise UserError(f"{path} is damaged ({type(exc).__name__}: {exc}); {rebuild}") from None
    if want - seen:
        raise UserError(f"{path} lacks {len(want - seen)} tensors of this model (first: {min(want - seen)}); "
                        f"{rebuild}")
    if sha256 is not None and hasher.hexdigest() != sha256:
        raise UserError(f"{path} does not match its sha256 in the manifest (modified or truncated): {rebuild}")


@torch.no_grad()
def _copy_tensors(tensors, state: dict, with_vision: bool, seen: set, path: str, rebuild: str, progress) -> None:
    for key, t in tensors:
        if progress is not None:
            progress(t.numel() * t.element_size())
        if not with_vision and key.startswith("visual."):
            continue
        dst = state.get(key)
        if dst is None or tuple(dst.shape) != tuple(t.shape):
            what = "is not a tensor of this model" if dst is None else \
                f"has shape {tuple(t.shape)}, the model wants {tuple(dst.shape)}"
            raise UserError(f"{path}: {key} {what}; {rebuild}")
        dst.copy_(t)
        seen.add(key)


def check_built_gpu(engine_dir: Path, manifest: EngineManifest, device: torch.device) -> None:
    """An engine built for one GPU architecture (it holds TensorRT engines) is refused on a GPU of another,
    naming the rebuild; the CPU runs the portable rank files."""
    if manifest.gpu and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        check_gpu(engine_dir, manifest, torch.cuda.get_device_name(device), f"{major}.{minor}")


def load_engine_model(engine_dir: str | Path, dtype: str = "auto", device: str | torch.device = "cpu",
                      with_vision: bool = True, rank: int | None = None, tp_size: int | None = None,
                      show_progress: bool = True, verify: bool = True) -> Glm4vForConditionalGeneration:
    """Build the model of an engine directory and load rank `rank` (default: this process's TP rank)."""
    from autoglm_trt.utils.progress import byte_progress

    engine_dir, device = Path(engine_dir), torch.device(device)
    manifest = read_manifest(engine_dir)
    tp = parallel.get_tp_size() if tp_size is None else tp_size
    rank = parallel.get_tp_rank() if rank is None else rank
    check_tp(engine_dir, manifest, tp)
    check_built_gpu(engine_dir, manifest, device)
    if not 0 <= rank < tp:
        raise UserError(f"rank {rank} is out of range for tensor parallelism {tp}")
    name = rank_file(rank)
    checksums = verify and checksums_enabled()
    if verify:  # small files fully; the rank file's size now, its sha256 while it loads
        verify_files(engine_dir, manifest, files_to_verify(manifest), checksums)
        verify_files(engine_dir, manifest, [name], checksums=False)
    cfg = ModelConfig.from_dir(engine_dir)
    torch_dtype = resolve_dtype(dtype, cfg, device)
    quant = manifest.quantization.get("mode", "none")
    act_quant = manifest.quantization.get("act_quant") or "dynamic"
    same = (rank, tp) == (parallel.get_tp_rank(), parallel.get_tp_size())
    with nullcontext() if same else parallel.parallel_state(rank, tp):
        model = build_model(cfg, torch_dtype, "meta", with_vision)
        if quant != "none":
            from autoglm_trt.layers.quantize import quantize_model

            quantize_model(model, quant, act_quant=act_quant, lm_head=manifest.quantization.get("lm_head") == "int8")
    materialize(model, device)
    path = engine_dir / name
    rebuild = rebuild_hint(engine_dir, asdict(manifest))
    sha = manifest.files[name].sha256 if checksums and name in manifest.files else None
    with byte_progress("Loading engine weights", path.stat().st_size, enabled=show_progress) as advance:
        copy_state(model, path, with_vision, rebuild, sha, advance)
    return model.eval()
