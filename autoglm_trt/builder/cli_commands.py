"""The `export` and `build` commands (registered on the typer app in autoglm_trt/cli.py).

Only typer is imported at module level: the CLI must start fast; each command imports what it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from autoglm_trt.config import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS
from autoglm_trt.errors import UserError


def _limits(max_batch_size: int, max_seq_len: int | None, max_num_tokens: int, max_image_patches: int):
    from autoglm_trt.builder.options import ShapeLimits

    try:
        return ShapeLimits(max_batch_size, max_seq_len, max_num_tokens, max_image_patches)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out} is a file: name a new directory")


def _print_parity(parity) -> None:
    from rich.table import Table

    from autoglm_trt.utils.progress import console

    table = Table(title="onnxruntime vs PyTorch")
    for col in ("graph", "case", "output", "max abs diff", "ok"):
        table.add_column(col)
    for r in parity:
        table.add_row(r.graph, r.case, r.output, f"{r.max_abs_diff:.3g}", "yes" if r.ok else "[red]NO")
    console.print(table)


def export_cmd(
    model_dir: Path = typer.Argument(..., help="Hugging Face checkpoint directory"),
    out: Path = typer.Option(..., "--out", "-o", help="new directory for the ONNX graphs"),
    opset: int = typer.Option(17, help="ONNX opset (17..21)"),
    dtype: str = typer.Option("auto", help="auto (fp32 for fp32 checkpoints, else fp16) | fp16 | bf16 | fp32"),
    skip_verify: bool = typer.Option(False, "--skip-verify", help="skip the onnxruntime parity checks"),
    llm: bool = typer.Option(True, "--llm/--no-llm", help="export the text decoder"),
    vision: bool = typer.Option(True, "--vision/--no-vision", help="export the vision encoder"),
    max_batch_size: int = typer.Option(DEFAULT_MAX_NUM_SEQS, help="profile max: sequences per step"),
    max_seq_len: Optional[int] = typer.Option(None, help="profile max: past + new tokens of a sequence "
                                              "(default: the model's max_position_embeddings)"),
    max_num_tokens: int = typer.Option(DEFAULT_MAX_NUM_BATCHED_TOKENS, help="profile max: new tokens per sequence "
                                       "per step"),
    max_image_patches: int = typer.Option(16384, help="profile max: vision patches per call"),
) -> None:
    """Export the text decoder and vision encoder to ONNX, with TensorRT optimization profiles."""
    from autoglm_trt.builder.export import export_onnx
    from autoglm_trt.builder.options import ExportConfig

    _check_out(out)
    try:
        cfg = ExportConfig(opset=opset, dtype=dtype, verify=not skip_verify, with_llm=llm, with_vision=vision,
                           limits=_limits(max_batch_size, max_seq_len, max_num_tokens, max_image_patches))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    result = export_onnx(model_dir, out, cfg)
    if result.parity:
        _print_parity(result.parity)
    total = sum(result.timings.values())
    typer.echo(f"exported {', '.join(result.graphs.values())} to {out} in {total:.1f} s")


def build_cmd(
    model_dir: Path = typer.Argument(..., help="Hugging Face checkpoint directory"),
    out: Path = typer.Option(..., "--out", "-o", help="new engine directory"),
    calib: Optional[Path] = typer.Option(None, "--calib", help="calibration cache directory (SmoothQuant for w8a8)"),
    dtype: str = typer.Option("bf16", help="bf16 | fp16 | fp32"),
    quant: str = typer.Option("none", help="none | int8-wo (weight-only INT8) | w8a8 (INT8 weights + activations) | "
                              "int4-awq (4-bit weights, group 128; AWQ scales from --calib made with --awq) | fp8 (e4m3 weights + "
                              "activations; runs on Ada/Hopper)"),
    act_quant: str = typer.Option("dynamic", help="w8a8 activations: dynamic (per token) | static (calibrated)"),
    tp: int = typer.Option(1, "--tp", help="tensor-parallel ranks (one rank{N}.safetensors each)"),
    max_batch_size: int = typer.Option(DEFAULT_MAX_NUM_SEQS, help="sequences per step"),
    max_seq_len: Optional[int] = typer.Option(None, help="prompt + generated tokens of one sequence (default: the "
                                              "model's max_position_embeddings)"),
    max_num_tokens: int = typer.Option(DEFAULT_MAX_NUM_BATCHED_TOKENS, help="tokens per step"),
    max_image_patches: int = typer.Option(16384, help="vision patches per encoder call"),
    page_size: int = typer.Option(DEFAULT_BLOCK_SIZE, help="KV-cache block size in tokens"),
    cuda_graph_batch_sizes: Optional[str] = typer.Option(None, help="decode batch sizes to capture, e.g. 1,2,4,8 "
                                                         "(default: the engine's buckets up to --max-batch-size)"),
    backend: str = typer.Option("torch", help="torch (default) | tensorrt (needs TensorRT and a GPU)"),
    vision_onnx: bool = typer.Option(False, "--vision-onnx", help="also export visual/model.onnx"),
    source_hash: str = typer.Option("fast", help="fast (config, index, safetensors headers) | full (all bytes)"),
    opset: int = typer.Option(17, help="ONNX opset of exported graphs"),
    report: bool = typer.Option(False, "--report", help="then compare the quantized engine with the checkpoint "
                                "(top-1 agreement, KL, perplexity; loads both models: needs memory for two)"),
    report_device: str = typer.Option("auto", help="where --report runs the two models: auto | cpu | cuda"),
    report_samples: Optional[int] = typer.Option(None, min=1, help="--report: prompts per set (default: all)"),
) -> None:
    """Build an engine directory: manifest, pre-sharded (and pre-quantized) rank{N}.safetensors, tokenizer."""
    from autoglm_trt.builder.build import build_engine
    from autoglm_trt.builder.options import BuildConfig, parse_int_list

    _check_out(out)
    try:
        sizes = parse_int_list(cuda_graph_batch_sizes) or ()
        cfg = BuildConfig(dtype=dtype, quant=quant, act_quant=act_quant, tp=tp, page_size=page_size, cuda_graph_batch_sizes=sizes,
                          backend=backend, vision_onnx=vision_onnx, opset=opset,
                          calib_dir=str(calib) if calib else None, source_hash=source_hash,
                          limits=_limits(max_batch_size, max_seq_len, max_num_tokens, max_image_patches))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if calib is not None and not calib.is_dir():
        raise UserError(f"--calib {calib} is not a directory (make one with `autoglm-trt calibrate`)")
    if report:
        _check_report(cfg, report_device)
    result = build_engine(model_dir, out, cfg)
    size = sum(f.bytes for f in result.manifest.files.values()) / 2 ** 20
    typer.echo(f"built {out} ({cfg.dtype}, quant {cfg.quant}, tp {cfg.tp}, {size:.0f} MiB) in "
               f"{result.seconds:.1f} s")
    if report:
        from autoglm_trt.calibration.command import print_report
        from autoglm_trt.calibration.report import engine_accuracy_report

        print_report({cfg.quant: engine_accuracy_report(model_dir, out, device=report_device, samples=report_samples,
                                                         show_progress=True)})


def _check_report(cfg, device: str) -> None:
    """--report's preconditions, checked before the build so a mistake costs nothing."""
    if cfg.quant == "none":
        raise UserError("--report compares a quantized engine with its checkpoint: add --quant int8-wo, w8a8 or fp8")
    if cfg.tp != 1:
        raise UserError(f"--report loads the engine on one device: build with --tp 1 to measure accuracy (the --tp "
                        f"{cfg.tp} shards hold the same quantized weights)")
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--report-device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--report-device cuda: this machine has no CUDA GPU (use cpu or auto)")
