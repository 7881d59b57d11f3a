"""The `autoglm-trt` command line: thin wrappers over the package; user mistakes exit 2 with one line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from autoglm_trt import __version__
from autoglm_trt.errors import UserError
from autoglm_trt.utils.choices import DTYPES, choice, device_choice, dtype_choice

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fast inference engines for AutoGLM-Phone-9B (GLM-4.1V): build, calibrate, serve.")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"autoglm-trt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """Fast inference engines for AutoGLM-Phone-9B (GLM-4.1V): build, calibrate, serve."""


@app.command("init-random")
def init_random_cmd(
    out: Path = typer.Argument(..., help="new directory to write the checkpoint into"),
    preset: str = typer.Option("tiny", help="tiny (seconds, CPU tests) or phone-9b (the real 9B shape)"),
    seed: int = typer.Option(0, help="random seed of the weights"),
    dtype: Optional[str] = typer.Option(None, help="bfloat16 | float16 | float32 (default: the preset's)",
                                        callback=choice("--dtype", DTYPES[1:], {"bf16": "bfloat16", "fp16": "float16",
                                                                                "fp32": "float32"})),
    device: str = typer.Option("cpu", help="where to draw the random numbers (cuda is much faster for 9B)",
                               callback=choice("--device", ("cpu", "cuda"))),
) -> None:
    """Write a Hugging Face GLM-4.1V model directory with random weights (real layout, real tokenizer)."""
    from autoglm_trt.models.random_checkpoint import PRESETS, init_random
    from autoglm_trt.utils.atomic_dir import atomic_directory

    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if device == "cuda":
        _check_cuda("--device cuda")
    with atomic_directory(out) as tmp:  # NOTE: an interrupted 9B write must not block the rerun
        init_random(tmp, preset=preset, seed=seed, dtype=dtype, device=device)
    typer.echo(f"wrote {preset} checkpoint to {out}")


def _check_cuda(flag: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"{flag}: torch sees no CUDA GPU on this machine (use cpu)")


@app.command()
def generate(
    model_dir: Path = typer.Argument(..., help="checkpoint or engine directory"),
    prompt: str = typer.Option(..., "--prompt", "-p", help="the user message"),
    image: Optional[list[Path]] = typer.Option(None, "--image", help="image file(s) to show the model"),
    max_tokens: int = typer.Option(128, help="tokens to generate at most"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0),
    seed: Optional[int] = typer.Option(None),
    system: Optional[str] = typer.Option(None, help="system prompt"),
    raw: bool = typer.Option(False, help="send the prompt as raw text, without the chat template"),
    device: str = typer.Option("auto", help="auto | cpu | cuda", callback=device_choice),
    dtype: str = typer.Option("auto", help="auto | bfloat16 | float16 | float32", callback=dtype_choice),
) -> None:
    """Generate a reply offline, streaming tokens to the terminal."""
    from autoglm_trt.generate import run_generate

    run_generate(model_dir, prompt, images=image or [], max_tokens=max_tokens, temperature=temperature,
                 top_p=top_p, seed=seed, system=system, raw=raw, device=device, dtype=dtype)


@app.command()
def doctor() -> None:
    """Print what this machine has: Python, torch, CUDA devices, Triton, ONNX Runtime, TensorRT."""
    from autoglm_trt.doctor import run_doctor

    run_doctor()


# --- build commands ---
from autoglm_trt.builder.cli_commands import build_cmd, export_cmd  # noqa: E402 (typer only, no heavy imports)

app.command("export")(export_cmd)
app.command("build")(build_cmd)


@app.command()
def calibrate(
    model_dir: Path = typer.Argument(..., help="checkpoint directory (Hugging Face layout)"),
    out: Path = typer.Option(..., "--out", "-o", help="calibration directory to write (CALIB_DIR)"),
    dataset: Optional[Path] = typer.Option(None, help="JSONL of conversations (default: the shipped phone-agent set)"),
    method: str = typer.Option("entropy", help="max | percentile | entropy (TensorRT's KL calibration)"),
    samples: Optional[int] = typer.Option(None, help="use the first N samples (default: all)"),
    percentile: float = typer.Option(99.99, help="for --method percentile"),
    alpha: float = typer.Option(0.5, help="SmoothQuant migration strength (0..1)"),
    max_pixels: Optional[int] = typer.Option(None, help="resize bound for the screenshots"),
    onnx: Optional[Path] = typer.Option(None, help="decoder ONNX graph: also write a Q/DQ copy (decoder_qdq.onnx)"),
    report: bool = typer.Option(False, "--report", help="compare INT8 with the float model and print it"),
    report_mode: str = typer.Option("all", help="w8a8 | int8-wo | fp8 | int4-awq | all (= both INT8 modes)"),
    awq: bool = typer.Option(False, "--awq", help="also search AWQ scales for --quant int4-awq (a third pass)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda", callback=device_choice),
    dtype: str = typer.Option("auto", help="auto | bfloat16 | float16 | float32", callback=dtype_choice),
    trt_version: str = typer.Option("10.0.0", help="TensorRT version written in the calibration cache header"),
) -> None:
    """Collect INT8 activation statistics: TensorRT calibration cache, SmoothQuant scales, Q/DQ ONNX, report."""
    from autoglm_trt.calibration.command import run_calibrate

    run_calibrate(model_dir, out, dataset=dataset, method=method, samples=samples, percentile=percentile,
                  alpha=alpha, max_pixels=max_pixels, onnx=onnx, report=report, report_mode=report_mode,
                  device=device, dtype=dtype, trt_version=trt_version, awq=awq)


# --- serve commands ---
from autoglm_trt.serve.cli_commands import bench_cmd, serve_cmd  # noqa: E402 (typer only, no heavy imports)

app.command("serve")(serve_cmd)
app.command("bench")(bench_cmd)


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: a user mistake (a UserError or a usage error) is one red line and exit code 2,
    never a traceback."""
    from autoglm_trt.serve.flags import normalize_serve_argv

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        app(args=normalize_serve_argv(args), prog_name="autoglm-trt", standalone_mode=False)
    except UserError as exc:
        _error(str(exc))
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # NOTE: click's exceptions, or the copy vendored in newer typer: matched by shape
        if type(exc).__name__ == "NoArgsIsHelpError":  # `autoglm-trt` alone: the help, as asked
            exc.show()  # type: ignore[attr-defined]
            sys.exit(2)
        if type(exc).__name__ == "Abort":
            typer.echo("aborted", err=True)
            sys.exit(130)
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):  # a usage error: bad option, missing argument
            ctx = getattr(exc, "ctx", None)
            _error(f"{exc.format_message()} (see `{ctx.command_path if ctx else 'autoglm-trt'} --help`)")
        raise


def _error(message: str) -> None:
    typer.secho(f"error: {' '.join(message.split())}", fg=typer.colors.RED, err=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
