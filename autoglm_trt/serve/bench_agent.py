"""`autoglm-trt bench URL --workload agent`: Open-AutoGLM-shaped phone-agent sessions against a server.

N sessions run at once, each S steps back to back. A step is one streamed chat request as the phone agent sends
it (agent_session.py: system prompt, text history, one new screenshot; temperature 0, top_p 0.85,
frequency_penalty 0.2, max_tokens 3000 or --gen). Per step depth we report prompt and cached tokens (the usage
chunk's prompt_tokens_details.cached_tokens: the history the prefix cache held), TTFT and step time p50/p99,
and the time until the stream shows an action (`do(action=` or `finish(`), missing where none came; per level
steps/s, the server's own phase means from /metrics (bench_metrics.py; with one session also per step, where
the deltas of one request are exact) and its speculative-decoding counters.

The reply appended to the history is the streamed text. A reply with no action (random weights print little
text) is replaced by a synthetic one of a real agent's length, so the history grows as a real session's; the
report counts them.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field

import httpx

from autoglm_trt.errors import UserError
from autoglm_trt.serve.agent_session import (ACTION_MARKERS, SCREEN_SIZE, new_session, render_screenshots,
                                             synthetic_reply)
from autoglm_trt.serve.bench import new_client, normalize_url, parse_sse_line, percentile, resolve_model
from autoglm_trt.serve.bench_metrics import parse_counters, phase_means_ms, scrape, scrape_text, totals_of
from autoglm_trt.utils.logging import log

SAMPLING = {"temperature": 0.0, "top_p": 0.85, "frequency_penalty": 0.2}  # Open-AutoGLM's client
AGENT_MAX_TOKENS = 3000
SPEC_COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens")
WARMUP_SEED = 999_983  # the warm-up step's screenshot (no level's seed comes near it)


@dataclass
class AgentOptions:
    sessions: list[int]  # concurrent sessions per level
    steps: int  # steps per session
    max_tokens: int = AGENT_MAX_TOKENS
    ignore_eos: bool = False  # generate max_tokens even past the end (random weights)
    screen_size: tuple[int, int] = SCREEN_SIZE
    lang: str = "en"
    logprobs: bool = False  # every token arrives in a chunk (TTFT of random weights), engine fast paths off
    model: str | None = None
    api_key: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.sessions or any(n < 1 for n in self.sessions):
            raise UserError(f"--sessions must be positive integers, got {self.sessions}")
        if self.steps < 1:
            raise UserError(f"--steps must be at least 1, got {self.steps}")
        if self.max_tokens < 1:
            raise UserError(f"--gen must be at least 1, got {self.max_tokens}")


@dataclass
class AgentTarget:
    base_url: str
    model: str
    opts: AgentOptions

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.opts.api_key}"} if self.opts.api_key else {}

    def payload(self, messages: list[dict], max_tokens: int | None = None) -> dict:
        body = {"model": self.model, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": max_tokens or self.opts.max_tokens, **SAMPLING}
        if self.opts.ignore_eos:
            body["ignore_eos"] = True  # NOTE: vLLM's extra field, as the openai client's extra_body sends it
        if self.opts.logprobs:
            body["logprobs"] = True
        return body


@dataclass
class StepRecord:
    session: int
    depth: int  # the step's index in its session (0: the task's first turn)
    ok: bool = False
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, taken from the prefix cache
    output_tokens: int = 0
    ttft_ms: float | None = None  # to the first chunk with text (or token logprobs); None: none came
    action_ms: float | None = None  # to the first `do(action=` / `finish(` in the stream; None: none came
    step_ms: float | None = None  # send to the last byte
    synthetic_reply: bool = False  # the history got a synthetic reply: the model's text had no action
    reply_chars: int = 0  # characters of the reply appended to the history
    server_ms: dict[str, float] | None = None  # this request's server phases (one session only: exact deltas)
    error: str | None = None


@dataclass
class DepthStats:
    depth: int
    steps: int
    failed: int
    prompt_tokens_mean: float | None
    cached_tokens_mean: float | None
    output_tokens_mean: float | None
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    ttft_missing: int  # ok steps whose stream showed no text
    step_p50_ms: float | None
    step_p99_ms: float | None
    action_p50_ms: float | None
    action_p99_ms: float | None
    action_missing: int  # ok steps whose stream showed no action (random weights: all of them)
    server_ms: dict[str, float] | None = None  # mean of the steps' own server phases (one session only)


@dataclass
class AgentLevel:
    sessions: int
    steps_per_session: int
    steps: int  # steps run (a failed step ends its session)
    failed: int
    duration_s: float
    steps_per_s: float  # ok steps over the level's wall time
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    step_p50_ms: float | None
    step_p99_ms: float | None
    synthetic_replies: int
    depths: list[DepthStats]
    server_ms: dict[str, float] | None = None  # the server's mean ms per phase over the level (its /metrics)
    spec_decode: dict[str, float | None] | None = None  # the level's speculative-decoding counters, if any
    first_error: str | None = None
    records: list[StepRecord] = field(default_factory=list)


def _sessions(n: int) -> str:
    return f"{n} session{'s' if n != 1 else ''}"


def _pct(values: list[float], q: float) -> float | None:
    return percentile(values, q) if values else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _chunk_text(chunk: dict) -> tuple[str, str, bool]:
    """(reasoning text, content text, whether the chunk carries generated tokens)."""
    reasoning, content, tokens = "", "", False
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        reasoning += delta.get("reasoning_content") or delta.get("reasoning") or ""
        content += delta.get("content") or ""
        tokens = tokens or bool((choice.get("logprobs") or {}).get("content"))
    return reasoning, content, tokens or bool(reasoning or content)


async def one_step(client: httpx.AsyncClient, target: AgentTarget, messages: list[dict],
                   rec: StepRecord) -> str:
    """Stream one step into `rec`; the reply's text as the client keeps it (the reasoning in <think> tags)."""
    reasoning, content, seen = [], [], ""
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", f"{target.base_url}/v1/chat/completions", headers=target.headers,
                                 json=target.payload(messages)) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
                return ""
            async for line in resp.aiter_lines():
                chunk = parse_sse_line(line)
                if chunk is None:
                    continue
                if "error" in chunk:
                    rec.error = str((chunk["error"] or {}).get("message"))
                    return ""
                now_ms = 1e3 * (time.perf_counter() - t0)
                r, c, timed = _chunk_text(chunk)
                if timed and rec.ttft_ms is None:
                    rec.ttft_ms = now_ms
                if r or c:
                    reasoning.append(r)
                    content.append(c)
                    seen = seen[-16:] + r + c  # NOTE: a marker may straddle two chunks
                    if rec.action_ms is None and any(m in seen for m in ACTION_MARKERS):
                        rec.action_ms = now_ms
                if chunk.get("usage"):
                    _read_usage(rec, chunk["usage"])
    except (httpx.HTTPError, ValueError) as exc:  # NOTE: json.JSONDecodeError is a ValueError
        rec.error = f"{type(exc).__name__}: {exc}"
        return ""
    rec.step_ms = 1e3 * (time.perf_counter() - t0)
    rec.ok = True
    think = "".join(reasoning)
    return (f"<think>{think}</think>" if think else "") + "".join(content)


def _read_usage(rec: StepRecord, usage: dict) -> None:
    rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    rec.output_tokens = int(usage.get("completion_tokens") or 0)
    rec.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def depth_stats(records: list[StepRecord], steps: int) -> list[DepthStats]:
    out = []
    for d in range(steps):
        at = [r for r in records if r.depth == d]
        ok = [r for r in at if r.ok]
        ttft = [r.ttft_ms for r in ok if r.ttft_ms is not None]
        action = [r.action_ms for r in ok if r.action_ms is not None]
        step = [r.step_ms for r in ok]
        servers = [r.server_ms for r in ok if r.server_ms]
        server = {p: _mean([s[p] for s in servers if p in s]) for p in servers[0]} if servers else None
        out.append(DepthStats(
            depth=d, steps=len(at), failed=len(at) - len(ok),
            prompt_tokens_mean=_mean([r.prompt_tokens for r in ok]),
            cached_tokens_mean=_mean([r.cached_tokens for r in ok]),
            output_tokens_mean=_mean([r.output_tokens for r in ok]),
            ttft_p50_ms=_pct(ttft, 50), ttft_p99_ms=_pct(ttft, 99), ttft_missing=len(ok) - len(ttft),
            step_p50_ms=_pct(step, 50), step_p99_ms=_pct(step, 99),
            action_p50_ms=_pct(action, 50), action_p99_ms=_pct(action, 99), action_missing=len(ok) - len(action),
            server_ms=server))
    return out


def summarize_level(sessions: int, steps: int, records: list[StepRecord], duration_s: float) -> AgentLevel:
    ok = [r for r in records if r.ok]
    ttft = [r.ttft_ms for r in ok if r.ttft_ms is not None]
    step = [r.step_ms for r in ok]
    return AgentLevel(
        sessions=sessions, steps_per_session=steps, steps=len(records), failed=len(records) - len(ok),
        duration_s=duration_s, steps_per_s=len(ok) / max(duration_s, 1e-9), ttft_p50_ms=_pct(ttft, 50),
        ttft_p99_ms=_pct(ttft, 99), step_p50_ms=_pct(step, 50), step_p99_ms=_pct(step, 99),
        synthetic_replies=sum(r.synthetic_reply for r in ok), depths=depth_stats(records, steps),
        first_error=next((r.error for r in records if r.error), None),
        records=sorted(records, key=lambda r: (r.session, r.depth)))


def spec_delta(before: str | None, after: str | None) -> dict[str, float | None] | None:
    """The level's speculative-decoding counters (vLLM's names) and acceptance, where /metrics has them."""
    if before is None or after is None:
        return None
    c0, c1 = parse_counters(before, SPEC_COUNTERS), parse_counters(after, SPEC_COUNTERS)
    if not c1:
        return None
    drafts, tokens, accepted = (c1.get(n, 0.0) - c0.get(n, 0.0) for n in SPEC_COUNTERS)
    return {"drafts": drafts, "draft_tokens": tokens, "accepted_tokens": accepted,
            "acceptance_rate": accepted / tokens if tokens else None,
            "accepted_per_draft": accepted / drafts if drafts else None}


# ---- running a level ---------------------------------------------------------------------------------------
class _Level:
    """One level's sessions at once; `metrics` is a client of its own for /metrics (never a session's)."""

    def __init__(self, target: AgentTarget, metrics: httpx.AsyncClient, number: int, sessions: int,
                 urls: list[str], per_step_server: bool) -> None:
        self.target, self.metrics, self.number, self.sessions = target, metrics, number, sessions
        self.urls, self.per_step_server = urls, per_step_server
        self.records: list[StepRecord] = []
        self.total = sessions * target.opts.steps

    async def run(self) -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(self._session(i) for i in range(self.sessions)))
        return time.perf_counter() - t0

    async def _session(self, index: int) -> None:
        opts, steps = self.target.opts, self.target.opts.steps
        session = new_session(index, opts.lang, seed=1000 * opts.seed + self.number)
        async with new_client() as client:
            for depth in range(steps):
                session.add_user_turn(self.urls[index * steps + depth])
                rec = StepRecord(session=index, depth=depth)
                before = await self._server() if self.per_step_server else None
                reply = await one_step(client, self.target, session.messages, rec)
                if self.per_step_server:
                    rec.server_ms = phase_means_ms(before, await self._server())
                session.strip_images()
                if rec.ok and not any(m in reply for m in ACTION_MARKERS):
                    reply, rec.synthetic_reply = synthetic_reply(session.rng, opts.lang), True
                rec.reply_chars = len(reply)
                session.add_reply(reply)
                self.records.append(rec)
                self._progress(rec)
                if not rec.ok:
                    return  # NOTE: the agent ends its task when the model call fails

    async def _server(self):
        return (await scrape(self.metrics, self.target.base_url, self.target.headers))[0]

    def _progress(self, rec: StepRecord) -> None:
        """A line per finished step (a 9B step takes a second or more; a CPU run of the tiny model, too)."""
        head = (f"{_sessions(self.sessions)}: [{len(self.records)}/{self.total}] session {rec.session + 1} "
                f"step {rec.depth + 1}")
        if not rec.ok:
            log(f"{head}: failed: {rec.error}")
            return
        ttft = f"{rec.ttft_ms:.0f} ms" if rec.ttft_ms is not None else "no text"
        action = f"{rec.action_ms:.0f} ms" if rec.action_ms is not None else "none"
        log(f"{head}: {rec.prompt_tokens} prompt tokens ({rec.cached_tokens} cached), {rec.output_tokens} out, "
            f"TTFT {ttft}, action {action}, step {rec.step_ms:.0f} ms"
            + (" (synthetic reply)" if rec.synthetic_reply else ""))


async def _warm_up(client: httpx.AsyncClient, target: AgentTarget) -> None:
    try:
        await _probe_and_step(client, target)
    except httpx.HTTPError as exc:
        raise UserError(f"the warm-up step failed: {type(exc).__name__}: {exc}") from None


async def _probe_and_step(client: httpx.AsyncClient, target: AgentTarget) -> None:
    """Open-AutoGLM's readiness probe, then one untimed screenshot step (first-call costs stay out of level 1)."""
    body = {"model": target.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
    resp = await client.post(f"{target.base_url}/v1/chat/completions", headers=target.headers, json=body)
    if resp.status_code != 200:
        raise UserError(f"the readiness probe failed: HTTP {resp.status_code} {resp.text[:300]}")
    opts = target.opts
    session = new_session(0, opts.lang, seed=-1)
    (url,) = await asyncio.to_thread(render_screenshots, [WARMUP_SEED], opts.screen_size)
    session.add_user_turn(url)
    async with client.stream("POST", f"{target.base_url}/v1/chat/completions", headers=target.headers,
                             json=target.payload(session.messages, max_tokens=min(opts.max_tokens, 8))) as resp:
        if resp.status_code != 200:
            raise UserError(f"the warm-up step failed: HTTP {resp.status_code} "
                            f"{(await resp.aread()).decode(errors='replace')[:300]}")
        async for _ in resp.aiter_lines():
            pass


async def bench_agent(url: str, opts: AgentOptions) -> dict:
    """Run every level (one warm-up step first); the JSON-able report."""
    base = normalize_url(url)
    async with new_client(4) as client:
        headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
        target = AgentTarget(base, opts.model or await resolve_model(client, base, headers), opts)
        w, h = opts.screen_size
        log(f"bench {base}: model {target.model}; agent sessions of {opts.steps} steps, {w}x{h} screenshots, "
            f"max_tokens {opts.max_tokens}{', ignore_eos' if opts.ignore_eos else ''}; warm-up step")
        await _warm_up(client, target)
        levels, why_not = [], None
        for k, n in enumerate(opts.sessions, start=1):
            level, why = await _run_level(client, target, k, n)
            levels.append(level)
            why_not = why_not or why
    return _report(base, target.model, opts, levels, why_not)


async def _run_level(client: httpx.AsyncClient, target: AgentTarget, number: int,
                     sessions: int) -> tuple[AgentLevel, str | None]:
    """Level `number`: screenshots drawn first, /metrics read before and after; (its summary, why no server side)."""
    opts, base = target.opts, target.base_url
    seeds = [number * 100_000 + i for i in range(sessions * opts.steps)]
    log(f"level {number}/{len(opts.sessions)}: {_sessions(sessions)} x {opts.steps} steps; drawing {len(seeds)} "
        "screenshots")
    urls = await asyncio.to_thread(render_screenshots, seeds, opts.screen_size)
    before, why0 = await scrape_text(client, base, target.headers)
    t0, why_t0 = totals_of(before, base) if before is not None else (None, why0)
    level = _Level(target, client, number, sessions, urls, per_step_server=sessions == 1 and t0 is not None)
    duration = await level.run()
    after, why1 = await scrape_text(client, base, target.headers)
    t1, why_t1 = totals_of(after, base) if after is not None else (None, why1)
    summary = summarize_level(sessions, opts.steps, level.records, duration)
    summary.server_ms, summary.spec_decode = phase_means_ms(t0, t1), spec_delta(before, after)
    log(f"{_sessions(sessions)}: {summary.steps} steps ({summary.failed} failed) in {duration:.1f} s, "
        f"{summary.steps_per_s:.2f} steps/s")
    return summary, why_t0 or why_t1


def _report(base: str, model: str, opts: AgentOptions, levels: list[AgentLevel], why_not: str | None) -> dict:
    from autoglm_trt.serve.agent_prompts import system_prompt

    w, h = opts.screen_size
    return {"workload": "agent", "url": base, "model": model, "lang": opts.lang, "sessions": opts.sessions,
            "steps": opts.steps, "max_tokens": opts.max_tokens, "ignore_eos": opts.ignore_eos,
            "logprobs": opts.logprobs, "sampling": SAMPLING, "screen_size": f"{w}x{h}",
            "system_prompt_chars": len(system_prompt(opts.lang)),
            "ttft_basis": "first token (logprobs)" if opts.logprobs else "first text",
            "levels": [asdict(lv) for lv in levels], "notes": notes(levels, opts),
            "server_side_unavailable": why_not}


def notes(levels: list[AgentLevel], opts: AgentOptions) -> list[str]:
    """What a reader of the figures must know (synthetic replies, missing TTFT or actions)."""
    out = []
    ok = sum(lv.steps - lv.failed for lv in levels)
    synthetic = sum(lv.synthetic_replies for lv in levels)
    if synthetic:
        out.append(f"{synthetic} of {ok} replies had no action (random weights?): the history got a synthetic "
                   "reply of a real agent's length instead of the model's text")
    if any(d.ttft_missing for lv in levels for d in lv.depths) or (synthetic and not opts.logprobs):
        out.append("TTFT is timed at the first text; a random-weight model's first text comes late or never: read "
                   "the server's TTFT (per step with one session), or pass --logprobs (every token timed, but "
                   "the engine's multi-step windows and speculation are off for such requests)")
    if any(d.action_missing for lv in levels for d in lv.depths):
        out.append("action time: steps whose stream showed no do(action=/finish( are counted as missing, not 0")
    return out
