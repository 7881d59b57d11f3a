"""The regression job: checkpoint -> an engine per mode -> greedy runs -> compare with (or write) the goldens."""

from __future__ import annotations

import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from autoglm_trt.errors import UserError
from autoglm_trt.regress.cases import MODES, PRESET, PROMPTS, SEED, Mode
from autoglm_trt.regress.golden import (UPDATE_COMMAND, CaseCheck, compare_case, format_check, golden_path,
                                        read_golden, write_golden)
from autoglm_trt.regress.run import ModeResult, build_mode, checkpoint_hash, make_checkpoint, run_mode


@dataclass
class ModeReport:
    result: ModeResult
    checks: list[CaseCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # e.g. a prompt without a golden

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.checks)


def _console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=140)  # NOTE: CI logs get the whole table


@contextmanager
def quiet_engine_logs():
    """The engine's own bars and log lines (the shared stderr console) stay silent under our display."""
    from autoglm_trt.utils.progress import console

    before, console.quiet = console.quiet, True
    try:
        yield
    finally:
        console.quiet = before


def run_job(goldens: Path, modes: tuple[Mode, ...] = MODES, update: bool = False, work: Path | None = None,
            out: Console | None = None) -> int:
    """0: every mode matches its golden (or the goldens were written); 1: a mismatch (printed)."""
    out = out or _console()
    docs = {} if update else {m.name: read_golden(golden_path(goldens, m)) for m in modes}  # NOTE: fail first
    tmp = Path(tempfile.mkdtemp(prefix="autoglm_regress_")) if work is None else work
    t0 = time.perf_counter()
    try:
        reports, checkpoint, decode = _run_all(goldens, modes, tmp, docs)
    finally:
        if work is None:
            shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    out.print(summary_table(reports, update))
    if update:
        out.print(f"wrote {len(reports)} golden files to {goldens} in {seconds:.1f} s; review and commit them")
        return 0
    other = sorted(n for n, d in docs.items() if d["checkpoint"].get("sha256") != checkpoint["sha256"])
    if other:
        out.print(f"[yellow]note: the goldens of {', '.join(other)} were written from another checkpoint than this "
                  f"run's `init-random --seed {SEED}`: init-random (or this machine's libm) changed the weights; "
                  "differences below may come from there, not from the engine[/yellow]", highlight=False)
    failed = [r for r in reports if not r.ok]
    for r in reports:
        _print_details(r, out, decode)
    if failed:
        out.print(f"\n[bold red]engine regression: {len(failed)} of {len(reports)} modes differ from the goldens "
                  f"({seconds:.1f} s).[/bold red]\nIf the change is intended, refresh the goldens and commit them:\n"
                  f"    {UPDATE_COMMAND}", highlight=False)
        return 1
    out.print(f"[bold green]engine regression: all {len(reports)} modes match the goldens "
              f"({seconds:.1f} s)[/bold green]")
    return 0


def _run_all(goldens: Path, modes: tuple[Mode, ...], work: Path, docs: dict[str, dict]):
    """Every mode's report (written as goldens when `docs` is empty), the checkpoint's record, and
    token id -> text under its tokenizer (for the diffs)."""
    from autoglm_trt.processing.tokenizer import Tokenizer

    modes = tuple(sorted(modes, key=lambda m: m.tp))  # NOTE: TP=1 engines first, each TP=2 engine shut down
    columns = (SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    reports = []
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar, quiet_engine_logs():
        task = bar.add_task(f"init-random --preset {PRESET} --seed {SEED}", total=1 + 3 * len(modes))
        path = make_checkpoint(work)
        tokenizer = Tokenizer.from_dir(path)
        checkpoint = {"preset": PRESET, "seed": SEED, "sha256": checkpoint_hash(path), "hash_method": "full"}
        bar.advance(task)
        for mode in modes:
            bar.update(task, description=f"{mode.name}: build")
            result = _run_mode(path, work, mode, lambda phase, m=mode: bar.update(
                task, description=f"{m.name}: {phase}", advance=1))
            report = compare_mode(result, docs[mode.name]) if docs else _write(goldens, result, checkpoint)
            bar.console.print(_mode_line(report, not docs), highlight=False)
            reports.append(report)
        bar.update(task, description="done")
    return reports, checkpoint, lambda i: tokenizer.decode([i], skip_special_tokens=False)


def _run_mode(checkpoint: Path, work: Path, mode: Mode, advance) -> ModeResult:
    t0 = time.perf_counter()
    engine_dir = build_mode(checkpoint, work, mode)
    seconds = {"build": time.perf_counter() - t0}
    advance("load")
    cases, timings = run_mode(engine_dir, mode, PROMPTS, on_phase=advance)
    advance("compare")
    return ModeResult(mode, cases, {**seconds, **timings})


def _write(goldens: Path, result: ModeResult, checkpoint: dict) -> ModeReport:
    """Write the mode's golden; the report compares with the one it replaces (to say what changed)."""
    import torch

    from autoglm_trt import __version__

    path = golden_path(goldens, result.mode)
    try:
        report = compare_mode(result, read_golden(path))
    except UserError:  # none yet, or an older format
        report = ModeReport(result)
    written_by = {"autoglm_trt": __version__, "torch": torch.__version__, "machine": platform.machine(),
                  "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    write_golden(path, result.mode, result.cases, {p.name: p.description for p in PROMPTS}, checkpoint, written_by)
    return report


def compare_mode(result: ModeResult, golden: dict) -> ModeReport:
    """Every prompt of one mode against the golden document (read_golden's)."""
    report = ModeReport(result)
    for name, got in result.cases.items():
        expected = golden["cases"].get(name)
        if expected is None:
            report.problems.append(f"no golden for prompt {name!r} (a new prompt?)")
            continue
        report.checks.append(compare_case(result.mode.name, name, result.mode.atol, expected, got))
    return report


def _mode_line(report: ModeReport, update: bool) -> str:
    r, s = report.result, report.result.seconds
    times = f"build {s.get('build', 0):.1f} s, load {s.get('load', 0):.1f} s, generate {s.get('generate', 0):.1f} s"
    if update:
        changed = [c.prompt for c in report.checks if not c.ok] + report.problems
        what = f"changed: {', '.join(changed)}" if changed else "no prompt changed" if report.checks else "new"
        return f"[cyan]{'wrote':<8}[/cyan] {r.mode.name:<8} {times} ({what})"
    status = f"[green]{'ok':<8}[/green]" if report.ok else "[red]MISMATCH[/red]"
    return f"{status} {r.mode.name:<8} {times}"


def summary_table(reports: list[ModeReport], update: bool) -> Table:
    table = Table(title="engine regression" + (" (goldens written)" if update else ""))
    for col in ("mode", "quant", "tp", "prompts", "tokens", "max |Δlogprob|", "tolerance", "min margin",
                "near ties", "status"):
        table.add_column(col, justify="right" if col not in ("mode", "quant", "status") else "left")
    for rep in reports:
        m, cases = rep.result.mode, rep.result.cases.values()
        margins = [x for c in cases for x in c.margins]
        ties = sum(x <= 2 * m.atol for x in margins)
        diff = max((c.max_diff for c in rep.checks), default=0.0)
        status = "written" if update else ("ok" if rep.ok else "MISMATCH")
        table.add_row(m.name, m.quant, str(m.tp), str(len(rep.result.cases)), str(sum(len(c.token_ids) for c in cases)),
                      "-" if update else f"{diff:.1e}", f"{m.atol:g}", f"{min(margins, default=0):.1e}", str(ties),
                      status)
    return table


def _print_details(report: ModeReport, out: Console, decode) -> None:
    """The diff of every failed check, and a line for each accepted near tie."""
    descriptions = {p.name: p.description for p in PROMPTS}
    for problem in report.problems:
        out.print(f"\nMISMATCH  mode {report.result.mode.name}: {problem}", highlight=False, markup=False,
                  soft_wrap=True)
    for check in report.checks:
        if not check.ok:
            out.print("\n" + format_check(check, descriptions.get(check.prompt, ""), decode), highlight=False,
                      markup=False, soft_wrap=True)
        elif check.near_tie:
            out.print(f"note: mode {check.mode}, prompt {check.prompt!r}: another token at the near tie at position "
                      f"{check.position} (golden margin {check.expected.margins[check.position]:.1e}), accepted",
                      highlight=False, markup=False, soft_wrap=True)
