"""mrope_positions equals transformers' Glm4vModel.get_rope_index."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoglm_trt.processing.rope_index import mrope_positions

IMG, BOI, EOI = 151343, 151339, 151340


def _prompt(*pieces):
    """Build ids from ints (text tokens) and (t, h, w) grids (an image with its begin/end tokens)."""
    ids, grids = [], []
    for piece in pieces:
        if isinstance(piece, tuple):
            grids.append(piece)
            ids += [BOI] + [IMG] * (piece[0] * piece[1] * piece[2] // 4) + [EOI]
        else:
            ids += list(range(100, 100 + piece))
    return ids, grids


def _mm_token_type_ids(ids):
    # as Glm4vProcessor.create_mm_token_type_ids: image tokens outside video segments are type 1
    arr = np.asarray(ids)
    return torch.from_numpy((arr == IMG).astype(np.int64))[None]


def _reference(model, ids, grids):
    input_ids = torch.tensor([ids])
    grid_thw = torch.tensor(grids) if grids else None
    pos, delta = model.get_rope_index(input_ids, _mm_token_type_ids(ids), image_grid_thw=grid_thw,
                                      attention_mask=torch.ones_like(input_ids))
    return pos[:, 0], int(delta[0, 0])


CASES = {
    "text_only": (7,),
    "one_image": (3, (1, 4, 6), 5),
    "image_first_and_last": ((1, 2, 2), 2, (1, 6, 4)),
    "two_images_different_grids": (4, (1, 8, 4), 3, (1, 2, 10), 6),
    "text_after_images": (2, (1, 10, 6), (1, 4, 4), 12),
    "screenshot_grid": (12, (1, 168, 74), 9),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_get_rope_index(hf_glm4v_model, name):
    ids, grids = _prompt(*CASES[name])
    positions, delta = mrope_positions(ids, grids, IMG, spatial_merge_size=2)
    want, want_delta = _reference(hf_glm4v_model, ids, grids)
    assert positions.dtype == torch.int64 and positions.shape == (3, len(ids))
    assert torch.equal(positions, want)
    assert delta == want_delta


def test_one_image_layout():
    ids, grids = _prompt(2, (1, 4, 6), 1)  # BOI at 2, 6 image tokens (2 x 3 merged), EOI
    positions, delta = mrope_positions(ids, grids, IMG)
    image = positions[:, 3:9]
    assert image[0].tolist() == [3] * 6  # temporal: all start
    assert image[1].tolist() == [3, 3, 3, 4, 4, 4]  # rows
    assert image[2].tolist() == [3, 4, 5, 3, 4, 5]  # columns
    assert positions[:, 9].tolist() == [6, 6, 6]  # EOI resumes at start + max(2, 3)
    assert delta == int(positions.max()) + 1 - len(ids) == -3


def test_decode_positions_continue_with_delta(hf_glm4v_model):
    ids, grids = _prompt(3, (1, 4, 8), 2)
    positions, delta = mrope_positions(ids, grids, IMG)
    # the next token (index L) sits right after the largest prompt position
    assert len(ids) + delta == int(positions.max()) + 1


def test_mismatched_grids_raise():
    ids, grids = _prompt(2, (1, 4, 4), 2)
    with pytest.raises(ValueError, match="grids given"):
        mrope_positions(ids, grids + [(1, 2, 2)], IMG)
    with pytest.raises(ValueError, match="more <\\|image\\|> runs"):
        mrope_positions(ids, [], IMG)
    with pytest.raises(ValueError, match="consecutive"):
        mrope_positions(ids, [(1, 8, 8)], IMG)


def test_empty_prompt():
    positions, delta = mrope_positions([], [], IMG)
    assert positions.shape == (3, 0) and delta == 0
