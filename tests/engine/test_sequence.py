import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from autoglm_trt.engine.sampling_params import SamplingParams
from autoglm_trt.engine.sequence import Sequence, SequenceStatus

IMG = 99


@dataclass
class FakeImage:
    content_hash: str


# ---- SamplingParams ----------------------------------------------------------------------------

def test_sampling_params_defaults_are_valid():
    p = SamplingParams()
    assert p.max_tokens == 256 and p.top_k == 0 and p.stop == [] and not p.is_greedy


@pytest.mark.parametrize("field_name, value", [
    ("temperature", -0.1), ("temperature", math.nan), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -2), ("min_p", -0.1), ("min_p", 1.1), ("frequency_penalty", 2.5),
    ("presence_penalty", -2.1), ("repetition_penalty", 0.0), ("max_tokens", 0), ("logprobs", 21),
    ("logprobs", -1), ("stop", [""]), ("stop", ["ok", 3]), ("max_tokens", 1.5), ("top_k", True),
    ("stop_token_ids", [-1]), ("seed", "x"),
])
def test_sampling_params_rejects_out_of_range(field_name, value):
    with pytest.raises(ValueError, match=field_name):
        SamplingParams(**{field_name: value})


def test_sampling_params_normalises():
    p = SamplingParams(top_k=-1, stop="END", temperature=0.0, logprobs=0)
    assert p.top_k == 0 and p.stop == ["END"] and p.is_greedy and p.logprobs == 0
    assert SamplingParams(top_p=1.0, min_p=1.0, frequency_penalty=-2, presence_penalty=2).top_p == 1.0


# ---- Sequence ----------------------------------------------------------------------------------

def test_sequence_token_bookkeeping():
    seq = Sequence("r", [1, 2, 3], SamplingParams(max_tokens=4), arrival_time=5.0)
    assert (seq.num_tokens, seq.num_prompt_tokens, seq.num_output_tokens) == (3, 3, 0)
    assert seq.status is SequenceStatus.WAITING and not seq.is_finished and seq.arrival_time == 5.0
    seq.append_token(7)
    assert seq.token_ids == [1, 2, 3, 7] and seq.output_token_ids == [7] and seq.last_token == 7
    assert seq.prompt_token_ids == [1, 2, 3] and seq.num_uncomputed_tokens == 4
    assert "r" in repr(seq)


def test_sequence_rejects_bad_input():
    with pytest.raises(ValueError, match="no tokens"):
        Sequence("r", [])
    with pytest.raises(ValueError, match="image_spans"):
        Sequence("r", [1, IMG], images=[FakeImage("a")])
    with pytest.raises(ValueError, match="image_spans"):
        Sequence("r", [IMG, IMG, IMG], images=[FakeImage("a"), FakeImage("b")],
                 image_spans=[(0, 2, "a"), (1, 3, "b")])
    with pytest.raises(ValueError, match="image_spans"):
        Sequence("r", [IMG, IMG], images=[FakeImage("a")], image_spans=[(0, 5, "a")])


def test_status_finished_flags():
    finished = {s for s in SequenceStatus if s.is_finished}
    assert finished == {SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH,
                        SequenceStatus.FINISHED_ABORTED}


def test_block_hash_extra_is_images_overlapping_the_range():
    ids = [1, IMG, IMG, 2, 3, IMG, IMG, IMG]
    seq = Sequence("r", ids, images=[FakeImage("a"), FakeImage("b")],
                   image_spans=[(1, 3, "a"), (5, 8, "b")])
    assert seq.block_hash_extra(0, 1) == ()
    assert seq.block_hash_extra(0, 2) == ("a",)
    assert seq.block_hash_extra(2, 6) == ("a", "b")
    assert seq.block_hash_extra(3, 5) == ()
    assert seq.image_indices(7, 100) == [1]


def test_decode_position_uses_mrope_delta():
    seq = Sequence("r", [1, 2, 3], mrope_positions=object(), mrope_delta=-5)
    seq.append_token(4)
    assert seq.decode_position(3) == -2
    with pytest.raises(ValueError, match="mrope_positions"):
        seq.decode_position(1)
    text_only = Sequence("t", [1, 2])
    assert text_only.decode_position(0) == 0 and text_only.decode_position(5) == 5


def test_from_prompt_takes_the_prompts_spans():
    prompt = SimpleNamespace(prompt_token_ids=[5, IMG, IMG, 6], images=[FakeImage("h")], image_spans=[(1, 3, "h")],
                             mrope_positions="pos", mrope_delta=-1)
    seq = Sequence.from_prompt("r", prompt, SamplingParams(seed=3))
    assert seq.image_spans == [(1, 3, "h")] and seq.mrope_delta == -1 and seq.params.seed == 3
    text = SimpleNamespace(prompt_token_ids=[5], images=[], image_spans=[], mrope_positions=None, mrope_delta=0)
    assert Sequence.from_prompt("t", text, None).image_spans == []
