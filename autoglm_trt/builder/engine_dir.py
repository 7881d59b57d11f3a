"""Load an engine directory (from `autoglm-trt build`) into our model: manifest first, then one rank file.

`models.loader.load_model` hands engine directories here. Nothing is re-sharded or re-quantized: the
rank's tensors are copied into a model built with the same parallel state (and, for INT8 builds,
prepared by `layers.quant.prepare_quantized_model`), one tensor at a time.
"""

from __future__ import annotations

import hashlib
import struct
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch

from autoglm_trt.builder.manifest import (EngineManifest, check_tp, checksums_enabled, read_manifest, rebuild_hint,
                                          verify_files)
from autoglm_trt.builder.safetensors_io import iter_tensors
from autoglm_trt.builder.shard import build_model, parallel_state
from autoglm_trt.config import ModelConfig
from autoglm_trt.errors import UserError
from autoglm_trt.layers import parallel
from autoglm_trt.models.glm4v import Glm4vForConditionalGeneration
from autoglm_trt.models.loader import resolve_dtype


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


def files_to_verify(manifest: EngineManifest) -> list[str]:
    """The small files the runtime reads (not the weights: those are hashed while they load)."""
    skip_suffixes = (".onnx", ".data", ".engine", ".safetensors")
    return [n for n in manifest.files if not n.endswith(skip_suffixes) and not n.startswith("calibration/")]


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


def load_engine_model(engine_dir: str | Path, dtype: str = "auto", device: str | torch.device = "cpu",
                      with_vision: bool = True, rank: int | None = None, tp_size: int | None = None,
                      show_progress: bool = True, verify: bool = True) -> Glm4vForConditionalGeneration:
    """Build the model of an engine directory and load rank `rank` (default: this process's TP rank)."""
    from autoglm_trt.utils.progress import byte_progress

    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    tp = parallel.get_tp_size() if tp_size is None else tp_size
    rank = parallel.get_tp_rank() if rank is None else rank
    check_tp(engine_dir, manifest, tp)
    if not 0 <= rank < tp:
        raise UserError(f"rank {rank} is out of range for tensor parallelism {tp}")
    name = rank_file(rank)
    checksums = verify and checksums_enabled()
    if verify:  # small files fully; the rank file's size now, its sha256 while it loads
        verify_files(engine_dir, manifest, files_to_verify(manifest), checksums)
        verify_files(engine_dir, manifest, [name], checksums=False)
    cfg = ModelConfig.from_dir(engine_dir)
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, cfg, device)
    quant = manifest.quantization.get("mode", "none")
    act_quant = manifest.quantization.get("act_quant") or "dynamic"
    same = (rank, tp) == (parallel.get_tp_rank(), parallel.get_tp_size())
    with nullcontext() if same else parallel_state(rank, tp):
        model = build_model(cfg, torch_dtype, device, with_vision)
        if quant != "none":
            from autoglm_trt.layers.quant import prepare_quantized_model

            prepare_quantized_model(model, quant, act_quant=act_quant,
                                    lm_head=manifest.quantization.get("lm_head") == "int8")
    path = engine_dir / name
    rebuild = rebuild_hint(engine_dir, asdict(manifest))
    sha = manifest.files[name].sha256 if checksums and name in manifest.files else None
    with byte_progress("Loading engine weights", path.stat().st_size, enabled=show_progress) as advance:
        copy_state(model, path, with_vision, rebuild, sha, advance)
    return model.eval()


# Options whose value is baked into the rank files (pre-sharded, pre-quantized): another value needs a rebuild.
FIXED_BY_BUILD = {"tensor_parallel_size": "--tp", "quant": "--quant", "act_quant": "--act-quant"}


def engine_defaults(engine_dir: str | Path) -> dict:
    """Engine options the build fixed (LLM/serve keyword names): limits, page size, CUDA-graph sizes, TP, quant."""
    m = read_manifest(engine_dir)
    lim = m.build["limits"]
    return {"max_model_len": lim["max_seq_len"], "max_num_seqs": lim["max_batch_size"],
            "max_num_batched_tokens": lim["max_num_tokens"], "block_size": m.build["page_size"],
            "cuda_graph_batch_sizes": tuple(m.build["cuda_graph_batch_sizes"]),
            "tensor_parallel_size": m.tp_size, "quant": m.quantization.get("mode", "none"),
            "act_quant": m.quantization.get("act_quant") or "dynamic"}


def check_fixed_options(engine_dir: str | Path, defaults: dict, given: dict) -> None:
    """Refuse an explicit option that contradicts what the build baked into the rank files."""
    for key, flag in FIXED_BY_BUILD.items():
        if key == "act_quant" and defaults["quant"] != "w8a8":
            continue  # NOTE: only w8a8 engines carry an activation-scale mode
        if key in given and given[key] != defaults[key]:
            raise UserError(f"{engine_dir} was built with {flag} {defaults[key]}, but {key}={given[key]!r} was "
                            f"asked for: leave {key} out (the engine's value is the default), or rebuild with "
                            f"{flag} {given[key]}")
