"""ChatTemplate renders exactly what transformers' apply_chat_template renders."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from autoglm_trt.errors import UserError
from autoglm_trt.processing.chat_template import ChatTemplate, normalize_messages
from autoglm_trt.processing.tokenizer_files import CHAT_TEMPLATE

PIXEL = Image.new("RGB", (4, 4))

CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "你好，请打开微信"}],
    "system_user": [{"role": "system", "content": "You are a phone agent."},
                    {"role": "user", "content": "Open the settings."}],
    "multi_turn": [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "<think>hmm</think><answer>first answer</answer>"},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": "second answer"},
        {"role": "user", "content": "third"},
    ],
    "image_then_text": [{"role": "user", "content": [
        {"type": "image", "image": PIXEL}, {"type": "text", "text": "What is on the screen?"}]}],
    "two_images_across_turns": [
        {"role": "user", "content": [{"type": "text", "text": "step 1"}, {"type": "image", "image": PIXEL}]},
        {"role": "assistant", "content": "do(action=\"Tap\", element=[1,2])"},
        {"role": "user", "content": [{"type": "image", "image": PIXEL}, {"type": "text", "text": "step 2"},
                                     {"type": "text", "text": " more"}]},
    ],
    "text_parts_only": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
    "assistant_metadata": [{"role": "user", "content": "q"},
                           {"role": "assistant", "metadata": "tool_x", "content": "r"}],
    "empty_user": [{"role": "user", "content": ""}],
}


@pytest.fixture(scope="module")
def template(model_dir):
    return ChatTemplate.from_dir(model_dir)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(template, hf_tokenizer, hf_processor, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    ours = template.render(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    via_processor = hf_processor.apply_chat_template(messages, tokenize=False,
                                                     add_generation_prompt=add_generation_prompt)
    assert ours == via_processor


def test_extra_kwargs_reach_the_template(hf_tokenizer):
    source = "{{ enable_thinking }}|{{ foo }}|{{ eos_token }}|{{ messages | length }}"
    template = ChatTemplate(source, {"eos_token": "<|endoftext|>"})
    msgs = [{"role": "user", "content": "x"}]
    assert template.render(msgs, enable_thinking=False, foo="bar") == "False|bar|<|endoftext|>|1"
    theirs = hf_tokenizer.apply_chat_template(msgs, chat_template=source, tokenize=False,
                                              enable_thinking=False, foo="bar")
    assert theirs == "False|bar|<|endoftext|>|1"


def test_image_url_parts_render_as_images(template, hf_tokenizer):
    openai_style = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "Tap the search box."}]}]
    expected = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Tap the search box."}]}],
        tokenize=False, add_generation_prompt=True)
    rendered = template.render(openai_style)
    assert rendered == expected
    assert rendered == "[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>Tap the search box.<|assistant|>\n"


def test_system_text_parts_are_joined(template):
    parts = [{"role": "system", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
             {"role": "user", "content": "hi"}]
    assert template.render(parts) == template.render([{"role": "system", "content": "be brief"},
                                                      {"role": "user", "content": "hi"}])
    assert normalize_messages(parts)[0]["content"] == "be brief"


def test_template_sources(tmp_path, model_dir):
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert ChatTemplate.from_dir(tmp_path).source == CHAT_TEMPLATE
    (tmp_path / "chat_template.jinja").write_text("JINJA{{ messages[0].content }}")
    assert ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": "x"}]) == "JINJAx"
    assert ChatTemplate.from_dir(tmp_path).special_tokens["eos_token"] == "<|endoftext|>"


def test_no_template_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="chat template"):
        ChatTemplate.from_dir(tmp_path)


def test_sandbox_and_template_errors():
    escape = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(UserError):
        escape.render([{"role": "user", "content": "x"}])
    raising = ChatTemplate("{{ raise_exception('only user turns') }}")
    with pytest.raises(UserError, match="only user turns"):
        raising.render([{"role": "user", "content": "x"}])
    with pytest.raises(UserError, match="role"):
        raising.render([{"content": "no role"}])
