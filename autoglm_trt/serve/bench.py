"""`autoglm-trt bench`: an async load generator over the OpenAI streaming chat API.

For each concurrency level, `concurrency` clients send streaming requests back to back (bounded by
a request count and a time limit) and we report TTFT and inter-token latency p50/p99, requests/s
and output tokens/s. Prompts are made of common words, calibrated against the server's own token
counts (usage.prompt_tokens) to reach --prompt-len; each prompt is unique so the prefix cache does
not flatter TTFT.

Latencies are timed on chunks that carry text, as clients see them. With --logprobs every chunk
carries its tokens' logprobs, so every token is timed even when it decodes to no text (random-weight
checkpoints, whose tokens mostly do): use it there, or TTFT/ITL measure the text, not the engine.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import random
import ssl
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from autoglm_trt.errors import UserError
from autoglm_trt.serve.bench_metrics import HISTOGRAMS, phase_means_ms, scrape
from autoglm_trt.utils.limits import raise_open_files_limit
from autoglm_trt.utils.logging import log

PROGRESS_EVERY_S = 10.0

WORDS = ("time person year way day thing man world life hand part child eye woman place work week "
         "case point government company number group problem fact water room mother area money "
         "story month lot right study book word business issue side kind head house service friend "
         "father power hour game line end member law car city name president team minute idea body "
         "information back parent face others level office door health art war history party result "
         "change morning reason research girl guy moment air teacher force education phone screen "
         "button settings message photo music video app window page").split()


@dataclass
class RequestResult:
    ok: bool
    latency: float = 0.0  # seconds, send to last byte
    ttft: float | None = None  # seconds to the first generated text
    itls: list[float] = field(default_factory=list)  # gaps between text chunks after the first
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None


@dataclass
class LevelSummary:
    concurrency: int
    requests: int
    failed: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    tpot_mean_ms: float  # (latency - ttft) / (output tokens - 1), averaged over requests
    mean_prompt_tokens: float
    mean_output_tokens: float
    first_error: str | None = None
    server_ms: dict[str, float] | None = None  # the server's own mean ms per phase (bench_metrics), if it says


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method); NaN for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(concurrency: int, results: list[RequestResult], duration_s: float) -> LevelSummary:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itls = [gap for r in ok for gap in r.itls]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok
             if r.ttft is not None and r.output_tokens > 1]
    out_tokens = sum(r.output_tokens for r in ok)
    dur = max(duration_s, 1e-9)

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    return LevelSummary(
        concurrency=concurrency, requests=len(results), failed=len(results) - len(ok), duration_s=duration_s,
        requests_per_s=len(ok) / dur, output_tokens_per_s=out_tokens / dur,
        ttft_p50_ms=1e3 * percentile(ttfts, 50), ttft_p99_ms=1e3 * percentile(ttfts, 99),
        itl_p50_ms=1e3 * percentile(itls, 50), itl_p99_ms=1e3 * percentile(itls, 99),
        tpot_mean_ms=1e3 * mean(tpots), mean_prompt_tokens=mean([r.prompt_tokens for r in ok]),
        mean_output_tokens=mean([r.output_tokens for r in ok]),
        first_error=next((r.error for r in results if r.error), None))


def make_prompt(num_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return f"Request {seed}: " + " ".join(rng.choice(WORDS) for _ in range(num_words))


def parse_sse_line(line: str) -> dict | None:
    """The JSON of one `data: {...}` line; None for blank lines, comments and [DONE]."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    return json.loads(data)


@dataclass
class BenchTarget:
    base_url: str  # http://host:port (no /v1)
    model: str
    api_key: str | None
    gen_len: int
    image_url: str | None  # data: URL of --image
    logprobs: bool = False  # ask for logprobs: every token then arrives visibly, even one with no text
    timeout_s: float = 600.0
    image_variants: list[str] = field(default_factory=list)  # --unique-images: one data: URL per request
    used: int = 0  # variants handed out so far

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def payload(self, prompt: str, max_tokens: int, stream: bool = True) -> dict:
        content: Any = prompt
        url = self.image_url
        if self.image_variants:
            url, self.used = self.image_variants[self.used % len(self.image_variants)], self.used + 1
        if url:
            content = [{"type": "image_url", "image_url": {"url": url}},
                       {"type": "text", "text": prompt}]
        body = {"model": self.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if self.logprobs:
            body["logprobs"] = True
        return body


async def one_request(client: httpx.AsyncClient, target: BenchTarget, prompt: str) -> RequestResult:
    res = RequestResult(ok=False)
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", f"{target.base_url}/v1/chat/completions", headers=target.headers,
                                 json=target.payload(prompt, target.gen_len)) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                res.error = f"HTTP {resp.status_code}: {body[:200]}"
                return res
            async for line in resp.aiter_lines():
                chunk = parse_sse_line(line)
                if chunk is None:
                    continue
                if "error" in chunk:
                    res.error = str(chunk["error"].get("message"))
                    return res
                now = time.perf_counter()
                if _has_text(chunk):
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itls.append(now - last)
                    last = now
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.output_tokens = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        return res
    res.latency = time.perf_counter() - t0
    res.ok = True
    return res


def _has_text(chunk: dict) -> bool:
    """True when the chunk carries generated tokens (text, reasoning, or token logprobs)."""
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
            return True
        if (choice.get("logprobs") or {}).get("content"):
            return True
    return False


@functools.cache
def _tls() -> ssl.SSLContext:
    return ssl.create_default_context()  # NOTE: once: httpx would load the CA bundle for every client


def new_client(connections: int = 1) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0), verify=_tls(),
                             limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))


async def run_level(target: BenchTarget, concurrency: int, num_requests: int, max_seconds: float, num_words: int,
                    seed0: int) -> LevelSummary:
    """`concurrency` workers send requests back to back until num_requests or max_seconds.

    NOTE: each worker has a client (one connection) of its own: one pool of 512 connections spent the load
    generator's CPU in httpcore's per-event scan of its connections and capped a 512-client run at ~5,900 tok/s
    against a stub server that could give 24,000 (benchmarks/bench_http_stub.py)."""
    results: list[RequestResult] = []
    counter = iter(range(num_requests))
    t0 = time.perf_counter()
    deadline = t0 + max_seconds

    async def worker() -> None:
        async with new_client() as client:
            for i in counter:
                if time.perf_counter() >= deadline:
                    return
                results.append(await one_request(client, target, make_prompt(num_words, seed0 + i)))

    ticker = asyncio.ensure_future(_report_progress(concurrency, num_requests, results, t0))
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        ticker.cancel()
    summary = summarize(concurrency, results, time.perf_counter() - t0)
    log(f"concurrency {concurrency}: {summary.requests} requests ({summary.failed} failed) in "
        f"{summary.duration_s:.1f} s, {summary.output_tokens_per_s:.1f} output tok/s")
    return summary


async def _report_progress(concurrency: int, total: int, results: list[RequestResult], t0: float) -> None:
    """A line every PROGRESS_EVERY_S while a level runs (a CPU run of the defaults takes minutes)."""
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        failed = sum(not r.ok for r in results)
        log(f"concurrency {concurrency}: {len(results)}/{total} requests done ({failed} failed), "
            f"{time.perf_counter() - t0:.0f} s")


async def calibrate(client: httpx.AsyncClient, target: BenchTarget, prompt_len: int) -> int:
    """Words per prompt so that usage.prompt_tokens ~= prompt_len (two probes, linear fit)."""
    counts = []
    for words in (32, 128):
        resp = await client.post(f"{target.base_url}/v1/chat/completions", headers=target.headers,
                                 json=target.payload(make_prompt(words, -words), 1, stream=False))
        if resp.status_code != 200:
            raise UserError(f"calibration request failed: HTTP {resp.status_code} {resp.text[:300]}")
        counts.append(resp.json()["usage"]["prompt_tokens"])
    slope = (counts[1] - counts[0]) / 96
    return max(1, round((prompt_len - counts[0]) / max(slope, 1e-6)) + 32)


def image_data_url(path: Path) -> str:
    data = path.read_bytes()
    mime = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(path.suffix.lower(), "png")
    return f"data:image/{mime};base64,{base64.b64encode(data).decode()}"


def image_variants(path: Path, count: int) -> list[str]:
    """`count` copies of the image as PNG data: URLs, each with its own top-left pixels, so that no
    request hits the server's image or prefix caches (cold TTFT for every screenshot)."""
    from PIL import Image

    base = Image.open(path).convert("RGB")
    urls = []
    for i in range(count):
        img = base.copy()
        for x in range(4):
            img.putpixel((x, 0), ((i >> (8 * x)) & 255, (i * 7 + x) & 255, 255 - x))
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=1)
        urls.append(f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}")
    return urls


def normalize_url(url: str) -> str:
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    return url[:-3] if url.endswith("/v1") else url


async def resolve_model(client: httpx.AsyncClient, base_url: str, headers: dict) -> str:
    try:
        resp = await client.get(f"{base_url}/v1/models", headers=headers)
    except httpx.HTTPError as exc:
        raise UserError(f"cannot reach {base_url}: {exc}") from None
    if resp.status_code != 200:
        raise UserError(f"{base_url}/v1/models answered HTTP {resp.status_code}: {resp.text[:200]}")
    return resp.json()["data"][0]["id"]


async def bench(url: str, concurrencies: list[int], prompt_len: int, gen_len: int,
                image: Path | None = None, num_requests: int | None = None, max_seconds: float = 120.0,
                model: str | None = None, api_key: str | None = None, seed: int = 0,
                logprobs: bool = False, unique_images: bool = False) -> dict:
    """Run every level; the JSON-able report (levels in the order given)."""
    base = normalize_url(url)
    async with new_client(4) as client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        model = model or await resolve_model(client, base, headers)
        target = BenchTarget(base, model, api_key, gen_len, image_data_url(image) if image else None, logprobs)
        sizes = [num_requests if num_requests is not None else max(4 * c, 16) for c in concurrencies]
        if image is not None and unique_images:  # two calibration requests, then every level's
            target.image_variants = image_variants(image, 2 + sum(sizes))
        log(f"bench {base}: model {model}; sizing prompts to ~{prompt_len} tokens")
        words = await calibrate(client, target, prompt_len)
        levels, why_not = [], None
        for k, c in enumerate(concurrencies):
            log(f"level {k + 1}/{len(concurrencies)}: concurrency {c}, {sizes[k]} requests of {gen_len} tokens "
                f"(at most {max_seconds:.0f} s)")
            before, why_not = await scrape(client, base, headers)
            level = await run_level(target, c, sizes[k], max_seconds, words, seed + 1_000_000 * (k + 1))
            if before is not None:
                after, why_not = await scrape(client, base, headers)
                level.server_ms = phase_means_ms(before, after)
            levels.append(level)
    return {"url": base, "model": model, "prompt_len": prompt_len, "gen_len": gen_len,
            "image": str(image) if image else None, "words_per_prompt": words,
            "levels": [asdict(level) for level in levels], "server_side_unavailable": why_not}


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (f"{report['model']} @ {report['url']}: prompt ~{report['prompt_len']} tokens, "
             f"{report['gen_len']} generated" + (f", image {report['image']}" if report["image"] else ""))
    table = Table(title=title)
    for col in ("concurrency", "requests", "failed", "req/s", "output tok/s", "TTFT p50 ms", "TTFT p99 ms",
                "ITL p50 ms", "ITL p99 ms", "prompt tok", "output tok"):
        table.add_column(col, justify="right")
    for lv in report["levels"]:
        table.add_row(str(lv["concurrency"]), str(lv["requests"]), str(lv["failed"]),
                      f"{lv['requests_per_s']:.2f}", f"{lv['output_tokens_per_s']:.1f}",
                      f"{lv['ttft_p50_ms']:.1f}", f"{lv['ttft_p99_ms']:.1f}", f"{lv['itl_p50_ms']:.2f}",
                      f"{lv['itl_p99_ms']:.2f}", f"{lv['mean_prompt_tokens']:.0f}", f"{lv['mean_output_tokens']:.0f}")
    console = Console()
    if not console.is_terminal:  # NOTE: logs and CI get the whole table, not 80 wrapped columns
        console = Console(width=180)
    console.print(table)
    _print_server_side(console, report["levels"], report.get("server_side_unavailable"))
    for lv in report["levels"]:
        if lv["first_error"]:
            console.print(f"[red]concurrency {lv['concurrency']}: {lv['failed']} failed; first error: "
                          f"{lv['first_error']}[/red]")


def _print_server_side(console: Any, levels: list[dict], why_not: str | None) -> None:
    """The server's mean ms per phase, where its /metrics says (a client's TTFT = network + these)."""
    rows = [lv for lv in levels if lv.get("server_ms")]
    if not rows:
        if why_not:
            console.print(f"[dim]no server-side breakdown ({why_not})[/dim]")
        return
    from rich.table import Table

    table = Table(title="server side (its /metrics), mean ms per request")
    for col in ("concurrency", *(p.upper() if p == "ttft" else p for p in HISTOGRAMS)):
        table.add_column(col, justify="right")
    for lv in rows:
        ms = lv["server_ms"]
        table.add_row(str(lv["concurrency"]), *(f"{ms[p]:.1f}" if p in ms else "-" for p in HISTOGRAMS))
    console.print(table)


def run_bench(url: str, concurrencies: list[int], prompt_len: int, gen_len: int, image: Path | None = None,
              json_out: Path | None = None, **kwargs: Any) -> dict:
    if not concurrencies or any(c < 1 for c in concurrencies):
        raise UserError(f"--concurrency must be positive integers, got {concurrencies}")
    if image is not None and not image.is_file():
        raise UserError(f"--image {image} is not a file")
    raise_open_files_limit()
    report = asyncio.run(bench(url, concurrencies, prompt_len, gen_len, image, **kwargs))
    print_report(report)
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2, allow_nan=True))
    return report
