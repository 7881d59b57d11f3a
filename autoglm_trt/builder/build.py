"""`autoglm-trt build`: a checkpoint -> a self-describing engine directory.

    config.json               Hugging Face config (dtype = the built one) + the manifest (manifest.py)
    rank{N}.safetensors       rank N's tensors: pre-sharded (tensor parallelism) and, for INT8, pre-quantized
    tokenizer.json, chat_template.jinja, preprocessor_config.json, generation_config.json, ...  (copied)
    calibration/              the calibration cache, when --calib was given
    visual/model.onnx         with --vision-onnx (and profiles.json, export.json)
    llm/, llm.engine, visual.engine    with --backend tensorrt

Ranks are written one after another, each streamed unit by unit (shard.py), so building the 9B fits
in a few GB of host memory whatever the tensor-parallel size. config.json is written last: a directory
without it is an interrupted build, never mistaken for an engine.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from autoglm_trt.builder.options import BuildConfig, ExportConfig
from autoglm_trt.builder.profiles import all_profiles
from autoglm_trt.builder.progress import Steps
from autoglm_trt.builder.shard import QuantPlan, write_rank
from autoglm_trt.config import ModelConfig
from autoglm_trt.errors import UserError
from autoglm_trt.formats.manifest import (EngineManifest, SourceInfo, file_entry, require_checkpoint_dir,
                                          source_checkpoint_hash, write_config)
from autoglm_trt.layers.parallel import parallel_state
from autoglm_trt.models.checkpoint import DTYPES, build_model, checkpoint_files, plan_entries

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".engine", ".data")
_COPY_MAX_BYTES = 64 << 20


@dataclass
class BuildResult:
    engine_dir: Path
    manifest: EngineManifest
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)  # step label -> seconds


def processing_files(model_dir: Path) -> list[Path]:
    """Everything at the top of the checkpoint except weights and config.json: tokenizer, template, ..."""
    out = []
    for p in sorted(model_dir.iterdir()):
        if p.is_file() and p.name not in ("config.json", "model.safetensors.index.json") \
                and not p.name.endswith(WEIGHT_SUFFIXES) and p.stat().st_size <= _COPY_MAX_BYTES:
            out.append(p)
    return out


def quant_plan(cfg: BuildConfig) -> tuple[QuantPlan, dict]:
    """The quantization of every rank, and its manifest record."""
    if cfg.quant == "none":
        return QuantPlan(), {"mode": "none", "act_quant": None, "calibration": None}
    try:
        import autoglm_trt.layers.quant  # noqa: F401
    except ImportError as exc:
        raise UserError(f"--quant {cfg.quant} needs autoglm_trt.layers.quant, which is missing ({exc})") from None
    act_quant = cfg.act_quant if cfg.quant == "w8a8" else None
    record = {"mode": cfg.quant, "act_quant": act_quant, "calibration": None, "lm_head": "int8"}
    if not cfg.calib_dir:
        return QuantPlan(cfg.quant), record
    from autoglm_trt.calibration.cache import load_calibration

    calib = load_calibration(cfg.calib_dir)
    record["calibration"] = {"dir": "calibration", "smooth_alpha": getattr(calib, "smooth_alpha", None),
                             "awq": bool(getattr(calib, "awq_scales", None))}
    return QuantPlan(cfg.quant, cfg.act_quant, calib if cfg.quant in ("w8a8", "int4-awq") else None), record


def _prepare_out(out_dir: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} exists and is not empty; choose a new directory (or remove it)")
    out_dir.mkdir(parents=True, exist_ok=True)


def _check_limits(cfg: BuildConfig, mcfg: ModelConfig) -> None:
    lim = cfg.limits
    if lim.max_seq_len > mcfg.text.max_position_embeddings:
        raise UserError(f"--max-seq-len {lim.max_seq_len} exceeds the model's max_position_embeddings "
                        f"{mcfg.text.max_position_embeddings}")
    for rank in range(cfg.tp):  # fail before writing anything if the model does not split tp ways
        with parallel_state(rank, cfg.tp):
            build_model(mcfg, DTYPES[cfg.dtype])


def _hf_config(model_dir: Path, dtype: str) -> dict:
    raw = json.loads((model_dir / "config.json").read_text())
    raw["dtype"] = dtype  # NOTE: the weights are now stored in this dtype; the loader's "auto" follows it
    if isinstance(raw.get("text_config"), dict):
        raw["text_config"]["dtype"] = dtype
    raw.pop("torch_dtype", None)
    return raw


def build_engine(model_dir: str | Path, out_dir: str | Path, cfg: BuildConfig = BuildConfig(),
                 command: str = "", show_progress: bool = True) -> BuildResult:
    """Build an engine directory from a Hugging Face checkpoint (see the module docstring)."""
    t0 = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if cfg.backend == "tensorrt":
        from autoglm_trt.builder.tensorrt import gpu_info, require_tensorrt

        require_tensorrt()
        gpu = gpu_info()
    else:
        gpu = None
    require_checkpoint_dir(model_dir)
    mcfg = ModelConfig.from_dir(model_dir)
    cfg = replace(cfg, limits=cfg.limits.for_model(mcfg))
    files = checkpoint_files(model_dir)
    _check_limits(cfg, mcfg)
    plan, quant_record = quant_plan(cfg)
    _prepare_out(out_dir)
    num_units = len(plan_entries(build_model(mcfg, DTYPES[cfg.dtype]), files))
    with Steps(cfg.tp * num_units + 4, enabled=show_progress) as bar:
        with bar.step("Hashing the source checkpoint"):
            source = SourceInfo(str(model_dir), source_checkpoint_hash(model_dir, files, cfg.source_hash),
                                cfg.source_hash)
        _write_ranks(mcfg, files, out_dir, cfg, plan, bar)
        with bar.step("Copying tokenizer, template, preprocessor files"):
            _copy_files(model_dir, out_dir, cfg)
        with bar.step("Exporting ONNX / compiling TensorRT engines"):
            _onnx_and_engines(model_dir, out_dir, cfg, show_progress=False)
        with bar.step("Checksumming and writing config.json"):
            manifest = _write_manifest(model_dir, out_dir, mcfg, cfg, source, quant_record, gpu, command)
    return BuildResult(out_dir, manifest, time.perf_counter() - t0, bar.timings)


def _write_ranks(mcfg: ModelConfig, files: list[Path], out_dir: Path, cfg: BuildConfig, plan: QuantPlan,
                 bar: Steps) -> None:
    for rank in range(cfg.tp):
        meta = {"format": "pt", "rank": str(rank), "tp_size": str(cfg.tp), "dtype": cfg.dtype, "quant": cfg.quant}
        t0 = time.perf_counter()
        with parallel_state(rank, cfg.tp):
            write_rank(mcfg, files, out_dir / f"rank{rank}.safetensors", DTYPES[cfg.dtype], plan, meta,
                       advance=lambda n=1, r=rank: bar.sub(f"Writing rank{r}.safetensors", n))
        bar.timings[f"rank{rank}.safetensors"] = time.perf_counter() - t0


def _copy_files(model_dir: Path, out_dir: Path, cfg: BuildConfig) -> None:
    for p in processing_files(model_dir):
        shutil.copy2(p, out_dir / p.name)
    if cfg.calib_dir:
        shutil.copytree(cfg.calib_dir, out_dir / "calibration")


def _onnx_and_engines(model_dir: Path, out_dir: Path, cfg: BuildConfig, show_progress: bool) -> None:
    if not (cfg.vision_onnx or cfg.backend == "tensorrt"):
        return
    from autoglm_trt.builder.export import export_onnx

    trt = cfg.backend == "tensorrt"
    verify = cfg.dtype != "bfloat16"  # NOTE: onnxruntime's CPU provider has no bfloat16 kernels
    export_onnx(model_dir, out_dir, ExportConfig(opset=cfg.opset, dtype=cfg.dtype, verify=verify, with_llm=trt,
                                                 limits=cfg.limits), show_progress=show_progress, check_empty=False)
    if trt:  # pragma: no cover - needs TensorRT (untested)
        from autoglm_trt.builder.tensorrt import compile_all

        compile_all(out_dir, cfg.dtype)


def _write_manifest(model_dir: Path, out_dir: Path, mcfg: ModelConfig, cfg: BuildConfig, source: SourceInfo,
                    quant_record: dict, gpu: dict | None, command: str) -> EngineManifest:
    from autoglm_trt import __version__

    files = {p.relative_to(out_dir).as_posix(): file_entry(p) for p in sorted(out_dir.rglob("*"))
             if p.is_file() and p.relative_to(out_dir).as_posix() != "config.json"}
    profiles = all_profiles(mcfg, cfg.limits, cfg.page_size, cfg.cuda_graph_batch_sizes)
    manifest = EngineManifest(toolkit_version=__version__, source=source, build=cfg.to_dict(),
                              quantization=quant_record, profiles=profiles, files=files, gpu=gpu,
                              command=command or build_command(model_dir, out_dir, cfg))
    write_config(out_dir, _hf_config(model_dir, cfg.dtype), manifest)
    return manifest


def build_command(model_dir: Path, out_dir: Path, cfg: BuildConfig) -> str:
    """The CLI line that rebuilds this engine (quoted in every "rebuild it" message)."""
    lim = cfg.limits
    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[cfg.dtype]
    parts = ["autoglm-trt build", str(model_dir), f"--dtype {short}", f"--quant {cfg.quant}", f"--tp {cfg.tp}",
             f"--max-batch-size {lim.max_batch_size}", f"--max-seq-len {lim.max_seq_len}",
             f"--max-num-tokens {lim.max_num_tokens}", f"--page-size {cfg.page_size}",
             f"--cuda-graph-batch-sizes {','.join(map(str, cfg.cuda_graph_batch_sizes))}",
             f"--backend {cfg.backend}"]
    parts += [f"--act-quant {cfg.act_quant}"] if cfg.quant == "w8a8" else []
    parts += [f"--calib {cfg.calib_dir}"] if cfg.calib_dir else []
    parts += ["--vision-onnx"] if cfg.vision_onnx else []
    return " ".join(parts + [f"-o {out_dir}"])
