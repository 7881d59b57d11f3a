"""Golden outputs: one JSON file per mode, the comparison rule, and the readable diff of a mismatch.

The rule, per mode and prompt (atol = the mode's tolerance on logprobs):
- tokens must be equal, except at a near tie: where the golden's best and second-best logprobs are
  within 2 * atol, numerics inside the tolerance may pick either, so a different token there is
  accepted and the rest of that prompt (a different prefix from then on) is not compared;
- every step up to the first differing token (inclusive: its prefix is still the same) must give
  the same best logprob within atol, and the first TOP_STEPS steps the same top-k logprobs within
  atol and the same top-k token ids (ids tied within 2 * atol with the k-th may swap).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from autoglm_trt.errors import UserError
from autoglm_trt.regress.cases import MAX_TOKENS, TOP_K, TOP_STEPS, Mode
from autoglm_trt.regress.run import CaseResult

FORMAT = "autoglm-trt-regress"
FORMAT_VERSION = 1
GOLDENS_DIR = Path(__file__).parent / "goldens"
UPDATE_COMMAND = "make regress-update   (or: .venv/bin/python -m autoglm_trt.regress --update)"
_DIGITS = 6  # logprobs are ~ -12: fp32 keeps ~6 decimals


# ---- files -----------------------------------------------------------------------------------------
def golden_path(goldens: Path, mode: Mode) -> Path:
    return goldens / f"{mode.name}.json"


def generation_settings() -> dict:
    return {"max_tokens": MAX_TOKENS, "top_k": TOP_K, "top_steps": TOP_STEPS, "greedy": True, "ignore_eos": True}


def case_to_json(case: CaseResult, description: str) -> dict:
    return {"description": description, "token_ids": case.token_ids, "text": case.text,
            "logprobs": [round(v, _DIGITS) for v in case.logprobs],
            "margins": [round(v, _DIGITS) for v in case.margins],
            "top": [[[i, round(v, _DIGITS)] for i, v in step] for step in case.top]}


def case_from_json(raw: dict) -> CaseResult:
    return CaseResult(token_ids=list(raw["token_ids"]), text=raw["text"], logprobs=list(raw["logprobs"]),
                      margins=list(raw["margins"]), top=[[(int(i), float(v)) for i, v in step] for step in raw["top"]])


def write_golden(path: Path, mode: Mode, cases: dict[str, CaseResult], descriptions: dict[str, str],
                 checkpoint: dict, written_by: dict) -> None:
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION,
           "mode": {"name": mode.name, "quant": mode.quant, "tp": mode.tp, "atol": mode.atol},
           "checkpoint": checkpoint, "generation": generation_settings(), "written_by": written_by,
           "cases": {name: case_to_json(case, descriptions[name]) for name, case in cases.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")


def read_golden(path: Path) -> dict:
    """The golden document (cases as CaseResult); UserError when missing or written for other settings."""
    if not path.is_file():
        raise UserError(f"no golden file {path}: write it with `{UPDATE_COMMAND}`")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}): rewrite it with `{UPDATE_COMMAND}`") from None
    if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} is not a version-{FORMAT_VERSION} {FORMAT} file: rewrite it with `{UPDATE_COMMAND}`")
    if doc.get("generation") != generation_settings():
        raise UserError(f"{path} was written with generation settings {doc.get('generation')}, the job now uses "
                        f"{generation_settings()}: rewrite it with `{UPDATE_COMMAND}`")
    doc["cases"] = {name: case_from_json(raw) for name, raw in doc["cases"].items()}
    return doc


# ---- the comparison --------------------------------------------------------------------------------
@dataclass
class CaseCheck:
    """One prompt of one mode, compared with its golden."""

    mode: str
    prompt: str
    atol: float
    expected: CaseResult
    got: CaseResult
    position: int | None  # first differing token (None: all equal)
    near_tie: bool  # the golden's top-2 margin at `position` is <= 2 * atol: accepted, not compared further
    max_diff: float  # max |logprob - golden| over the comparable steps
    diff_step: int  # where max_diff occurs
    top_ids_step: int | None  # first step whose clearly ranked top-k token ids differ (None: none)

    @property
    def ok(self) -> bool:
        return (self.position is None or self.near_tie) and self.max_diff <= self.atol and self.top_ids_step is None

    @property
    def steps_checked(self) -> int:
        return len(self.expected.token_ids) if self.position is None else self.position + 1


def first_difference(a: list[int], b: list[int]) -> int | None:
    for j, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return j
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_case(mode: str, prompt: str, atol: float, expected: CaseResult, got: CaseResult) -> CaseCheck:
    pos = first_difference(expected.token_ids, got.token_ids)
    shared = min(len(expected.logprobs), len(got.logprobs))
    last = shared if pos is None else min(pos + 1, shared)  # steps whose prefix is the same
    diffs = [(abs(expected.logprobs[j] - got.logprobs[j]), j) for j in range(last)]
    top_ids_step = None
    for j in range(min(last, len(expected.top), len(got.top))):
        e_vals, g_vals = sorted((v for _, v in expected.top[j]), reverse=True), sorted((v for _, v in got.top[j]),
                                                                                        reverse=True)
        diffs += [(abs(x - y), j) for x, y in zip(e_vals, g_vals)]
        if top_ids_step is None and not _same_top_ids(expected.top[j], got.top[j], atol):
            top_ids_step = j
    max_diff, diff_step = max(diffs, default=(0.0, 0))
    near_tie = pos is not None and pos < len(expected.margins) and pos < len(got.token_ids) \
        and expected.margins[pos] <= 2 * atol
    return CaseCheck(mode, prompt, atol, expected, got, pos, near_tie, max_diff, diff_step, top_ids_step)


def _same_top_ids(expected: list[tuple[int, float]], got: list[tuple[int, float]], atol: float) -> bool:
    """Golden top-k ids ranked clearly above the k-th must be in the run's top-k (ties at the edge may swap)."""
    if len(got) < len(expected):
        return False
    kth = min(v for _, v in expected)
    got_ids = {i for i, _ in got}
    return all(i in got_ids for i, v in expected if v > kth + 2 * atol)


# ---- the readable diff -----------------------------------------------------------------------------
def describe_token(token_id: int, decode: Callable[[int], str] | None) -> str:
    text = decode(token_id) if decode else ""
    return f"{token_id} {text!r}" if text else f"{token_id} (no text)"


def format_check(check: CaseCheck, description: str = "", decode: Callable[[int], str] | None = None) -> str:
    """A failed (or accepted) check as lines a person can read in a CI log."""
    e, g = check.expected, check.got
    head = f"{'OK' if check.ok else 'MISMATCH'}  mode {check.mode} (tolerance {check.atol:g}), prompt " \
           f"{check.prompt!r}" + (f" ({description})" if description else "")
    lines = [head]
    if check.position is not None:
        p = check.position
        exp = describe_token(e.token_ids[p], decode) if p < len(e.token_ids) else "(no token: the golden ends)"
        got = describe_token(g.token_ids[p], decode) if p < len(g.token_ids) else "(no token: the run ends)"
        margin = f"{e.margins[p]:.2e}" if p < len(e.margins) else "-"
        verdict = "<= 2 x tolerance: a near tie, accepted" if check.near_tie else "> 2 x tolerance: not a near tie"
        lines += [(f"  first differing token at position {p} of {len(e.token_ids)} "
                   f"(golden top-2 margin there {margin}, {verdict})"),
                  f"    expected {exp}", f"    got      {got}",
                  f"  expected ids {e.token_ids}", f"  got ids      {g.token_ids}",
                  f"  expected text {e.text!r}", f"  got text      {g.text!r}"]
    else:
        lines.append(f"  tokens equal ({len(e.token_ids)})")
    flag = "exceeds" if check.max_diff > check.atol else "within"
    lines.append(f"  max |logprob - golden| {check.max_diff:.2e} at step {check.diff_step} ({flag} tolerance "
                 f"{check.atol:g}; steps compared: {check.steps_checked})")
    if check.top_ids_step is not None:
        j = check.top_ids_step
        lines.append(f"  top-{len(e.top[j])} token ids differ at step {j}: expected {[i for i, _ in e.top[j]]}, "
                     f"got {[i for i, _ in g.top[j]]}")
    return "\n".join(lines)
