"""Structured outputs on the CPU: compiling constraints, masks, accepting, rollback, the reasoning gate."""

from __future__ import annotations

import json

import pytest
import torch

from autoglm_trt.plugins.bitmask import unpack_bitmask
from autoglm_trt.processing.structured import (
    GrammarCompiler,
    StructuredOutputError,
    StructuredOutputs,
    allocate_bitmask,
    fill_bitmasks,
    tool_call_schema,
)
from autoglm_trt.processing.tokenizer import Tokenizer
from autoglm_trt.processing.tokenizer_files import VOCAB_SIZE

pytest.importorskip("llguidance")

SCHEMA = {"type": "object", "properties": {
    "action": {"type": "string", "enum": ["Tap", "Back"]},
    "point": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
              "minItems": 2, "maxItems": 2}},
    "required": ["action", "point"], "additionalProperties": False}
DOC = '{"action": "Tap", "point": [12, 999]}'


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, VOCAB_SIZE)


def allowed(state) -> torch.Tensor:
    mask = allocate_bitmask(1, VOCAB_SIZE)
    state.fill_bitmask(mask, 0)
    return unpack_bitmask(mask, VOCAB_SIZE)[0]


def walk(state, ids: list[int]) -> None:
    """Every token of `ids` must be allowed by the mask before it is accepted."""
    for tok in ids:
        assert allowed(state)[tok], f"token {tok} masked"
        assert state.accept_token(tok)


def run(compiler, tokenizer, so, text: str) -> bool:
    """Whether the grammar accepts `text` (tokenized) completely, followed by an eos."""
    state = compiler.new_state(so, [])
    ids = tokenizer.encode(text)
    ok = state.accept_tokens(ids) == len(ids) and state.accept_token(tokenizer.eos_token_ids[0])
    return ok and state.is_terminated()


def test_json_schema_walk_and_terminate(compiler, tokenizer) -> None:
    state = compiler.new_state(StructuredOutputs.json_schema(SCHEMA), [])
    walk(state, tokenizer.encode(DOC))
    assert state.is_accepting() and state.is_stopped() and not state.is_terminated()
    mask = allowed(state)
    assert set(mask.nonzero().flatten().tolist()) == set(tokenizer.eos_token_ids)  # only an eos may follow
    assert state.accept_token(tokenizer.eos_token_ids[0]) and state.is_terminated()
    state.rollback(1)
    assert not state.is_terminated()
    assert set(allowed(state).nonzero().flatten().tolist()) == set(tokenizer.eos_token_ids)


def test_json_schema_masks_and_refuses(compiler, tokenizer) -> None:
    so = StructuredOutputs.json_schema(SCHEMA)
    state = compiler.new_state(so, [])
    first = allowed(state)
    # NOTE: where the grammar forces bytes ('{"action": "'), llguidance allows their canonical tokens only
    assert first[tokenizer.encode(DOC)[0]] and not first[tokenizer.encode("x")[0]]
    assert not first[tokenizer.eos_token_ids[0]]  # nothing to end yet
    assert not state.accept_token(tokenizer.encode("x")[0]) and state.error
    for bad in ('{"action": "Fly", "point": [1, 2]}', '{"action": "Tap", "point": [1000, 2]}',
                '{"action": "Tap"}', '{"action": "Tap", "point": [1, 2], "x": 1}'):
        assert not run(compiler, tokenizer, so, bad), bad
    assert run(compiler, tokenizer, so, DOC)


@pytest.mark.parametrize("so, good, bad", [
    (StructuredOutputs.json_object(), '{"a": [1, {"b": null}]}', '[1, 2]'),
    (StructuredOutputs.regex(r"(yes|no) [0-9]{2}"), "no 42", "no 4"),
    (StructuredOutputs.choice(["positive", "négatif", 'say "hi"']), 'say "hi"', "positive!"),
    (StructuredOutputs.grammar('start: "go " DIR\nDIR: "left" | "right"'), "go left", "go up"),
    (StructuredOutputs.grammar('root ::= "go " dir\ndir ::= "left" | "right"'), "go right", "go"),  # GBNF
])
def test_other_kinds(compiler, tokenizer, so, good, bad) -> None:
    assert run(compiler, tokenizer, so, good)
    assert not run(compiler, tokenizer, so, bad)


@pytest.mark.parametrize("make, needle", [
    (lambda: StructuredOutputs.json_schema({"type": "nonsense"}), "nonsense"),
    (lambda: StructuredOutputs.json_schema('{"type": '), "not valid JSON"),
    (lambda: StructuredOutputs.json_schema([1, 2]), "must be an object"),
    (lambda: StructuredOutputs.regex("[a-"), "regex"),
    (lambda: StructuredOutputs.grammar("start: missing_rule"), "missing_rule"),
    (lambda: StructuredOutputs.choice([]), "non-empty"),
    (lambda: StructuredOutputs("yaml"), "kind must be one of"),
])
def test_invalid_constraints_name_the_problem(compiler, make, needle) -> None:
    with pytest.raises(StructuredOutputError, match=needle) as info:
        compiler.validate(make())
    assert len(str(info.value)) < 800


def test_compile_cache_and_independent_states(compiler, tokenizer) -> None:
    so = StructuredOutputs.json_schema(SCHEMA)
    assert compiler.compile(so, None) is compiler.compile(StructuredOutputs.json_schema(json.dumps(SCHEMA)), None)
    a, b = compiler.new_state(so, []), compiler.new_state(so, [])
    first = tokenizer.encode(DOC)[0]
    a.accept_tokens(tokenizer.encode('{"action": '))
    assert allowed(b)[first]  # b did not move
    assert not allowed(a)[first]


def test_rollback_restores_the_mask(compiler, tokenizer) -> None:
    state = compiler.new_state(StructuredOutputs.json_schema(SCHEMA), [])
    ids = tokenizer.encode(DOC)
    masks = []
    for tok in ids:
        masks.append(allowed(state))
        state.accept_token(tok)
    state.rollback(3)
    assert torch.equal(allowed(state), masks[len(ids) - 3])
    assert state.validate_tokens(ids[-3:] + [tokenizer.eos_token_ids[0]]) == 4
    assert state.validate_tokens(tokenizer.encode("x")) == 0
    walk(state, ids[-3:])
    with pytest.raises(ValueError):
        state.rollback(len(ids) + 1)


def test_reasoning_gate(compiler, tokenizer) -> None:
    so = StructuredOutputs.regex("ok", after_reasoning=True)
    think_end = tokenizer.token_to_id("</think>")
    state = compiler.new_state(so, tokenizer.encode("<|user|>hi<|assistant|>"))
    assert not state.constrained and bool(allowed(state).all())
    free = tokenizer.encode("<think>anything goes")
    assert state.accept_tokens(free) == len(free)
    assert state.accept_token(think_end) and state.constrained
    assert not allowed(state)[tokenizer.encode("x")[0]]
    walk(state, tokenizer.encode("ok"))
    state.rollback(len(tokenizer.encode("ok")))  # back to just after </think>: still constrained
    assert state.constrained and not allowed(state)[tokenizer.encode("x")[0]]
    walk(state, tokenizer.encode("ok"))
    state.rollback(len(tokenizer.encode("ok")) + 1)  # back across </think>: reasoning again
    assert not state.constrained and bool(allowed(state).all())
    ok = tokenizer.encode("ok")
    assert state.validate_tokens([think_end, *ok, tokenizer.eos_token_ids[0]]) == len(ok) + 2
    assert state.validate_tokens([think_end, *tokenizer.encode("no")]) == 1


def test_reasoning_state_of_the_prompt(compiler, tokenizer) -> None:
    enc = tokenizer.encode
    # an earlier turn's closed think block does not count: the scan stops at the last <|assistant|>
    assert compiler.prompt_reasoning(enc("<|assistant|><think>a</think>b<|user|>c<|assistant|>")) == "none"
    assert compiler.prompt_reasoning(enc("<|assistant|><think>")) == "open"
    assert compiler.prompt_reasoning(enc("<|assistant|><think></think>")) == "closed"
    state = compiler.new_state(StructuredOutputs.regex("ok", True), enc("<|assistant|><think></think>"))
    assert state.constrained
    ungated = compiler.new_state(StructuredOutputs.regex("ok"), enc("<|assistant|>"))
    assert ungated.constrained


def test_fill_bitmasks_matches_single_rows(compiler, tokenizer) -> None:
    states = [compiler.new_state(StructuredOutputs.json_schema(SCHEMA), []),
              compiler.new_state(StructuredOutputs.regex("ok", True), tokenizer.encode("<|assistant|>")),
              compiler.new_state(StructuredOutputs.choice(["a", "b"]), [])]
    states[0].accept_tokens(tokenizer.encode('{"action": "'))
    batch = allocate_bitmask(5, VOCAB_SIZE)
    batch.zero_()
    fill_bitmasks([(s, i + 1) for i, s in enumerate(states)], batch)
    for i, s in enumerate(states):
        assert torch.equal(unpack_bitmask(batch[i + 1:i + 2], VOCAB_SIZE)[0], allowed(s))
    assert not batch[0].any() and not batch[4].any()  # rows nobody asked for are untouched


def test_tool_call_schema() -> None:
    tools = [{"type": "function", "function": {"name": "tap", "parameters": SCHEMA}},
             {"type": "function", "function": {"name": "home"}}]
    assert tool_call_schema(tools, "tap") == SCHEMA
    required = tool_call_schema(tools, None)
    assert required["type"] == "array" and required["minItems"] == 1
    names = [c["properties"]["name"]["enum"] for c in required["items"]["anyOf"]]
    assert names == [["tap"], ["home"]]


def test_package_imports_no_torch_or_llguidance() -> None:
    import subprocess
    import sys

    code = ("import sys, autoglm_trt.processing.structured as s; "
            "print('torch' in sys.modules, 'llguidance' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_step_bitmasks_touch_only_constrained_rows(compiler, tokenizer) -> None:
    from autoglm_trt.plugins.bitmask import apply_token_bitmask_
    from autoglm_trt.processing.structured import StepBitmasks

    prompt = tokenizer.encode("<|assistant|>")
    json_row = compiler.new_state(StructuredOutputs.json_schema(SCHEMA), [])
    reasoning_row = compiler.new_state(StructuredOutputs.regex("ok", True), prompt)  # still thinking
    choice_row = compiler.new_state(StructuredOutputs.choice(["yes", "no"]), [])
    step = StepBitmasks(max_rows=8, vocab_size=VOCAB_SIZE)
    assert step.fill([(reasoning_row, 0)]) is None  # nothing constrained: the step skips masking
    logits = torch.randn(4, VOCAB_SIZE)
    before = logits.clone()
    bitmask, rows = step.fill([(json_row, 3), (reasoning_row, 0), (choice_row, 1)])
    assert rows.tolist() == [3, 1]
    apply_token_bitmask_(logits, bitmask, rows)
    assert torch.equal(logits[[0, 2]], before[[0, 2]])  # free rows untouched
    for row, state in ((3, json_row), (1, choice_row)):
        assert torch.equal(torch.isfinite(logits[row]), allowed(state))


def test_a_state_in_error_lets_the_row_end(compiler, tokenizer) -> None:
    state = compiler.new_state(StructuredOutputs.regex("ok"), [])
    assert not state.accept_token(tokenizer.encode("x")[0]) and state.error
    assert set(allowed(state).nonzero().flatten().tolist()) == set(tokenizer.eos_token_ids)
    batch = allocate_bitmask(2, VOCAB_SIZE)
    fill_bitmasks([(state, 1), (compiler.new_state(StructuredOutputs.regex("ok"), []), 0)], batch)
    assert set(unpack_bitmask(batch[1:], VOCAB_SIZE)[0].nonzero().flatten().tolist()) == set(tokenizer.eos_token_ids)
