"""The server's side of a benchmark level: its /metrics scraped before and after, as mean ms per phase.

A client's TTFT is network + preprocess (template, tokenizer, image decoding) + the server's TTFT, which is
queue (waiting for a slot) + prefill (vision tower and prompt, until the first token). These add up for the
requests the bench sends (one prompt, n = 1); serve/metrics.py says what each phase holds. Our server exports
all of them; a vLLM server exports the same histograms under `vllm:` (no preprocess).
"""

from __future__ import annotations

import re

import httpx

# phase -> histogram names, ours first, then vLLM's (the order is the bench table's columns)
HISTOGRAMS = {
    "ttft": ("autoglm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds"),
    "preprocess": ("autoglm:request_preprocess_time_seconds",),
    "queue": ("autoglm:request_queue_time_seconds", "vllm:request_queue_time_seconds"),
    "prefill": ("autoglm:request_prefill_time_seconds", "vllm:request_prefill_time_seconds"),
}

Totals = dict[str, tuple[float, float]]  # histogram name -> (sum, count) over all its label sets


# one sample line: name, optional {labels} (quoted values may hold spaces or braces), value, optional timestamp
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?\s+(\S+)(?:\s+-?\d+)?\s*$')


def parse_totals(text: str) -> Totals:
    """`name_sum` and `name_count` samples of a Prometheus text page, summed over label sets; histograms
    without both are left out."""
    wanted = {name for names in HISTOGRAMS.values() for name in names}
    parts: dict[str, dict[str, float]] = {"_sum": {}, "_count": {}}  # suffix -> histogram name -> total
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        metric, value = m.group(1), m.group(2)
        suffix = next((sfx for sfx in parts if metric.endswith(sfx)), None)
        name = metric[: -len(suffix)] if suffix else None
        if name not in wanted:
            continue
        try:
            parts[suffix][name] = parts[suffix].get(name, 0.0) + float(value)
        except ValueError:
            continue
    sums, counts = parts["_sum"], parts["_count"]
    return {name: (sums[name], counts[name]) for name in sums.keys() & counts.keys()}


def parse_counters(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """The counters `names` of a Prometheus text page (a `_total` suffix allowed), summed over label sets;
    counters the page lacks are left out."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name = m.group(1).removesuffix("_total")
        if name in names:
            try:
                out[name] = out.get(name, 0.0) + float(m.group(2))
            except ValueError:
                continue
    return out


async def scrape_text(client: httpx.AsyncClient, base_url: str, headers: dict) -> tuple[str | None, str | None]:
    """(the server's /metrics page, None), or (None, why not)."""
    try:
        resp = await client.get(f"{base_url}/metrics", headers=headers, timeout=10.0)
    except httpx.HTTPError as exc:
        return None, f"{base_url}/metrics: {type(exc).__name__}: {exc}"
    if resp.status_code != 200:
        return None, f"{base_url}/metrics answered HTTP {resp.status_code}"
    return resp.text, None


def totals_of(text: str | None, base_url: str) -> tuple[Totals | None, str | None]:
    totals = parse_totals(text) if text is not None else None
    return (totals, None) if totals else (None, f"{base_url}/metrics has no latency histograms we know")


async def scrape(client: httpx.AsyncClient, base_url: str, headers: dict) -> tuple[Totals | None, str | None]:
    """(the server's histogram totals, None), or (None, why not) when its /metrics can't be read."""
    text, why = await scrape_text(client, base_url, headers)
    return (None, why) if text is None else totals_of(text, base_url)


def phase_means_ms(before: Totals | None, after: Totals | None) -> dict[str, float] | None:
    """Mean ms per phase over the requests that reached it between the two scrapes."""
    if before is None or after is None:
        return None
    means = {}
    for phase, names in HISTOGRAMS.items():
        name = next((n for n in names if n in after), None)
        if name is None:
            continue
        s0, c0 = before.get(name, (0.0, 0.0))
        s1, c1 = after[name]
        if c1 > c0:
            means[phase] = 1e3 * (s1 - s0) / (c1 - c0)
    return means or None
