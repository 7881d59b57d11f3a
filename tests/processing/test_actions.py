"""The phone agent's action language: our parser, the grammar (structured/actions.lark) held to the same
examples, and 200 replies sampled through the grammar's masks that all parse."""

from __future__ import annotations

import os
import random
import sys

import pytest
import torch

from autoglm_trt.plugins.bitmask import apply_token_bitmask_, unpack_bitmask
from autoglm_trt.processing.actions import Action, ActionSyntaxError, parse_action, parse_reply
from autoglm_trt.processing.structured import GrammarCompiler, StructuredOutputs, allocate_bitmask
from autoglm_trt.processing.tokenizer import Tokenizer
from autoglm_trt.processing.tokenizer_files import VOCAB_SIZE

# (text, name, args): every action of the language, in the spelling the prompts use
WELL_FORMED = [
    ('do(action="Launch", app="微信")', "Launch", {"app": "微信"}),
    ('do(action="Tap", element=[500,300])', "Tap", {"element": (500, 300)}),
    ('do(action="Tap", element=[0, 999], message="确认支付")', "Tap",
     {"element": (0, 999), "message": "确认支付"}),
    ('do(action="Type", text="Hello World")', "Type", {"text": "Hello World"}),
    ('do(action="Type", text="")', "Type", {"text": ""}),
    ('do(action="Type", text="1+1=2 (ok) <b>")', "Type", {"text": "1+1=2 (ok) <b>"}),
    ('do(action="Type_Name", text="张三")', "Type_Name", {"text": "张三"}),
    ('do(action="Swipe", start=[500,800], end=[500,200])', "Swipe", {"start": (500, 800), "end": (500, 200)}),
    ('do(action="Long Press", element=[10,20])', "Long Press", {"element": (10, 20)}),
    ('do(action="Double Tap", element=[999,0])', "Double Tap", {"element": (999, 0)}),
    ('do(action="Back")', "Back", {}),
    ('do(action="Home")', "Home", {}),
    ('do(action="Interact")', "Interact", {}),
    ('do(action="Wait", duration="2 seconds")', "Wait", {"duration": "2 seconds"}),
    ('do(action="Wait", duration="0.5 seconds")', "Wait", {"duration": "0.5 seconds"}),
    ('do(action="Take_over", message="请登录")', "Take_over", {"message": "请登录"}),
    ('do(action="Note", message="True")', "Note", {"message": "True"}),
    ('do(action="Call_API", instruction="总结这篇笔记")', "Call_API", {"instruction": "总结这篇笔记"}),
    ('finish(message="Task completed.")', "finish", {"message": "Task completed."}),
    ('finish(message="")', "finish", {"message": ""}),
]
MALFORMED = [
    'do(action="Fly")',                                   # unknown action
    'do(action="tap", element=[1,2])',                    # names are case-sensitive
    'do(action="Tap")',                                   # missing element
    'do(action="Tap", element=[1000,2])',                 # off the 0-999 grid
    'do(action="Tap", element=[-1,2])',
    'do(action="Tap", element=[01,2])',                   # leading zero: not a Python literal
    'do(action="Tap", element=[1,2,3])',
    'do(action="Tap", element=[1.5,2])',
    'do(action="Tap", element="[1,2]")',
    'do(action="Back", element=[1,2])',                   # extra argument
    'do(action="Swipe", end=[1,2], start=[3,4])',         # out of order
    'do(action="Launch", app="")',                        # empty app
    'do(action="Launch", app=Settings)',                  # unquoted
    'do(action="Type", text="say "hi"")',                 # quote inside a string
    'do(action="Type", text="a\\b")',                     # backslash inside a string
    'do(action="Type", text="line\nbreak")',              # newline inside a string
    'do(action="Wait", duration="2")',
    'do(action="Wait", duration="soon seconds")',
    'do(action="Back"',                                   # unclosed
    'do(action="Back"))',
    'do(action="Back",)',
    'finish()',
    'finish(text="x")',
    'finish(message="a", extra="b")',
    'tap(500, 300)',
    '',
]


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    pytest.importorskip("llguidance")
    return GrammarCompiler(tokenizer, VOCAB_SIZE)


def reply(action: str, thought: str = "The button is at the top.") -> str:
    return f"<think>{thought}</think>\n<answer>{action}</answer>"


def grammar_accepts(compiler, tokenizer, text: str, prompt: str = "<|assistant|>") -> bool:
    state = compiler.new_state(StructuredOutputs.actions(), tokenizer.encode(prompt))
    ids = tokenizer.encode(text)
    return state.accept_tokens(ids) == len(ids) and state.is_stopped()


@pytest.mark.parametrize("text, name, args", WELL_FORMED)
def test_parser_reads_every_action(text, name, args) -> None:
    action = parse_action(text)
    assert action == Action(name, args)
    assert parse_action(action.to_text()) == action
    assert parse_action(f"  {text.replace(', ', ' ,  ')}\n") == action  # whitespace as ast tolerates it


@pytest.mark.parametrize("text", MALFORMED)
def test_parser_refuses_malformed(text) -> None:
    with pytest.raises(ActionSyntaxError):
        parse_action(text)


def test_parse_reply() -> None:
    got = parse_reply('<think>\nopen it\n</think>\n<answer>\ndo(action="Home")\n</answer>')
    assert got.thought == "\nopen it\n" and got.action == Action("Home")
    assert parse_reply('<think>x</think><answer>finish(message="ok")').action.is_finish  # </answer> was an eos
    for bad in ('do(action="Home")', '<think>x</think>do(action="Home")',
                '<think>I will do(action="Back")</think><answer>do(action="Home")</answer>'):
        with pytest.raises(ActionSyntaxError):
            parse_reply(bad)


@pytest.mark.parametrize("text", [t for t, _, _ in WELL_FORMED])
def test_grammar_accepts_every_action(compiler, tokenizer, text) -> None:
    assert grammar_accepts(compiler, tokenizer, reply(text))


@pytest.mark.parametrize("text", [t for t in MALFORMED if "\n" not in t])
def test_grammar_refuses_malformed(compiler, tokenizer, text) -> None:
    assert not grammar_accepts(compiler, tokenizer, reply(text))


def test_grammar_reply_shape(compiler, tokenizer) -> None:
    ok = 'do(action="Back")'
    assert grammar_accepts(compiler, tokenizer, f"<think>\nx\n</think>\n<answer>\n{ok}\n</answer>")
    assert not grammar_accepts(compiler, tokenizer, f"<answer>{ok}</answer>")  # the thought is required
    assert not grammar_accepts(compiler, tokenizer, reply(ok, thought="then do(action=\"Home\")"))
    assert not grammar_accepts(compiler, tokenizer, reply(ok, thought="x <b> y"))
    assert not grammar_accepts(compiler, tokenizer, reply(ok) + "more")
    # the prompt already opened the think block / already closed it
    assert grammar_accepts(compiler, tokenizer, f"x</think><answer>{ok}</answer>", "<|assistant|><think>")
    assert grammar_accepts(compiler, tokenizer, f"<answer>{ok}</answer>", "<|assistant|><think></think>")


def _logit_pool(tokenizer, seed: int) -> torch.Tensor:
    """64 rows of random logits, tilted toward closing tokens so that replies stay short."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(64, VOCAB_SIZE, generator=gen) * 2
    for text in ("</think>", "<answer>", "</answer>", '"', '")', "]", ")"):
        ids = tokenizer.encode(text)
        if len(ids) == 1:  # NOTE: a piece of a longer text would tilt every reply toward one action
            pool[:, ids[0]] += 7.0
    return pool


def _sample_reply(state, tokenizer, pool: torch.Tensor, seed: int, limit: int = 400) -> str:
    """Greedy over a random row of the pool per step, masked by the grammar."""
    mask = allocate_bitmask(1, VOCAB_SIZE)
    rng = random.Random(seed)
    ids = []
    for _ in range(limit):
        logits = pool[rng.randrange(len(pool))].clone().unsqueeze(0)  # [1, V]
        state.fill_bitmask(mask, 0)
        apply_token_bitmask_(logits, mask)
        token = int(logits.argmax())
        assert state.accept_token(token), state.error
        ids.append(token)
        if state.is_stopped():
            return tokenizer.decode(ids, skip_special_tokens=False)
    raise AssertionError(f"no complete reply in {limit} tokens: {tokenizer.decode(ids, False)!r}")


@pytest.fixture
def one_thread():
    """NOTE: the CI machine's 2 cores are shared: torch's intra-op threads make 151,552-wide ops 20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_200_sampled_replies_all_parse(compiler, tokenizer, one_thread) -> None:
    pool = _logit_pool(tokenizer, seed=0)
    names = set()
    prompt = tokenizer.encode("<|user|>open WeChat<|assistant|>")
    for k in range(200):
        state = compiler.new_state(StructuredOutputs.actions(), prompt)
        text = _sample_reply(state, tokenizer, pool, seed=k)
        assert text.endswith("</answer>")
        names.add(parse_reply(text).action.name)
    assert len(names) >= 10, names  # the masks reached most of the language


@pytest.mark.skipif(not os.environ.get("OPEN_AUTOGLM_DIR"),
                    reason="set OPEN_AUTOGLM_DIR to a checkout of zai-org/Open-AutoGLM to run their parser")
def test_sampled_replies_parse_with_open_autoglm(compiler, tokenizer, one_thread) -> None:
    """Their own client split + parse_action (phone_agent/), imported from a checkout, never copied."""
    sys.path.insert(0, os.environ["OPEN_AUTOGLM_DIR"])
    try:
        from phone_agent.actions.handler import parse_action as their_parse
        from phone_agent.model.client import ModelClient
    except ImportError as exc:  # their package imports its device layers' dependencies
        pytest.skip(f"Open-AutoGLM's package does not import here: {exc}")
    pool = _logit_pool(tokenizer, seed=1)
    for k in range(200):
        text = _sample_reply(compiler.new_state(StructuredOutputs.actions(), []), tokenizer, pool, k)
        content = text.removesuffix("</answer>")  # an eos token: not in the served text
        _, action_text = ModelClient._parse_response(None, content)
        theirs = their_parse(action_text)
        ours = parse_reply(text).action
        assert theirs["_metadata"] == ("finish" if ours.is_finish else "do")
        if not ours.is_finish:
            assert theirs["action"] in (ours.name, "Type")  # they read Type_Name as Type


def test_token_budget_always_reaches_the_answer(compiler, tokenizer, one_thread) -> None:
    """With the request's max_tokens, the thought and strings are bounded: a reply never runs out."""
    pool = torch.zeros(64, VOCAB_SIZE)  # flat logits but for text: nothing tilts toward closing
    pool[:, tokenizer.encode("a")[0]] = 5.0
    pool[:, tokenizer.encode("do")[0]] = 4.0
    for budget in (40, 100, 300):
        state = compiler.new_state(StructuredOutputs.actions(max_tokens=budget), [])
        text = _sample_reply(state, tokenizer, pool, seed=budget, limit=budget)
        assert len(tokenizer.encode(text)) <= budget
        parse_reply(text)


def test_token_budget_closes_strings(compiler, tokenizer) -> None:
    state = compiler.new_state(StructuredOutputs.actions(max_tokens=100), [])
    head = '<think>a</think><answer>do(action="Type", text="'
    assert state.accept_tokens(tokenizer.encode(head)) == len(tokenizer.encode(head))
    a, mask, written = tokenizer.encode("a")[0], allocate_bitmask(1, VOCAB_SIZE), 0
    while True:
        state.fill_bitmask(mask, 0)
        allowed = unpack_bitmask(mask, VOCAB_SIZE)[0]
        if not allowed[a]:
            break
        assert state.accept_token(a)
        written += 1
    assert 0 < written <= 100 // 8  # the string's characters are bounded ...
    close = allowed.nonzero().flatten().tolist()
    assert all(tokenizer.decode([t]).startswith('"') for t in close)  # ... and it must close properly
    rest = tokenizer.encode('")</answer>')
    assert state.accept_tokens(rest) == len(rest) and state.is_stopped()
    assert parse_reply(head + "a" * written + '")').action == Action("Type", {"text": "a" * written})
