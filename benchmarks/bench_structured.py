"""Grammar backends for structured outputs, side by side on a vocabulary of the real size (CPU only).

For xgrammar and llguidance (each in a process of its own, so memory figures do not mix): the import, the one-time
tokenizer set-up, the compile time of a typical JSON schema (a tool's arguments: enums, bounded integers, a
nested array of objects, free strings), of json_object, a regex, a choice and (llguidance only) the phone
agent's action grammar (a whole `<think>...</think><answer>...</answer>` reply, 3,000-token budget), the
first mask after compiling, the CPU time to fill one row's
token bitmask at every position of a valid output (mean / p50 / p99 / max over the tokens), the same for 32
rows filled together by the library's thread pool, and the resident memory each step added.

    python benchmarks/bench_structured.py [--backends llguidance,xgrammar] [--tokenizer tokenizer.json]
        [--cache-dir /tmp/autoglm-trt-bench] [--json OUT.json]

Without --tokenizer, a byte-level BPE of 151,329 regular tokens is trained once and cached
(benchmarks/structured_vocab.py; a few minutes). xgrammar is not a project dependency: `pip install xgrammar`
to include it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoglm_trt.processing.structured.compiler import actions_grammar  # noqa: E402
from autoglm_trt.processing.tokenizer_files import EOS_TOKEN_IDS, VOCAB_SIZE  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "action": {"type": "string", "enum": ["Tap", "Swipe", "Type", "Launch", "Back", "Home", "Wait"]},
        "element": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
                    "minItems": 2, "maxItems": 2},
        "text": {"type": "string", "maxLength": 200},
        "app": {"type": "string"},
        "reason": {"type": "string"},
        "confidence": {"type": "number"},
        "steps": {"type": "array", "items": {
            "type": "object", "properties": {"name": {"type": "string"}, "done": {"type": "boolean"}},
            "required": ["name", "done"], "additionalProperties": False}},
    },
    "required": ["action", "reason"],
    "additionalProperties": False,
}
DOCUMENT = {
    "action": "Tap", "element": [512, 87], "text": "搜索附近的咖啡店 and open the first result",
    "app": "美团", "reason": "The search box is at the top of the screen; tapping it opens the keyboard.",
    "confidence": 0.92, "steps": [{"name": "open app", "done": True}, {"name": "搜索", "done": False}],
}
REGEX = r"(Tap|Swipe) at \[[0-9]{1,3}, ?[0-9]{1,3}\]( because [a-z ]{1,40})?"
REGEX_TEXT = "Swipe at [512, 87] because the list continues below"
CHOICES = ["positive", "negative", "neutral", "不确定"]
# the phone agent's reply under `serve --constrain-actions` (llguidance only: the grammar uses its & and ~)
REPLY = ("<think>用户要在微信里给张三发消息。当前在桌面，微信不在前台，先启动微信，再找到张三的对话。</think>\n"
         '<answer>do(action="Launch", app="微信")</answer>')
KINDS = ("json", "json_object", "regex", "choice", "actions")
BATCH = 32


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def token_bytes(tokenizer) -> tuple[list[bytes], list[int]]:
    """Each id's bytes (b"" for the ids no token uses) and the added (special) ids."""
    from autoglm_trt.processing.structured.vocab import token_byte_table

    return token_byte_table(tokenizer, VOCAB_SIZE)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1e3


def summary(ms: list[float]) -> dict:
    ordered = sorted(ms)
    return {"mean_us": 1e3 * statistics.fmean(ms), "p50_us": 1e3 * ordered[len(ms) // 2],
            "p99_us": 1e3 * ordered[min(len(ms) - 1, int(len(ms) * 0.99))], "max_us": 1e3 * ordered[-1],
            "tokens": len(ms)}


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer) -> None:
        import llguidance as llg

        from autoglm_trt.processing.structured.vocab import ll_tokenizer

        self.llg = llg
        self.tok = ll_tokenizer(tokenizer, VOCAB_SIZE, EOS_TOKEN_IDS)
        self.executor = llg.LLExecutor()

    def compile(self, kind: str, spec):
        m = self.llg.LLMatcher
        grammar = {"json": lambda: m.grammar_from_json_schema(spec),
                   "json_object": lambda: m.grammar_from_json_schema({"type": "object"}),
                   "regex": lambda: m.grammar_from_regex(spec),
                   "choice": lambda: m.grammar_from_lark(
                       "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in spec)),
                   "actions": lambda: m.grammar_from_lark(actions_grammar("reply", spec))}[kind]()
        matcher = self.llg.LLMatcher(self.tok, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def matcher(self, compiled):
        return compiled.deep_copy()

    def bitmask(self, rows: int):
        import torch

        return torch.full((rows, (VOCAB_SIZE + 31) // 32), -1, dtype=torch.int32)

    def fill(self, matcher, bitmask, row: int) -> None:
        # NOTE: not llguidance.torch: importing it runs a torch.compile decorator (~5 s, ~400 MB)
        matcher.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), bitmask.shape[1] * 4)

    def fill_batch(self, matchers, bitmask) -> None:
        self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                              bitmask.shape[1] * 4, bitmask.shape[0])

    def accept(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        tokens, _ = token_bytes(tokenizer)
        info = xgr.TokenizerInfo(tokens, xgr.VocabType.RAW, vocab_size=VOCAB_SIZE, stop_token_ids=EOS_TOKEN_IDS)
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher()

    def compile(self, kind: str, spec):
        if kind == "actions":
            raise NotImplementedError
        c = self.compiler
        return {"json": lambda: c.compile_json_schema(json.dumps(spec)),
                "json_object": lambda: c.compile_builtin_json_grammar(),
                "regex": lambda: c.compile_regex(spec),
                "choice": lambda: c.compile_grammar(
                    "root ::= " + " | ".join(json.dumps(x, ensure_ascii=False) for x in spec))}[kind]()

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def bitmask(self, rows: int):
        return self.xgr.allocate_token_bitmask(rows, VOCAB_SIZE)

    def fill(self, matcher, bitmask, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def fill_batch(self, matchers, bitmask) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)


def walk(backend, compiled, ids: list[int]) -> list[float]:
    """Fill the mask at every position of `ids` (timed), check the token is allowed, accept it."""
    matcher, bitmask = backend.matcher(compiled), backend.bitmask(1)
    times = []
    for tok in ids:
        _, ms = timed(lambda: backend.fill(matcher, bitmask, 0))
        times.append(ms)
        assert (int(bitmask[0, tok // 32]) >> (tok % 32)) & 1, f"{backend.name}: token {tok} masked"
        assert backend.accept(matcher, tok), f"{backend.name}: token {tok} refused"
    return times


def walk_batch(backend, compiled, ids: list[int]) -> list[float]:
    """BATCH rows on the same output, filled together at each position; per-step time."""
    matchers, bitmask = [backend.matcher(compiled) for _ in range(BATCH)], backend.bitmask(BATCH)
    times = []
    for tok in ids:
        _, ms = timed(lambda: backend.fill_batch(matchers, bitmask))
        times.append(ms)
        for m in matchers:
            backend.accept(m, tok)
    return times


def run_child(name: str, tokenizer_path: str) -> dict:
    from tokenizers import Tokenizer

    import torch  # noqa: F401  (both backends' bitmasks are torch tensors: not counted below)

    tokenizer = Tokenizer.from_file(tokenizer_path)
    rss0 = rss_mb()
    _, import_ms = timed(lambda: __import__(name))
    rss1 = rss_mb()
    backend, setup_ms = timed(lambda: {"llguidance": LLGuidance, "xgrammar": XGrammar}[name](tokenizer))
    out: dict = {"backend": name, "import_ms": import_ms, "import_rss_mb": rss1 - rss0,
                 "tokenizer_setup_ms": setup_ms, "tokenizer_setup_rss_mb": rss_mb() - rss1}
    doc = json.dumps(DOCUMENT, ensure_ascii=False)
    cases = {"json": (SCHEMA, doc), "json_object": (None, doc), "regex": (REGEX, REGEX_TEXT),
             "choice": (CHOICES, CHOICES[3]), "actions": (3000, REPLY)}
    for kind, (spec, text) in cases.items():
        if kind == "actions" and name != "llguidance":
            continue
        rss_before = rss_mb()
        compiled, compile_ms = timed(lambda: backend.compile(kind, spec))
        ids = tokenizer.encode(text, add_special_tokens=False).ids + [EOS_TOKEN_IDS[0]]
        first = walk(backend, compiled, ids)  # a new request's latency: its compile + its first mask
        again, second_ms = timed(lambda: backend.compile(kind, spec))  # the same schema again
        first_again = walk(backend, again, ids)[0]
        single = summary(walk(backend, compiled, ids))
        batch = summary(walk_batch(backend, compiled, ids))
        out[kind] = {"compile_ms": compile_ms, "first_mask_ms": first[0], "compile_again_ms": second_ms,
                     "first_mask_again_ms": first_again, "mask": single, f"mask_batch{BATCH}": batch,
                     "rss_added_mb": rss_mb() - rss_before}
    out["rss_total_mb"] = rss_mb()
    return out


def print_table(results: list[dict]) -> None:
    print(f"{'backend':<11} {'case':<12} {'compile ms':>10} {'1st mask':>9} {'again ms':>9} {'mask mean us':>12} "
          f"{'p50':>7} {'p99':>8} {'max':>8} {f'x{BATCH} mean us':>13} {'+RSS MB':>8}")
    for r in results:
        for what in ("import", "tokenizer_setup"):
            print(f"{r['backend']:<11} {what:<12} {r[what + '_ms']:>10.0f} {'':>9} {'':>9} {'':>12} {'':>7} "
                  f"{'':>8} {'':>8} {'':>13} {r[what + '_rss_mb']:>8.1f}")
        for kind in [k for k in KINDS if k in r]:
            c, m, b = r[kind], r[kind]["mask"], r[kind][f"mask_batch{BATCH}"]
            print(f"{'':<11} {kind:<12} {c['compile_ms']:>10.1f} {c['first_mask_ms']:>9.2f} "
                  f"{c['compile_again_ms'] + c['first_mask_again_ms']:>9.1f} {m['mean_us']:>12.1f} {m['p50_us']:>7.1f} "
                  f"{m['p99_us']:>8.1f} {m['max_us']:>8.1f} {b['mean_us']:>13.1f} {c['rss_added_mb']:>8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="llguidance,xgrammar")
    ap.add_argument("--tokenizer", help="a tokenizer.json (default: the trained 151,552-id BPE)")
    ap.add_argument("--cache-dir", default="/tmp/autoglm-trt-bench")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.tokenizer)))
        return
    if not args.tokenizer:
        from structured_vocab import load_or_train

        args.tokenizer = str(load_or_train(Path(args.cache_dir)))
    results = []
    for name in args.backends.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--tokenizer", args.tokenizer],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr.strip()[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
