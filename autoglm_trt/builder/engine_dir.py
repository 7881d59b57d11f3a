"""Load an engine directory (from `autoglm-trt build`) into our model: manifest first, then one rank file.

`models.loader.load_model` hands engine directories here. Nothing is re-sharded or re-quantized: the
rank's tensors are copied into a model built with the same parallel state (and, for INT8 builds,
prepared by `layers.quant.prepare_quantized_model`), one tensor at a time.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import safe_open

from autoglm_trt.builder.manifest import EngineManifest, check_tp, read_manifest, verify_files
from autoglm_trt.builder.shard import build_model, parallel_state
from autoglm_trt.config import ModelConfig
from autoglm_trt.errors import UserError
from autoglm_trt.layers import parallel
from autoglm_trt.models.glm4v import Glm4vForConditionalGeneration
from autoglm_trt.models.loader import resolve_dtype


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


def files_to_verify(manifest: EngineManifest, rank: int) -> list[str]:
    """This rank's weights and the small files the runtime reads (not other ranks', ONNX or engines)."""
    skip_suffixes = (".onnx", ".data", ".engine", ".safetensors")
    small = [n for n in manifest.files if not n.endswith(skip_suffixes) and not n.startswith("calibration/")]
    return [rank_file(rank), *small]


def copy_state(model: torch.nn.Module, path: Path, with_vision: bool, rebuild: str, progress=None) -> None:
    """Copy every tensor of `path` into the model's state; both sides must name exactly the same tensors."""
    state = model.state_dict(keep_vars=True)
    with safe_open(str(path), framework="pt") as f:
        keys = [k for k in f.keys() if with_vision or not k.startswith("visual.")]
        extra, missing = sorted(set(keys) - set(state)), sorted(set(state) - set(keys))
        if extra or missing:
            what = f"{len(missing)} missing (first: {missing[0]})" if missing else f"{len(extra)} unknown " \
                   f"(first: {extra[0]})"
            raise UserError(f"{path} does not fit this model: {what} tensors; {rebuild}")
        with torch.no_grad():
            for key in keys:
                t = f.get_tensor(key)
                dst = state[key]
                if tuple(dst.shape) != tuple(t.shape):
                    raise UserError(f"{path}: {key} has shape {tuple(t.shape)}, the model wants "
                                    f"{tuple(dst.shape)}; {rebuild}")
                dst.copy_(t)
                if progress is not None:
                    progress(t.numel() * t.element_size())


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
    if verify:
        verify_files(engine_dir, manifest, files_to_verify(manifest, rank))
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

            prepare_quantized_model(model, quant, act_quant=act_quant)
    path = engine_dir / rank_file(rank)
    rebuild = f"rebuild it: `{manifest.command or 'autoglm-trt build MODEL_DIR -o ' + str(engine_dir)}`"
    with byte_progress("Loading engine weights", path.stat().st_size, enabled=show_progress) as advance:
        copy_state(model, path, with_vision, rebuild, advance)
    return model.eval()


def engine_defaults(engine_dir: str | Path) -> dict:
    """Engine options the build fixed (LLM/serve keyword names): limits, page size, CUDA-graph sizes."""
    m = read_manifest(engine_dir)
    lim = m.build["limits"]
    return {"max_model_len": lim["max_seq_len"], "max_num_seqs": lim["max_batch_size"],
            "max_num_batched_tokens": lim["max_num_tokens"], "block_size": m.build["page_size"],
            "cuda_graph_batch_sizes": tuple(m.build["cuda_graph_batch_sizes"]),
            "tensor_parallel_size": m.tp_size}
