"""glm45 reasoning split, whole and streamed with tags cut at every position."""

from __future__ import annotations

import random

import pytest

from autoglm_trt.processing.reasoning import ReasoningStream, split

AGENT = "<think>The search box is at the top.</think><answer>do(action=\"Tap\", element=[500, 80])</answer>"

# (text, starts_in_reasoning, expected reasoning, expected content)
CASES = [
    (AGENT, False, "The search box is at the top.", "<answer>do(action=\"Tap\", element=[500, 80])</answer>"),
    ("no tags at all, <answer>x</answer>", False, None, "no tags at all, <answer>x</answer>"),
    ("plain", False, None, "plain"),
    ("", False, None, ""),
    ("<think></think>answer", False, "", "answer"),
    ("<think>unfinished thought", False, "unfinished thought", ""),
    ("prefix <think>r</think> suffix", False, "r", "prefix  suffix"),
    ("already thinking</think>the answer", True, "already thinking", "the answer"),
    ("still thinking, cut off", True, "still thinking, cut off", ""),
    ("<think>a</think>b<think>c</think>d", False, "ac", "bd"),
    ("a < b and <thin ideas> </thinking", False, None, "a < b and <thin ideas> </thinking"),
    ("<think>x < y, </thin> is not a tag</think>z<", False, "x < y, </thin> is not a tag", "z<"),
    ("中文<think>思考过程</think>finish(message=\"完成\")", False, "思考过程", "中文finish(message=\"完成\")"),
]


def _stream(chunks, starts_in_reasoning=False):
    stream = ReasoningStream(starts_in_reasoning)
    reasoning, content = [], []
    for chunk in chunks:
        r, c = stream.feed(chunk)
        reasoning.append(r)
        content.append(c)
    r, c = stream.finish()
    return "".join(reasoning + [r]), "".join(content + [c]), stream


@pytest.mark.parametrize("text,starts,reasoning,content", CASES)
def test_split_whole(text, starts, reasoning, content):
    assert split(text, starts_in_reasoning=starts) == (reasoning, content)


@pytest.mark.parametrize("text,starts,reasoning,content", CASES)
def test_stream_every_single_cut(text, starts, reasoning, content):
    for cut in range(len(text) + 1):
        got_r, got_c, _ = _stream([text[:cut], text[cut:]], starts)
        assert (got_r, got_c) == (reasoning or "", content), cut


@pytest.mark.parametrize("text,starts,reasoning,content", CASES)
def test_stream_every_pair_of_cuts(text, starts, reasoning, content):
    n = len(text)
    for i in range(n + 1):
        for j in range(i, n + 1):
            got = _stream([text[:i], text[i:j], text[j:]], starts)[:2]
            assert got == (reasoning or "", content), (i, j)


@pytest.mark.parametrize("text,starts,reasoning,content", CASES)
def test_stream_char_by_char_and_random(text, starts, reasoning, content):
    assert _stream(list(text), starts)[:2] == (reasoning or "", content)
    rng = random.Random(len(text))
    for _ in range(50):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert _stream(chunks, starts)[:2] == (reasoning or "", content)


def test_tag_text_is_never_emitted():
    for cut in range(len(AGENT) + 1):
        stream = ReasoningStream()
        outs = [stream.feed(AGENT[:cut]), stream.feed(AGENT[cut:]), stream.finish()]
        assert all("<think" not in r + c and "</think" not in r + c for r, c in outs)


def test_partial_tag_held_until_decided():
    stream = ReasoningStream()
    assert stream.feed("hello <thi") == ("", "hello ")
    assert stream.feed("nk>deep") == ("deep", "")
    assert stream.feed(" thought</") == (" thought", "")
    assert stream.feed("think>done") == ("", "done")
    assert stream.feed("<") == ("", "")
    assert stream.finish() == ("", "<")
    assert stream.saw_reasoning and not stream.in_reasoning


def test_parser_for_prompt():
    from autoglm_trt.processing import ReasoningParser

    assert ReasoningParser.for_prompt("<|assistant|>\n<think>").starts_in_reasoning
    assert not ReasoningParser.for_prompt("<think>old</think><|user|>\nq<|assistant|>\n").starts_in_reasoning
    assert not ReasoningParser.for_prompt(None).starts_in_reasoning
    parser = ReasoningParser.for_prompt("<|assistant|>\n<think>")
    assert parser.name == "glm45"
    assert parser.split("r</think>c") == ("r", "c")
    stream = parser.stream()
    assert stream.feed("r</thi") == ("r", "") and stream.feed("nk>c") == ("", "c")
