"""The agent workload's entry point (`autoglm-trt bench --workload agent`) and its printed report."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from autoglm_trt.serve.bench_agent import AgentOptions, bench_agent
from autoglm_trt.utils.limits import raise_open_files_limit

COLUMNS = ("depth", "steps", "failed", "prompt tok", "cached tok", "out tok", "TTFT p50 ms", "TTFT p99 ms",
           "step p50 ms", "step p99 ms", "action p50 ms", "action p99 ms", "no action", "server TTFT ms")


def run_agent_bench(url: str, opts: AgentOptions, json_out: Path | None = None) -> dict:
    raise_open_files_limit()
    report = asyncio.run(bench_agent(url, opts))
    print_agent_report(report)
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2))
    return report


def _f(value: float | None, fmt: str = ".0f") -> str:
    return "-" if value is None else format(value, fmt)


def print_agent_report(report: dict) -> None:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # NOTE: logs and CI get whole tables, not 80 wrapped columns
        console = Console(width=200)
    console.print(f"[bold]{report['model']} @ {report['url']}[/bold]: agent sessions ({report['lang']}, "
                  f"{report['system_prompt_chars']}-character system prompt), {report['steps']} steps each, "
                  f"{report['screen_size']} screenshots, max_tokens {report['max_tokens']}"
                  + (", ignore_eos" if report["ignore_eos"] else "") + f"; TTFT at the {report['ttft_basis']}")
    for lv in report["levels"]:
        console.print(_level_table(lv))
        console.print(_level_line(lv))
        if lv["first_error"]:
            console.print(f"[red]{lv['failed']} failed; first error: {lv['first_error']}[/red]")
    if report.get("server_side_unavailable"):
        console.print(f"[dim]no server-side breakdown ({report['server_side_unavailable']})[/dim]")
    for note in report["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")


def _level_table(lv: dict) -> Any:
    from rich.table import Table

    table = Table(title=f"{lv['sessions']} session{'s' if lv['sessions'] > 1 else ''} x {lv['steps_per_session']} "
                        f"steps: {lv['steps_per_s']:.2f} steps/s")
    for col in COLUMNS:
        table.add_column(col, justify="right")
    for d in lv["depths"]:
        server = (d.get("server_ms") or {}).get("ttft")
        table.add_row(str(d["depth"]), str(d["steps"]), str(d["failed"]), _f(d["prompt_tokens_mean"]),
                      _f(d["cached_tokens_mean"]), _f(d["output_tokens_mean"]), _f(d["ttft_p50_ms"]),
                      _f(d["ttft_p99_ms"]), _f(d["step_p50_ms"]), _f(d["step_p99_ms"]), _f(d["action_p50_ms"]),
                      _f(d["action_p99_ms"]), str(d["action_missing"]), _f(server, ".1f"))
    return table


def _level_line(lv: dict) -> str:
    """The level as a whole: step time over all depths, the server's phase means, speculation's counters."""
    parts = [f"all steps: step p50 {_f(lv['step_p50_ms'])} / p99 {_f(lv['step_p99_ms'])} ms, "
             f"TTFT p50 {_f(lv['ttft_p50_ms'])} ms, {lv['synthetic_replies']} synthetic replies"]
    if lv.get("server_ms"):
        parts.append("server mean ms: " + ", ".join(f"{k} {v:.1f}" for k, v in lv["server_ms"].items()))
    spec = lv.get("spec_decode")
    if spec and spec["draft_tokens"]:
        parts.append(f"speculation: {spec['accepted_tokens']:.0f}/{spec['draft_tokens']:.0f} draft tokens accepted "
                     f"({_f(spec['acceptance_rate'], '.1%')}), {_f(spec['accepted_per_draft'], '.2f')} per draft")
    return "; ".join(parts)
