"""The agent workload on one GPU in one command (issue 20): the full-size random checkpoint, then for each quant
mode and speculation setting `autoglm-trt serve`, `autoglm-trt bench --workload agent` at 1 and 8 sessions of 6
steps (200 tokens forced out of each step), the server stopped; one JSON and a summary table.

    python benchmarks/agent_gpu.py                  # writes $OUT/agent_gpu.json, $OUT/serve.log, $OUT/bench.log

Time on an H100, estimated from docs/benchmarks.md: init-random 27 s; each server start ~30-40 s (weights 5 s,
CUDA graphs for batch 1-16 ~8 s, the whole-prompt attention plans 1.5 s, imports and warm-up); the bench ~35-45 s
(warm-up step; 1 session x 6 steps at 1.2-1.7 s a step; 8 sessions x 6 steps at ~3-4 s a step; 54 screenshots
drawn). So ~75 s per configuration and ~5.5 minutes for the four: nothing is cut by plan. --budget-s (default
540) skips a configuration that would not finish in time, and says so in the JSON and the table; the order
(fp8 off, fp8 ngram, bf16 off, bf16 ngram) keeps the pairs that compare speculation together.
For a dry run on the CPU: --model DIR_OF_A_TINY_CHECKPOINT --device cpu --sessions 1,2 --steps 2 --gen 8
--screen-size 112x252.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "autoglm_trt.cli"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "agent_gpu_out"), help="output folder (default $OUT)")
    p.add_argument("--model", default="/tmp/phone-9b", help="checkpoint; written by init-random when missing")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quants", default="fp8,bf16", help="bf16 (no --quantization) and/or fp8")
    p.add_argument("--spec", default="off,ngram", help="--speculative settings: off, ngram, suffix")
    p.add_argument("--sessions", default="1,8")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--gen", type=int, default=200)
    p.add_argument("--screen-size", default="1080x2400")
    p.add_argument("--lang", default="en")
    p.add_argument("--budget-s", type=float, default=540.0, help="skip what would not end within this time")
    p.add_argument("--old-tree", default=None, help="also serve each quant mode from this copy of an earlier commit's "
                   "autoglm_trt/ (speculation off: before and after side by side; the bench client is this tree's)")
    p.add_argument("--serve-args", default="--max-num-seqs 16 --max-model-len 25480 --max-pixels 5000000",
                   help="more `serve` options (Open-AutoGLM's max-model-len and max_pixels; 16 sequences "
                        "keep the CUDA-graph capture short)")
    return p.parse_args()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "no nvidia-smi"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def ensure_checkpoint(args: argparse.Namespace) -> float | None:
    """Seconds init-random took (None: the checkpoint was there)."""
    if (Path(args.model) / "config.json").exists():
        return None
    t0 = time.monotonic()
    subprocess.run([*CLI, "init-random", args.model, "--preset", "phone-9b", "--device", args.device], check=True)
    return time.monotonic() - t0


class Server:
    """`autoglm-trt serve` as a subprocess, its output appended to serve.log; ready when /health says 200."""

    def __init__(self, args: argparse.Namespace, quant: str, spec: str, log_path: Path, tree: str | None = None) -> None:
        self.port = free_port()
        cmd = [*CLI, "serve", args.model, "--device", args.device, "--host", "127.0.0.1", "--port", str(self.port),
               "--grpc-port", "-1", *args.serve_args.split()] + (["--speculative", spec] if tree is None else [])
        if quant != "bf16":
            cmd += ["--quantization", quant]
        self.log = open(log_path, "a")
        self.log.write(f"\n===== {tree or 'this tree'}: {quant} speculative {spec}: {' '.join(cmd)}\n")
        self.log.flush()
        self.t0 = time.monotonic()
        cwd = Path(tree).resolve() if tree else REPO  # NOTE: the old tree's package, found first from its own root
        env = dict(os.environ, PYTHONPATH=f"{cwd}:{os.environ.get('PYTHONPATH', '')}")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=cwd, env=env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float) -> float:
        while time.monotonic() - self.t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode} (see serve.log)")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - self.t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"serve was not ready in {timeout:.0f} s (see serve.log)")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def run_config(args: argparse.Namespace, out: Path, quant: str, spec: str, time_left: float,
               tree: str | None = None) -> dict:
    """One server and its bench; the entry of the combined JSON."""
    entry: dict = {"quant": quant, "speculative": spec, "tree": tree or "this"}
    t0 = time.monotonic()
    server = Server(args, quant, spec, out / "serve.log", tree)
    try:
        entry["serve_ready_s"] = round(server.wait_ready(min(300.0, time_left)), 1)
        report_path = out / f".agent_{quant}_{spec}_{'old' if tree else 'new'}.json"
        cmd = [*CLI, "bench", server.url, "--workload", "agent", "--sessions", args.sessions, "--steps",
               str(args.steps), "--gen", str(args.gen), "--ignore-eos", "--screen-size", args.screen_size, "--lang",
               args.lang, "--json", str(report_path)]
        with open(out / "bench.log", "a") as log:
            log.write(f"\n===== {quant} speculative {spec}: {' '.join(cmd)}\n")
            log.flush()
            left = time_left - (time.monotonic() - t0) - 20  # NOTE: room to stop the server
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, timeout=max(left, 10)).returncode
        entry["bench_rc"] = rc
        if report_path.exists():
            entry["report"] = json.loads(report_path.read_text())
            report_path.unlink()
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        entry["error"] = str(exc)
    finally:
        server.stop()
    entry["wall_s"] = round(time.monotonic() - t0, 1)
    return entry


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    result = {"gpu": gpu_name(), "date": datetime.date.today().isoformat(), "commit": git_commit(),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "model": args.model}
    result["init_random_s"] = ensure_checkpoint(args)
    result["configs"], estimate = [], 120.0  # NOTE: the first configuration's guess; later ones use the last measured
    plan = [(q, s, None) for q in args.quants.split(",") for s in args.spec.split(",")]
    if args.old_tree:  # NOTE: each mode's old run right after its new ones
        plan = [p for q in args.quants.split(",") for p in [x for x in plan if x[0] == q] + [(q, "off", args.old_tree)]]
    for quant, spec, tree in plan:
        left = args.budget_s - (time.monotonic() - start)
        if left < estimate:
            result["configs"].append({"quant": quant, "speculative": spec, "tree": tree or "this",
                                      "skipped": f"{left:.0f} s left of --budget-s, ~{estimate:.0f} s needed"})
            continue
        print(f"[{time.monotonic() - start:5.0f} s] {tree or 'this tree'}: {quant}, speculative {spec}", flush=True)
        entry = run_config(args, out, quant, spec, left, tree)
        estimate = max(estimate if "report" not in entry else 0.0, entry["wall_s"] + 5)
        result["configs"].append(entry)
        (out / "agent_gpu.json").write_text(json.dumps(result, indent=1))  # NOTE: what ran, even if cut later
    result["total_s"] = round(time.monotonic() - start, 1)
    (out / "agent_gpu.json").write_text(json.dumps(result, indent=1))
    print_summary(result)


def _f(value, fmt: str = ".0f") -> str:
    return "-" if value is None else format(value, fmt)


def print_summary(result: dict) -> None:
    print(f"\n{result['gpu']}, {result['date']}, commit {result['commit']}: {result['command']} "
          f"(init-random {_f(result['init_random_s'], '.0f')} s, total {result['total_s']:.0f} s)")
    head = ("config", "sess", "steps/s", "step p50", "step p99", "TTFT p50", "srv TTFT", "srv TTFT d0/dN",
            "prompt d0/dN", "cached dN", "acc/draft", "ready s")
    rows, missing = [head], []
    for c in result["configs"]:
        name = f"{'old ' if c.get('tree', 'this') != 'this' else ''}{c['quant']}+{c['speculative']}"
        if "report" not in c:
            missing.append(f"{name}: {c.get('skipped') or c.get('error') or 'bench rc ' + str(c.get('bench_rc'))}")
            continue
        for lv in c["report"]["levels"]:
            d0, dn = lv["depths"][0], lv["depths"][-1]
            srv = [(d.get("server_ms") or {}).get("ttft") for d in (d0, dn)]
            spec = lv.get("spec_decode")
            accepted = f"{spec['accepted_tokens']:.0f}/{spec['draft_tokens']:.0f}" if spec else "-"
            rows.append((name, str(lv["sessions"]), _f(lv["steps_per_s"], ".2f"), _f(lv["step_p50_ms"]),
                         _f(lv["step_p99_ms"]), _f(lv["ttft_p50_ms"]), _f((lv.get("server_ms") or {}).get("ttft")),
                         f"{_f(srv[0])}/{_f(srv[1])}", f"{_f(d0['prompt_tokens_mean'])}/{_f(dn['prompt_tokens_mean'])}",
                         _f(dn["cached_tokens_mean"]), accepted, _f(c["serve_ready_s"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        print("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths))))
    for line in missing:
        print(f"not measured: {line}")
    print("ms throughout; srv = the server's own TTFT from /metrics (level mean; d0/dN: first and last step depth, "
          "one session only); TTFT p50 = first text at the client (random weights: late or missing); acc/draft = "
          "draft tokens accepted / proposed in the level")


if __name__ == "__main__":
    main()
