"""The serving layer's own ceiling: the real `autoglm-trt serve` (run_server) over a stub engine core.

The engine is the real LLMEngine of a tiny checkpoint (its tokenizer, chat template and processor run for every
request), but its step() is a stub: it sleeps `--window-ms` (a GPU window: the GIL is free, as in a CUDA wait)
and then hands every running request `--tokens-per-window` tokens, up to `--max-num-seqs` at once. Server and
load generator (`autoglm-trt bench`) run in processes of their own. Output tok/s far above the target means the HTTP
layer is not what limits a GPU run; near the stub's own rate it is. No GPU needed.

    python benchmarks/bench_http_stub.py --concurrency 128,512 [--window-ms 168] [--tokens-per-window 8]
        [--launch-ops 2000]

--launch-ops N makes every stub step first run N tiny torch calls, each releasing the GIL as a kernel launch
does, and prints how long they took: what the serving threads' GIL use costs an eager step's launches.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from autoglm_trt.engine.outputs import EngineStats, RequestOutput
from autoglm_trt.serve.config import ServerConfig


class StubCore:
    """Stands in for the engine's scheduler and GPU: fixed-length windows, every running request advances."""

    def __init__(self, max_num_seqs: int, window_s: float, per_window: int, launch_ops: int = 0) -> None:
        self.max_num_seqs, self.window_s, self.per_window = max_num_seqs, window_s, per_window
        self.launch_ops = launch_ops  # tiny torch ops per step, each releasing the GIL like a kernel launch
        self.launch_ms: list[float] = []
        self.running: dict[str, list] = {}  # request id -> [prompt tokens, max tokens, produced, admitted at]
        self.waiting: list[tuple[str, list[int]]] = []

    def add_request(self, request_id, prompt, params) -> None:
        self.waiting.append((request_id, [len(prompt.prompt_token_ids), params.max_tokens, 0]))

    def abort_request(self, request_id: str) -> None:
        self.running.pop(request_id, None)
        self.waiting = [w for w in self.waiting if w[0] != request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self.running or self.waiting)

    def get_stats(self) -> EngineStats:
        return EngineStats(len(self.running), len(self.waiting), 0.0, 1000, 1000, 0, 0)

    def step(self) -> list[RequestOutput]:
        while self.waiting and len(self.running) < self.max_num_seqs:
            rid, row = self.waiting.pop(0)
            self.running[rid] = row + [time.monotonic()]
        self._launch()
        time.sleep(self.window_s)
        outs = []
        for rid, row in list(self.running.items()):
            n = min(self.per_window, row[1] - row[2])
            row[2] += n
            done = row[2] >= row[1]
            outs.append(RequestOutput(rid, [42] * n, " hi" * n, done, "length" if done else None, row[0], row[2], 0,
                                      first_scheduled_time=row[3]))
            if done:
                del self.running[rid]
        return outs


    def _launch(self) -> None:
        """Stand-in for an eager step's kernel launches: launch_ops torch calls, timed (printed every 20 steps)."""
        if not self.launch_ops:
            return
        import torch

        a = torch.ones(4)
        t0 = time.perf_counter()
        for _ in range(self.launch_ops):
            torch.add(a, a, out=a)
        self.launch_ms.append(1e3 * (time.perf_counter() - t0))
        if len(self.launch_ms) % 20 == 0:
            last = self.launch_ms[-20:]
            print(f"stub launches: {self.launch_ops} ops took {sum(last) / 20:.1f} ms a step (mean of 20), "
                  f"{len(self.running)} running", file=sys.stderr, flush=True)


def stub_engine(model_dir: str, core: StubCore):
    from autoglm_trt.config import EngineArgs
    from autoglm_trt.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineArgs(model_dir, dtype="float32", device="cpu", max_num_seqs=core.max_num_seqs,
                                  max_model_len=4096).create_engine_config())
    for name in ("add_request", "abort_request", "has_unfinished_requests", "get_stats", "step"):
        setattr(engine, name, getattr(core, name))
    return engine


def serve_stub(model_dir: str, core: StubCore, port: int) -> None:
    """The real `autoglm-trt serve` (run_server) in this process, its engine loader swapped for the stub."""
    from autoglm_trt.config import EngineArgs
    from autoglm_trt.serve import server
    from autoglm_trt.serve.loader import LoadReport

    server.load_engine = lambda args: LoadReport(stub_engine(args.model_dir, core), 0.0, "stub", "stub", 0)
    server.run_server(ServerConfig(host="127.0.0.1", port=port, grpc_port=-1), EngineArgs(model_dir))


def run(model_dir: str, core: StubCore, port: int, bench_args: list[str]) -> int:
    """Server in a child process until /health is 200, then `autoglm-trt bench` in another; SIGTERM at the end."""
    child = multiprocessing.get_context("spawn").Process(target=serve_stub, args=(model_dir, core, port))
    child.start()
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if not child.is_alive():
                return 1
            time.sleep(0.2)
        return subprocess.call([sys.executable, "-m", "autoglm_trt.cli", "bench", f"http://127.0.0.1:{port}",
                                *bench_args])
    finally:
        child.terminate()
        child.join(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None, help="a tiny checkpoint (default: one written to a temp dir)")
    ap.add_argument("--concurrency", default="128,512")
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--window-ms", type=float, default=168.0, help="one GPU window (H100, 512 seqs x 8 steps)")
    ap.add_argument("--tokens-per-window", type=int, default=8)
    ap.add_argument("--launch-ops", type=int, default=0,
                    help="GIL-releasing torch calls per step (an eager step's kernel launches), timed")
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--num-requests", type=int, default=None)
    ap.add_argument("--logprobs", action="store_true")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model_dir = args.model_dir
    if model_dir is None:
        from autoglm_trt.models.random_checkpoint import init_random

        model_dir = str(Path(tempfile.mkdtemp()) / "tiny")
        init_random(model_dir, preset="tiny", seed=0, show_progress=False)
    core = StubCore(args.max_num_seqs, args.window_ms / 1e3, args.tokens_per_window, args.launch_ops)
    out = args.json or str(Path(tempfile.mkdtemp()) / "stub.json")
    bench_args = ["--concurrency", args.concurrency, "--prompt-len", "467", "--gen-len", str(args.gen_len),
                  "--max-seconds", "60", "--json", out]
    bench_args += ["--num-requests", str(args.num_requests)] if args.num_requests else []
    bench_args += ["--logprobs"] if args.logprobs else []
    rc = run(model_dir, core, args.port, bench_args)
    ceiling = args.max_num_seqs * args.tokens_per_window / (args.window_ms / 1e3)
    print(f"stub engine's own rate at {args.max_num_seqs} running: {ceiling:,.0f} tok/s; report: {out}")
    if rc == 0:
        report = json.loads(Path(out).read_text())
        report["stub"] = {"window_ms": args.window_ms, "tokens_per_window": args.tokens_per_window,
                          "max_num_seqs": args.max_num_seqs, "rate_tok_s": ceiling}
        Path(out).write_text(json.dumps(report, indent=2))
    sys.exit(rc)


if __name__ == "__main__":
    main()
