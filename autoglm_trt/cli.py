"""The `autoglm-trt` command line: thin wrappers over the package; user mistakes exit 2 with one line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from autoglm_trt.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fast inference engines for AutoGLM-Phone-9B (GLM-4.1V): build, calibrate, serve.")


@app.command("init-random")
def init_random_cmd(
    out: Path = typer.Argument(..., help="new directory to write the checkpoint into"),
    preset: str = typer.Option("tiny", help="tiny (seconds, CPU tests) or phone-9b (the real 9B shape)"),
    seed: int = typer.Option(0, help="random seed of the weights"),
    dtype: Optional[str] = typer.Option(None, help="bfloat16 | float16 | float32 (default: the preset's)"),
    device: str = typer.Option("cpu", help="where to draw the random numbers (cuda is much faster for 9B)"),
) -> None:
    """Write a Hugging Face GLM-4.1V model directory with random weights (real layout, real tokenizer)."""
    from autoglm_trt.models.random_checkpoint import init_random

    path = init_random(out, preset=preset, seed=seed, dtype=dtype, device=device)
    typer.echo(f"wrote {preset} checkpoint to {path}")


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
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    dtype: str = typer.Option("auto", help="auto | bfloat16 | float16 | float32"),
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
    report_mode: str = typer.Option("all", help="w8a8 | int8-wo | fp8 | all (= both INT8 modes)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    dtype: str = typer.Option("auto", help="auto | bfloat16 | float16 | float32"),
    trt_version: str = typer.Option("10.0.0", help="TensorRT version written in the calibration cache header"),
) -> None:
    """Collect INT8 activation statistics: TensorRT calibration cache, SmoothQuant scales, Q/DQ ONNX, report."""
    from autoglm_trt.calibration.command import run_calibrate

    run_calibrate(model_dir, out, dataset=dataset, method=method, samples=samples, percentile=percentile,
                  alpha=alpha, max_pixels=max_pixels, onnx=onnx, report=report, report_mode=report_mode,
                  device=device, dtype=dtype, trt_version=trt_version)


# --- serve commands ---
from autoglm_trt.serve.cli_commands import bench_cmd, serve_cmd  # noqa: E402 (typer only, no heavy imports)

app.command("serve")(serve_cmd)
app.command("bench")(bench_cmd)


def main() -> None:
    """Console entry point: a UserError is one red line and exit code 2, never a traceback."""
    try:
        app(standalone_mode=False)
    except UserError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # usage errors (bad option, missing argument): click's or typer's own copy
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
