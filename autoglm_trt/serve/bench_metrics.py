"""The server's side of a benchmark level: its /metrics scraped before and after, as mean ms per phase.

A client's TTFT is network + preprocess (template, tokenizer, image decoding) + the server's TTFT, which is
queue (waiting for a slot) + prefill (vision tower and prompt, until the first token). Our server exports all three;
a vLLM server exports the same histograms under `vllm:` (no preprocess). Servers without /metrics give None.
"""

from __future__ import annotations

import httpx

# phase -> histogram names, ours first, then vLLM's
HISTOGRAMS = {
    "ttft": ("autoglm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds"),
    "preprocess": ("autoglm:request_preprocess_time_seconds",),
    "queue": ("autoglm:request_queue_time_seconds", "vllm:request_queue_time_seconds"),
    "prefill": ("autoglm:request_prefill_time_seconds", "vllm:request_prefill_time_seconds"),
}

Totals = dict[str, tuple[float, float]]  # histogram name -> (sum, count) over all its label sets


def parse_totals(text: str) -> Totals:
    """`name_sum` and `name_count` lines of a Prometheus text page, summed over labels."""
    wanted = {name for names in HISTOGRAMS.values() for name in names}
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, _, value = line.rpartition(" ")
        metric = key.split("{", 1)[0]
        for suffix, into in (("_sum", sums), ("_count", counts)):
            base = metric[: -len(suffix)]
            if metric.endswith(suffix) and base in wanted:
                try:
                    into[base] = into.get(base, 0.0) + float(value)
                except ValueError:
                    pass
    return {name: (sums.get(name, 0.0), counts[name]) for name in counts}


async def scrape(client: httpx.AsyncClient, base_url: str, headers: dict) -> Totals | None:
    try:
        resp = await client.get(f"{base_url}/metrics", headers=headers)
    except httpx.HTTPError:
        return None
    return parse_totals(resp.text) if resp.status_code == 200 else None


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
