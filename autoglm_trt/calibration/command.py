"""The body of `autoglm-trt calibrate`: calibrate, optionally report, print what was written."""

from __future__ import annotations

from pathlib import Path

from autoglm_trt.calibration.cache import CACHE_FILE, update_summary
from autoglm_trt.calibration.runner import CalibrateOptions, calibrate
from autoglm_trt.errors import UserError
from autoglm_trt.utils.progress import console

# NOTE: "all" is the INT8 modes; fp8 needs FP8 tensor cores (or the CPU) and is asked for by name
REPORT_MODES = {"w8a8": ("w8a8",), "int8-wo": ("int8-wo",), "fp8": ("fp8",), "int4-awq": ("int4-awq",),
                "all": ("int8-wo", "w8a8")}


def run_calibrate(model_dir: Path, out: Path, *, dataset: Path | None, method: str, samples: int | None,
                  percentile: float, alpha: float, max_pixels: int | None, onnx: Path | None, report: bool,
                  report_mode: str, device: str, dtype: str, trt_version: str, awq: bool = False) -> None:
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is not a model directory (no config.json)")
    if onnx is not None and not onnx.is_file():
        raise UserError(f"--onnx {onnx} does not exist")
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out} is a file: name a directory for the calibration")
    if report_mode == "int4-awq" and not awq:
        raise UserError("--report-mode int4-awq reports the AWQ build: add --awq")
    if report_mode not in REPORT_MODES:
        raise UserError(f"--report-mode must be one of {', '.join(REPORT_MODES)}, got {report_mode!r}")
    try:
        opts = CalibrateOptions(method=method, samples=samples, smooth_alpha=alpha, percentile=percentile,
                                max_pixels=max_pixels, awq=awq)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    result = calibrate(model_dir, out, dataset=dataset, opts=opts, device=device, dtype=dtype, onnx=onnx,
                       trt_version=trt_version)
    console.print(f"calibrated {len(result.act_amax)} linears on {result.num_samples} samples "
                  f"({result.num_tokens} tokens), method {result.method}: wrote {out}/{CACHE_FILE} and statistics")
    if onnx is not None:
        console.print(f"wrote {out}/decoder_qdq.onnx")
    if report:
        from autoglm_trt.calibration.report import accuracy_report

        reports = {m: accuracy_report(model_dir, out, m, device=device, dtype=dtype, show_progress=True)
                   for m in REPORT_MODES[report_mode]}
        update_summary(out, report=reports)
        print_report(reports)


_SET_NAMES = {"calibration_set": "calib", "heldout_set": "held-out", "perplexity": "text"}


def print_report(reports: dict[str, dict]) -> None:
    """One row per mode and set; compact, so the table fits 80 columns (a pipe or a log file)."""
    from rich import box
    from rich.table import Table

    table = Table(title="quantized vs float", box=box.SIMPLE_HEAD)
    for col in ("mode", "set", "positions", "top-1", "mean KL", "ppl float", "ppl quant"):
        table.add_column(col)
    for mode, r in reports.items():
        for name, short in _SET_NAMES.items():
            row = r[name]
            ppl = (f"{row['reference']:.4g}", f"{row['quantized']:.4g}") if name == "perplexity" else ("", "")
            table.add_row(mode, short, str(row["positions"]), f"{row['top1_agreement']:.4f}", f"{row['mean_kl']:.3g}",
                          *ppl)
    console.print(table)
