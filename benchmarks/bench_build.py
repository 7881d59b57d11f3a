"""Build benchmark: wall time and peak host memory (RSS) of `autoglm-trt build` / `export`, and engine loading.

    python benchmarks/bench_build.py                                   # tiny model, seconds
    python benchmarks/bench_build.py --preset phone-9b --model-dir /data/phone-9b --tp 1 2 --quant none int8-wo

Each measured command runs as its own subprocess; its peak RSS is that process's ru_maxrss (os.wait4),
so the numbers are the command's own, not this script's. A missing --model-dir is filled with a random
checkpoint of --preset first (phone-9b: ~20 GB on disk, minutes on a CPU). Use --json to keep results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Run:
    what: str  # the command, short
    seconds: float
    peak_rss_gib: float
    out_gib: float  # bytes written (engine / ONNX directory)
    ok: bool


def measure(what: str, argv: list[str], out: Path | None = None) -> Run:
    """Run argv as a child process; wall time and the child's own peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    ok = os.waitstatus_to_exitcode(status) == 0
    if not ok:
        print(f"{what} failed:\n{proc.stderr.read().decode()[-2000:]}", file=sys.stderr)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out and out.exists() else 0
    return Run(what, seconds, usage.ru_maxrss / 2 ** 20, size / 2 ** 30, ok)  # NOTE: ru_maxrss is KiB on Linux


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "autoglm_trt.cli", *args]


LOAD_SNIPPET = """
import sys
from autoglm_trt.models.loader import load_model
load_model(sys.argv[1], dtype=sys.argv[2], rank=0, tp_size=int(sys.argv[3]), show_progress=False)
"""


def bench(args: argparse.Namespace, work: Path) -> list[Run]:
    model_dir = Path(args.model_dir)
    runs = []
    if not model_dir.exists():
        runs.append(measure(f"init-random {args.preset}", cli("init-random", str(model_dir), "--preset", args.preset),
                            model_dir))
    load_dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[args.dtype]
    if not args.no_load:
        runs.append(measure("load checkpoint (tp 1)", [sys.executable, "-c", LOAD_SNIPPET, str(model_dir),
                                                       load_dtype, "1"]))
    for quant in args.quant:
        for tp in args.tp:
            out = work / f"engine-{quant}-tp{tp}"
            flags = ["--dtype", args.dtype, "--quant", quant, "--tp", str(tp)]
            runs.append(measure(f"build {args.dtype} {quant} tp{tp}", cli("build", str(model_dir), "-o", str(out),
                                                                           *flags), out))
            if not args.no_load:
                runs.append(measure(f"load engine {quant} tp{tp} (rank 0)",
                                    [sys.executable, "-c", LOAD_SNIPPET, str(out), load_dtype, str(tp)]))
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    if args.export:
        out = work / "onnx"
        runs.append(measure("export (verify)", cli("export", str(model_dir), "-o", str(out)), out))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", help="tiny | phone-9b (for a missing --model-dir)")
    ap.add_argument("--model-dir", default=None, help="checkpoint (default: a fresh random one in --work)")
    ap.add_argument("--work", default=None, help="where engines go (default: a temporary directory)")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--tp", type=int, nargs="+", default=[1])
    ap.add_argument("--quant", nargs="+", default=["none"])
    ap.add_argument("--export", action="store_true", help="also time `autoglm-trt export` (loads the whole model)")
    ap.add_argument("--keep", action="store_true", help="keep the engine directories")
    ap.add_argument("--no-load", action="store_true", help="skip the load timings (they hold a whole rank in RAM)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_build_"))
    work.mkdir(parents=True, exist_ok=True)
    args.model_dir = args.model_dir or str(work / f"ckpt-{args.preset}")
    runs = bench(args, work)
    print(f"{'what':<40} {'seconds':>9} {'peak RSS GiB':>13} {'output GiB':>11}")
    for r in runs:
        print(f"{r.what:<40} {r.seconds:>9.1f} {r.peak_rss_gib:>13.2f} {r.out_gib:>11.2f}{'' if r.ok else '  FAILED'}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in runs], indent=2))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
