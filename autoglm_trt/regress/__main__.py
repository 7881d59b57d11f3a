"""`python -m autoglm_trt.regress [--update] [--modes fp32,tp2] [--goldens DIR] [--work DIR]` (exit 1: mismatch)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from autoglm_trt.errors import UserError
from autoglm_trt.regress.cases import MODES
from autoglm_trt.regress.golden import GOLDENS_DIR


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m autoglm_trt.regress", description=__doc__)
    ap.add_argument("--update", action="store_true", help="rewrite the goldens from this run (on purpose)")
    ap.add_argument("--modes", default=",".join(m.name for m in MODES), help="comma-separated subset of modes")
    ap.add_argument("--goldens", type=Path, default=GOLDENS_DIR, help="directory of {mode}.json goldens")
    ap.add_argument("--work", type=Path, default=None, help="keep the checkpoint and engines here (a new directory)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    by_name = {m.name: m for m in MODES}
    names = [n for n in args.modes.split(",") if n]
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        print(f"error: --modes takes a subset of {', '.join(by_name)}, got {args.modes!r}", file=sys.stderr)
        return 2
    from autoglm_trt.regress.job import run_job

    try:
        return run_job(args.goldens, tuple(by_name[n] for n in names), update=args.update, work=args.work)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # NOTE: guarded: the TP worker processes are spawned and re-import __main__
    sys.exit(main())
