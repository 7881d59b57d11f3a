"""`autoglm-trt export`: ONNX graphs of the text decoder and the vision encoder, checked with onnxruntime.

Layout of OUT (TensorRT Edge-LLM's, plus a manifest):

    export.json                 format version, source checkpoint hash, options, I/O names, parity, sha256s
    profiles.json               TensorRT optimization profiles: llm context/generation, visual
    llm/model.onnx[.data]       decoder: inputs_embeds, position_ids [3,B,S], attention_mask, past KV
    llm/embedding.safetensors   the token embedding table ("embedding" [V, H]): lookup outside the graph
    llm/config.json             the checkpoint's Hugging Face config
    visual/model.onnx[.data]    vision encoder: pixel_values, patch_pos, patch_grid, segment_ids
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from autoglm_trt.builder import onnx_text, onnx_vision
from autoglm_trt.builder.onnx_io import export_graph, graph_files
from autoglm_trt.builder.options import ExportConfig
from autoglm_trt.builder.profiles import all_profiles
from autoglm_trt.builder.progress import Steps
from autoglm_trt.builder.verify import ParityResult, verify_decoder, verify_vision
from autoglm_trt.config import ModelConfig
from autoglm_trt.errors import UserError
from autoglm_trt.formats.manifest import file_entry, require_checkpoint_dir, source_checkpoint_hash
from autoglm_trt.models.checkpoint import DTYPES, build_model, checkpoint_files, load_unit, materialize, plan_entries
from autoglm_trt.models.loader import load_model

EXPORT_FORMAT, EXPORT_FORMAT_VERSION = "autoglm-trt-onnx", 1


@dataclass
class ExportResult:
    out_dir: Path
    graphs: dict[str, str] = field(default_factory=dict)  # "llm" / "visual" -> relative path of model.onnx
    parity: list[ParityResult] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # step label -> seconds


def export_dtype(requested: str, cfg: ModelConfig) -> str:
    """auto: float32 for float32 checkpoints, else float16 (what TensorRT and onnxruntime run best)."""
    if requested != "auto":
        return requested
    return "float32" if cfg.torch_dtype == "float32" else "float16"


def load_vision_tower(model_dir: Path, dtype: str):
    """Only the vision tower's weights (0.6 B parameters for the 9B), the text decoder stays on meta."""
    cfg = ModelConfig.from_dir(model_dir)
    model = build_model(cfg, DTYPES[dtype])
    materialize(model.visual)
    for unit, entries in plan_entries(model, checkpoint_files(model_dir)).items():
        if unit.startswith("visual."):
            load_unit(model, unit, entries)
    return model.visual.eval()


def export_llm(model, out_dir: Path, opset: int) -> Path:
    t = model.cfg.text
    graph = onnx_text.DecoderGraph(model).eval()
    names_in, names_out = onnx_text.decoder_io_names(t.num_hidden_layers)
    args = onnx_text.decoder_example_inputs(t, graph.lm_head.weight.dtype)
    path = out_dir / "llm" / "model.onnx"
    export_graph(graph, args, path, names_in, names_out, onnx_text.decoder_dynamic_axes(t.num_hidden_layers), opset)
    emb = model.language_model.embed_tokens.weight[: t.vocab_size].detach().contiguous()
    save_file({"embedding": emb}, str(out_dir / "llm" / "embedding.safetensors"), metadata={"format": "pt"})
    return path


def export_visual(visual, out_dir: Path, opset: int) -> Path:
    path = out_dir / "visual" / "model.onnx"
    export_graph(onnx_vision.VisionGraph(visual).eval(), onnx_vision.vision_example_inputs(visual), path,
                 onnx_vision.INPUT_NAMES, onnx_vision.OUTPUT_NAMES, onnx_vision.DYNAMIC_AXES, opset)
    return path


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} exists and is not empty; choose a new directory")
    out_dir.mkdir(parents=True, exist_ok=True)


def _raise_on_failures(parity: list[ParityResult]) -> None:
    bad = [r for r in parity if not r.ok]
    if bad:
        r = max(bad, key=lambda x: x.max_abs_diff)
        raise UserError(f"onnxruntime disagrees with PyTorch: {r.graph}/{r.case}/{r.output} max abs diff "
                        f"{r.max_abs_diff:.3g} > {r.atol:g} ({len(bad)} checks failed; the graphs are in place, "
                        "see export.json)")


def export_onnx(model_dir: str | Path, out_dir: str | Path, cfg: ExportConfig = ExportConfig(),
                show_progress: bool = True, check_empty: bool = True) -> ExportResult:
    """Export (and by default verify) the ONNX graphs of a checkpoint into `out_dir`."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    require_checkpoint_dir(model_dir)
    mcfg = ModelConfig.from_dir(model_dir)
    cfg = replace(cfg, limits=cfg.limits.for_model(mcfg))
    if check_empty:
        _check_out_dir(out_dir)
    dtype = export_dtype(cfg.dtype, mcfg)
    atol = cfg.atol if dtype == "float32" else max(cfg.atol, 5e-2)
    result = ExportResult(out_dir)
    steps = (2 + cfg.verify) * cfg.with_llm + (2 + cfg.verify) * cfg.with_vision + 1
    with Steps(steps, enabled=show_progress) as bar:
        if cfg.with_llm:
            _llm_steps(model_dir, out_dir, dtype, cfg, atol, bar, result)
        if cfg.with_vision:
            _visual_steps(model_dir, out_dir, dtype, cfg, atol, bar, result)
        with bar.step("Writing profiles.json and export.json"):
            _write_metadata(model_dir, out_dir, mcfg, cfg, dtype, result)
    result.timings = bar.timings
    _raise_on_failures(result.parity)
    return result


def _llm_steps(model_dir, out_dir, dtype, cfg, atol, bar: Steps, result: ExportResult) -> None:
    with bar.step("Loading text decoder"):
        model = load_model(model_dir, dtype=dtype, device="cpu", with_vision=False, show_progress=False)
    with bar.step("Exporting llm/model.onnx"):
        result.graphs["llm"] = str(export_llm(model, out_dir, cfg.opset).relative_to(out_dir))
        (out_dir / "llm" / "config.json").write_text((model_dir / "config.json").read_text())
    if cfg.verify:
        with bar.step("Verifying llm with onnxruntime"):
            result.parity += verify_decoder(model, out_dir / result.graphs["llm"], atol)
    del model


def _visual_steps(model_dir, out_dir, dtype, cfg, atol, bar: Steps, result: ExportResult) -> None:
    with bar.step("Loading vision tower"):
        visual = load_vision_tower(model_dir, dtype)
    with bar.step("Exporting visual/model.onnx"):
        result.graphs["visual"] = str(export_visual(visual, out_dir, cfg.opset).relative_to(out_dir))
    if cfg.verify:
        with bar.step("Verifying visual with onnxruntime"):
            result.parity += verify_vision(visual, out_dir / result.graphs["visual"], atol)


def _write_metadata(model_dir: Path, out_dir: Path, mcfg: ModelConfig, cfg: ExportConfig, dtype: str,
                    result: ExportResult) -> None:
    from autoglm_trt import __version__

    profiles = all_profiles(mcfg, cfg.limits)
    profiles = {k: profiles[k] for k in ("llm", "visual") if k in result.graphs}
    (out_dir / "profiles.json").write_text(json.dumps(profiles, indent=1))
    files = [p for g in result.graphs.values() for p in graph_files(out_dir / g)]
    files += [out_dir / "profiles.json"] + [p for p in (out_dir / "llm").glob("*") if p.suffix in (".json",
                                                                                                 ".safetensors")]
    llm_io = onnx_text.decoder_io_names(mcfg.text.num_hidden_layers)
    io = {"llm": {"inputs": llm_io[0], "outputs": llm_io[1]},
          "visual": {"inputs": onnx_vision.INPUT_NAMES, "outputs": onnx_vision.OUTPUT_NAMES}}
    meta = {"format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION, "toolkit_version": __version__,
            "source": {"path": str(model_dir), "hash_method": "fast",
                       "sha256": source_checkpoint_hash(model_dir, checkpoint_files(model_dir))},
            "opset": cfg.opset, "dtype": dtype, "exporter": f"torch {torch.__version__} (TorchScript)",
            "graphs": {k: {"path": v, **io[k]} for k, v in result.graphs.items()},
            "profiles": "profiles.json", "parity": [r.to_dict() for r in result.parity],
            "files": {str(p.relative_to(out_dir)): vars(file_entry(p)) for p in sorted(set(files))}}
    (out_dir / "export.json").write_text(json.dumps(meta, indent=1))
