"""InputProcessor produces the ids, pixels and grids of transformers' Glm4vProcessor."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch

from autoglm_trt.errors import UserError
from autoglm_trt.processing.inputs import InputProcessor, ProcessedPrompt

IMG = 151343
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inside transformers


@pytest.fixture(scope="module")
def processor(model_dir, hf_processor):
    # NOTE: compare with the backend of the transformers processor at hand: the torchvision class
    # where torchvision is installed, the PIL class otherwise
    proc = InputProcessor.from_dir(model_dir)
    torchvision_class = type(hf_processor.image_processor).__name__ == "Glm4vImageProcessor"
    proc.image_processor.backend = "torch" if torchvision_class else "pil"
    return proc


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _conversations(make_image):
    shot, small, wide = make_image(540, 1200, seed=1), make_image(20, 30, seed=2), make_image(700, 90, seed=3)
    return {
        "text_only": ([{"role": "user", "content": "打开设置"}], []),
        "phone_turn": ([
            {"role": "system", "content": "You are a phone agent."},
            {"role": "user", "content": [{"type": "image", "image": shot}, {"type": "text", "text": "Task: 打开微信"}]},
        ], [shot]),
        "two_images": ([
            {"role": "user", "content": [{"type": "text", "text": "compare"}, {"type": "image", "image": small},
                                         {"type": "text", "text": "and"}, {"type": "image", "image": wide}]},
        ], [small, wide]),
        "multi_turn_images": ([
            {"role": "user", "content": [{"type": "image", "image": wide}, {"type": "text", "text": "step 1"}]},
            {"role": "assistant", "content": "<think>tap it</think><answer>do(action=\"Tap\", element=[5,5])</answer>"},
            {"role": "user", "content": [{"type": "image", "image": shot}, {"type": "text", "text": "step 2"}]},
        ], [wide, shot]),
    }


def _hf(hf_processor, messages, images, max_pixels=None):
    text = hf_processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    kwargs = {}
    if max_pixels:
        kwargs["size"] = {"shortest_edge": 12544, "longest_edge": max_pixels}
    return hf_processor(text=[text], images=images or None, return_tensors="pt", **kwargs)


@pytest.mark.parametrize("name", ["text_only", "phone_turn", "two_images", "multi_turn_images"])
@pytest.mark.parametrize("max_pixels", [None, 300_000])
def test_matches_glm4v_processor(processor, hf_processor, hf_glm4v_model, make_image, name, max_pixels):
    messages, images = _conversations(make_image)[name]
    ours = processor.process_chat(messages, max_pixels=max_pixels)
    theirs = _hf(hf_processor, messages, images, max_pixels)
    assert isinstance(ours, ProcessedPrompt)
    assert ours.prompt_token_ids == theirs["input_ids"][0].tolist()
    assert len(ours.images) == len(images)
    if images:
        assert [im.grid_thw for im in ours.images] == [tuple(g) for g in theirs["image_grid_thw"].tolist()]
        pixels = torch.cat([im.pixel_values for im in ours.images])
        assert (pixels - theirs["pixel_values"]).abs().max().item() <= 1e-6
    grids = theirs.get("image_grid_thw")
    want_pos, want_delta = hf_glm4v_model.get_rope_index(
        theirs["input_ids"], theirs["mm_token_type_ids"], image_grid_thw=grids,
        attention_mask=theirs["attention_mask"])
    assert torch.equal(ours.mrope_positions, want_pos[:, 0])
    assert ours.mrope_delta == int(want_delta[0, 0])


def test_image_spans_and_text(processor, make_image):
    a, b = make_image(100, 100, seed=5), make_image(300, 60, seed=6)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(a)}},
                                             {"type": "image", "image": b}, {"type": "text", "text": "x"}]}]
    out = processor.process_chat(messages)
    assert out.prompt_text.count("<|image|>") == 2
    ids = out.prompt_token_ids
    for (start, end, digest), image in zip(out.image_spans, out.images):
        assert ids[start - 1] == 151339 and ids[end] == 151340  # begin/end of image around the run
        assert set(ids[start:end]) == {IMG} and end - start == image.num_tokens
        assert digest == image.content_hash
    assert out.num_tokens == len(ids) == out.mrope_positions.shape[1]


def test_data_url_equals_pil(processor, make_image):
    image = make_image(64, 48, seed=9)
    as_url = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(image)}}]}]
    as_pil = [{"role": "user", "content": [{"type": "image", "image": image}]}]
    a, b = processor.process_chat(as_url), processor.process_chat(as_pil)
    assert a.prompt_token_ids == b.prompt_token_ids
    assert torch.equal(a.images[0].pixel_values, b.images[0].pixel_values)


def test_process_text(processor, make_image):
    out = processor.process_text("[gMASK]<sop><|user|>\nhello<|assistant|>\n")
    assert out.images == [] and out.mrope_delta == 0
    assert torch.equal(out.mrope_positions, torch.arange(out.num_tokens).expand(3, -1))
    with_image = processor.process_text("<|begin_of_image|><|image|><|end_of_image|>hi", [make_image(56, 56)])
    # 56x56 is below min_pixels once counted as two frames: scaled up to 84x84 -> 6x6 patches
    assert with_image.prompt_token_ids.count(IMG) == with_image.images[0].num_tokens == 9


def test_errors(processor, make_image):
    with pytest.raises(UserError, match="placeholders"):
        processor.process_text("<|image|><|image|>", [make_image(56, 56)])
    with pytest.raises(UserError, match="video"):
        processor.process_chat([{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}]}])
    with pytest.raises(UserError, match="remote URLs"):
        processor.process_chat([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])
    with pytest.raises(UserError, match="could not read"):
        processor.process_chat([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    with pytest.raises(UserError, match="only supported in user"):
        processor.process_chat([{"role": "assistant", "content": [{"type": "image", "image": make_image(9, 9)}]}])


def test_chat_template_kwargs_and_generation_prompt(processor):
    messages = [{"role": "user", "content": "hi"}]
    with_prompt = processor.process_chat(messages, chat_template_kwargs={"enable_thinking": False})
    without = processor.process_chat(messages, add_generation_prompt=False)
    assert with_prompt.prompt_text.endswith("<|assistant|>\n")
    assert not without.prompt_text.endswith("<|assistant|>\n")
    assert np.array_equal(with_prompt.prompt_token_ids[:len(without.prompt_token_ids)], without.prompt_token_ids)
