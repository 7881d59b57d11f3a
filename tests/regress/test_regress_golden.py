"""The engine regression's comparison rule and its diff, on hand-made results; then the real job against an
altered golden (a subprocess, as `make regress` runs it)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from autoglm_trt.errors import UserError
from autoglm_trt.regress.cases import MAX_TOKENS, MODES, TOP_STEPS
from autoglm_trt.regress.golden import (GOLDENS_DIR, compare_case, format_check, golden_path, read_golden,
                                        write_golden)
from autoglm_trt.regress.job import compare_mode
from autoglm_trt.regress.run import CaseResult, ModeResult

REPO = Path(__file__).resolve().parents[2]
FP32 = MODES[0]
ATOL = FP32.atol


def _case(seed: int = 0) -> CaseResult:
    ids = [100 + seed + 7 * j for j in range(MAX_TOKENS)]
    lps = [-11.9 + 0.01 * j for j in range(MAX_TOKENS)]
    top = [[(ids[j], lps[j])] + [(5000 + 10 * j + r, lps[j] - 0.01 * (r + 1)) for r in range(4)]
           for j in range(TOP_STEPS)]
    return CaseResult(ids, "x" * MAX_TOKENS, lps, [0.01] * MAX_TOKENS, top)


def _decode(i: int) -> str:
    return f"<t{i}>"


def test_identical_run_passes():
    check = compare_case("fp32", "chat-text", ATOL, _case(), _case())
    assert check.ok and check.position is None and check.max_diff == 0.0 and check.steps_checked == MAX_TOKENS


def test_changed_token_is_reported_with_position_ids_text_and_diff():
    got = _case()
    got.token_ids[5:] = [999] * (MAX_TOKENS - 5)
    got.logprobs[5] -= 0.02  # the step where it went wrong scores differently too
    check = compare_case("w8a8", "chat-image", ATOL, _case(), got)
    assert not check.ok and check.position == 5 and not check.near_tie
    assert check.max_diff == pytest.approx(0.02) and check.diff_step == 5
    text = format_check(check, "chat with a screenshot", _decode)
    for part in ("MISMATCH  mode w8a8 (tolerance 0.0001), prompt 'chat-image' (chat with a screenshot)",
                 "first differing token at position 5 of 16", "not a near tie",
                 "expected 135 '<t135>'", "got      999 '<t999>'", "max |logprob - golden| 2.00e-02 at step 5",
                 "exceeds tolerance 0.0001"):
        assert part in text, (part, text)


def test_logprob_drift_beyond_tolerance_fails_with_equal_tokens():
    got = _case()
    got.logprobs[2] += 5 * ATOL
    check = compare_case("fp32", "raw-text", ATOL, _case(), got)
    assert not check.ok and check.position is None and check.diff_step == 2
    assert "tokens equal (16)" in format_check(check) and "exceeds tolerance" in format_check(check)
    got.logprobs[2] = _case().logprobs[2] + 0.5 * ATOL  # inside the tolerance
    assert compare_case("fp32", "raw-text", ATOL, _case(), got).ok


@pytest.mark.parametrize("margin, accepted", [(0.5 * ATOL, True), (2 * ATOL, True), (3 * ATOL, False)])
def test_different_token_at_a_near_tie_is_accepted_only_within_twice_the_tolerance(margin, accepted):
    expected = _case()
    expected.margins[7] = margin
    got = _case()
    got.token_ids[7:] = [4242] * (MAX_TOKENS - 7)
    got.logprobs[8:] = [-20.0] * (MAX_TOKENS - 8)  # another prefix after the tie: not compared
    check = compare_case("int8-wo", "chat-text", ATOL, expected, got)
    assert check.ok is accepted and check.near_tie is accepted and check.position == 7
    assert check.steps_checked == 8 and check.max_diff == 0.0


def test_top_k_ids_differ_unless_tied_at_the_edge():
    got = _case()
    got.top[1] = [got.top[1][0], (77, got.top[1][1][1])] + got.top[1][2:]  # the second-best id is another
    check = compare_case("fp32", "chat-text", ATOL, _case(), got)
    assert not check.ok and check.top_ids_step == 1 and "top-5 token ids differ at step 1" in format_check(check)
    edge = _case()
    edge.top[1] = edge.top[1][:4] + [(77, edge.top[1][4][1])]  # the k-th swapped with an exact tie: fine
    assert compare_case("fp32", "chat-text", ATOL, _case(), edge).ok


def test_shorter_run_is_a_mismatch():
    got = _case()
    got.token_ids, got.logprobs, got.margins = got.token_ids[:10], got.logprobs[:10], got.margins[:10]
    check = compare_case("tp2", "chat-text", ATOL, _case(), got)
    assert not check.ok and check.position == 10
    assert "(no token: the run ends)" in format_check(check)


def test_golden_file_round_trip_and_refusals(tmp_path):
    path = golden_path(tmp_path, FP32)
    cases = {"chat-text": _case(), "raw-text": _case(3)}
    write_golden(path, FP32, cases, {"chat-text": "a", "raw-text": "b"}, {"sha256": "abc"}, {"torch": "x"})
    doc = read_golden(path)
    assert set(doc["cases"]) == set(cases) and doc["mode"]["atol"] == ATOL
    for name, case in cases.items():  # logprobs are kept to 6 decimals
        check = compare_case("fp32", name, ATOL, case, doc["cases"][name])
        assert check.ok and check.position is None and check.max_diff <= 5e-7
    raw = json.loads(path.read_text())
    raw["generation"]["max_tokens"] = 8
    path.write_text(json.dumps(raw))
    with pytest.raises(UserError, match="generation settings .*make regress-update"):
        read_golden(path)
    with pytest.raises(UserError, match="no golden file .*make regress-update"):
        read_golden(tmp_path / "missing.json")


def test_compare_mode_names_a_prompt_without_golden():
    golden = {"checkpoint": {"sha256": "abc"}, "cases": {"chat-text": _case()}}
    report = compare_mode(ModeResult(FP32, {"chat-text": _case(), "new-prompt": _case()}), golden)
    assert not report.ok and len(report.checks) == 1 and report.checks[0].ok
    assert report.problems == ["no golden for prompt 'new-prompt' (a new prompt?)"]
    assert compare_mode(ModeResult(FP32, {"chat-text": replace(_case())}), golden).ok


def test_committed_goldens_cover_every_mode_and_prompt():
    from autoglm_trt.regress.cases import PROMPTS

    for mode in MODES:
        doc = read_golden(golden_path(GOLDENS_DIR, mode))
        assert doc["mode"]["atol"] == mode.atol and set(doc["cases"]) == {p.name for p in PROMPTS}
        assert all(len(c.token_ids) == MAX_TOKENS and len(c.top) == TOP_STEPS for c in doc["cases"].values())


@pytest.mark.slow
def test_job_reports_an_altered_golden(tmp_path):
    """The real fp32 run against a golden whose chat-image token 3 was changed: exit 1, a readable diff."""
    raw = json.loads(golden_path(GOLDENS_DIR, FP32).read_text())
    altered = copy.deepcopy(raw)
    case = altered["cases"]["chat-image"]
    original = case["token_ids"][3]
    case["token_ids"][3] = original + 1
    goldens = tmp_path / "goldens"
    goldens.mkdir()
    golden_path(goldens, FP32).write_text(json.dumps(altered))
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "autoglm_trt.regress", "--modes", "fp32", "--goldens", str(goldens)],
                          cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    out = proc.stdout
    assert "MISMATCH  mode fp32 (tolerance 0.0001), prompt 'chat-image'" in out, out
    assert "first differing token at position 3 of 16" in out
    assert f"expected {original + 1} " in out and f"got      {original} " in out
    assert "'chat-text'" not in out and "'raw-text'" not in out  # the untouched prompts still match
    assert "make regress-update" in out and "1 of 1 modes differ" in out
