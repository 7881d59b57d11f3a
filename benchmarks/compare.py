"""Compare a benchmark's JSON with a stored baseline; exit 1 when a figure is worse by more than the tolerance.

    python benchmarks/compare.py BENCH.json BASELINE.json [--tolerance 0.05] [--ignore 'hf.*'] [--only 'engine.*']

Reads what the benchmarks write with --json: bench_decode.py, bench_int8.py, bench_tp.py, bench_allreduce.py,
bench_build.py and bench_serving.py (= `autoglm-trt bench`). Every number is a figure named by its path,
e.g. `engine.1.tok_s_per_seq`, `levels[concurrency=8].ttft_p50_ms`, `rows[variant=nccl,mode=graph,bytes=8192].us`
(list items are named by their identity keys). Its direction comes from the names on its path, the
last name that says one wins (`floor_ms.1`: lower; `kernels[...].tbs.bf16`: higher):

    higher is better   tok_s, requests_s, tokens_per_s, requests_per_s, *_per_s, tbs (TB/s), tflops, speedup
    lower is better    ms, us, latency, seconds, *_s (startup_s, duration_s), gib / mib (memory, sizes), failed
    not compared       anything else (batch, tokens, kv_blocks, ...), booleans, NaN, and the `args` and
                       `sweep` sections (settings and tuning runs, not results)

Worse means bench < baseline * (1 - tolerance) for higher-is-better figures and bench > baseline *
(1 + tolerance) for lower-is-better ones. Figures on one side only are listed, never failed.
Exit status: 0 nothing worse, 1 something worse, 2 unreadable input or no figure in common.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

SKIP_SECTIONS = ("args", "sweep")
ID_KEYS = ("concurrency", "batch", "shape", "m", "n", "k", "what", "variant", "mode", "bytes", "max_num_seqs")
_HIGHER = re.compile(r"(^|_)(tok_s|requests_s|tokens_per_s|requests_per_s|per_s|tbs|tflops|speedup)($|_)")
_LOWER = re.compile(r"(^|_)(ms|us|latency|seconds|s|gib|mib|failed)($|_)")


@dataclass
class Row:
    figure: str  # path of the number, e.g. engine.1.tok_s_per_seq
    better: str  # "higher" | "lower"
    baseline: float | None  # None: not in the baseline
    bench: float | None  # None: not in this run

    @property
    def change(self) -> float | None:
        """Relative change, bench / baseline - 1 (None where undefined)."""
        if self.baseline is None or self.bench is None or self.baseline == 0:
            return None
        return self.bench / self.baseline - 1

    def status(self, tolerance: float) -> str:
        if self.baseline is None or self.bench is None:
            return "missing"
        if self.better == "higher":
            worse, better = self.bench < self.baseline * (1 - tolerance), self.bench > self.baseline
        else:
            worse, better = self.bench > self.baseline * (1 + tolerance), self.bench < self.baseline
        return "WORSE" if worse else ("better" if better else "ok")


def direction(path: list[str]) -> str | None:
    """"higher" / "lower" from the last name on the path that says one, else None (not a result)."""
    for name in reversed(path):
        name = name.split("[")[0].lower().replace("-", "_")
        if _HIGHER.search(name):
            return "higher"
        if _LOWER.search(name):
            return "lower"
    return None


def _item_name(key: str, i: int, item: object) -> str:
    if isinstance(item, dict):
        ids = [f"{k}={item[k]}" for k in ID_KEYS if k in item and not isinstance(item[k], (dict, list))]
        if ids:
            return f"{key}[{','.join(ids)}]"
    return f"{key}[{i}]"


def figures(doc: object, path: tuple[str, ...] = ()) -> dict[str, tuple[str, float]]:
    """{figure path: (direction, value)} of every comparable number in a benchmark JSON."""
    out: dict[str, tuple[str, float]] = {}
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key in SKIP_SECTIONS:
                continue
            out.update(figures(value, path + (str(key),)))
    elif isinstance(doc, list):
        parent, head = (path[-1], path[:-1]) if path else ("", ())
        for i, item in enumerate(doc):
            out.update(figures(item, head + (_item_name(parent, i, item),)))
    elif isinstance(doc, (int, float)) and not isinstance(doc, bool) and math.isfinite(doc):
        better = direction(list(path))
        if better is not None:
            out[".".join(path)] = (better, float(doc))
    return out


def compare(bench: object, baseline: object, only: list[str] = (), ignore: list[str] = ()) -> list[Row]:
    a, b = figures(bench), figures(baseline)
    rows = []
    for name in list(b) + [n for n in a if n not in b]:
        if (only and not any(fnmatch.fnmatch(name, p) for p in only)) or any(fnmatch.fnmatch(name, p) for p in ignore):
            continue
        better = (b.get(name) or a.get(name))[0]
        rows.append(Row(name, better, b[name][1] if name in b else None, a[name][1] if name in a else None))
    return rows


def print_table(rows: list[Row], tolerance: float, title: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title)
    for col in ("figure", "better", "baseline", "bench", "change", "status"):
        table.add_column(col, justify="left" if col in ("figure", "better", "status") else "right")
    style = {"WORSE": "bold red", "better": "green", "missing": "dim"}
    for r in rows:
        s = r.status(tolerance)
        table.add_row(escape(r.figure), r.better, _fmt(r.baseline), _fmt(r.bench),
                      "-" if r.change is None else f"{100 * r.change:+.1f}%", f"[{style.get(s, '')}]{s}[/]"
                      if s in style else s)
    console = Console()
    if not console.is_terminal:  # NOTE: CI logs get the whole table, not 80 wrapped columns
        console = Console(width=160)
    console.print(table)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def load(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench", type=Path, help="this run's JSON (a benchmark's --json output)")
    ap.add_argument("baseline", type=Path, help="the stored baseline JSON (same benchmark)")
    ap.add_argument("--tolerance", type=float, default=0.05, help="accepted relative loss, e.g. 0.05 = 5%%")
    ap.add_argument("--only", action="append", default=[], help="compare only figures matching this glob")
    ap.add_argument("--ignore", action="append", default=[], help="skip figures matching this glob")
    args = ap.parse_args(argv)
    if not 0 <= args.tolerance < 1:
        print(f"error: --tolerance must be in [0, 1), got {args.tolerance}", file=sys.stderr)
        return 2
    try:
        bench, baseline = load(args.bench), load(args.baseline)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = compare(bench, baseline, args.only, args.ignore)
    both = [r for r in rows if r.status(args.tolerance) != "missing"]
    if not both:
        print(f"error: {args.bench} and {args.baseline} have no figure in common (different benchmarks?)",
              file=sys.stderr)
        return 2
    _warn_context(bench, baseline)
    print_table(rows, args.tolerance, f"{args.bench} vs baseline {args.baseline} (tolerance {args.tolerance:.0%})")
    worse = [r for r in rows if r.status(args.tolerance) == "WORSE"]
    print(f"{len(worse)} of {len(both)} figures worse than the baseline by more than {args.tolerance:.0%}"
          + (": " + ", ".join(r.figure for r in worse) if worse else ""))
    return 1 if worse else 0


def _warn_context(bench: object, baseline: object) -> None:
    """Different GPUs or settings make the comparison weak: say so (it still runs)."""
    if not (isinstance(bench, dict) and isinstance(baseline, dict)):
        return
    for key in ("gpu", "args"):
        a, b = bench.get(key), baseline.get(key)
        if isinstance(a, dict) and isinstance(b, dict):  # NOTE: where the JSON went is not a setting
            a, b = ({k: v for k, v in d.items() if k != "json"} for d in (a, b))
        if a is not None and b is not None and a != b:
            print(f"note: {key} differs from the baseline's: {a!r} vs {b!r}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
