"""Our GLM-4.1V equals transformers' Glm4vForConditionalGeneration on an init-random checkpoint (fp32)."""

from __future__ import annotations

import pytest
import torch

IMAGE = 151343
TOL = 1e-4


def _hf_rope(hf_model, ids: torch.Tensor, grids: torch.Tensor | None):
    types = (ids == IMAGE).int()
    pos, _ = hf_model.model.get_rope_index(ids, types, image_grid_thw=grids)
    return pos, types


def _prompt_with_images(grids: list[tuple[int, int, int]], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randint(0, 150000, (5,), generator=g)]
    for t, h, w in grids:
        parts += [torch.tensor([151339]), torch.full((t * h * w // 4,), IMAGE), torch.tensor([151340]),
                  torch.randint(0, 150000, (3,), generator=g)]
    return torch.cat(parts).unsqueeze(0)  # [1, L]


def test_text_only_logits_match(hf_model, our_model):
    ids = torch.randint(0, 151552, (1, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_model(input_ids=ids).logits[0]
        pos = torch.arange(ids.shape[1]).expand(3, -1)
        ours = our_model.compute_logits(our_model(our_model.embed(ids[0]), pos))
    assert (ref - ours).abs().max().item() <= TOL


@pytest.mark.parametrize("grids", [[(1, 4, 6)], [(1, 8, 4), (1, 6, 10)], [(1, 14, 2)]])
def test_image_text_logits_match(hf_model, our_model, grids):
    from autoglm_trt.processing.rope_index import mrope_positions

    ids = _prompt_with_images(grids, seed=len(grids))
    grid_t = torch.tensor(grids)
    pixels = torch.randn(int(grid_t.prod(-1).sum()), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(3))
    hf_pos, types = _hf_rope(hf_model, ids, grid_t)
    ours_pos, _ = mrope_positions(ids[0].tolist(), grids, IMAGE, 2)
    assert torch.equal(torch.as_tensor(ours_pos), hf_pos[:, 0])
    with torch.no_grad():
        ref = hf_model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid_t, mm_token_type_ids=types).logits[0]
        emb = our_model.embed(ids[0], our_model.encode_images(pixels, grids))
        ours = our_model.compute_logits(our_model(emb, torch.as_tensor(ours_pos)))
    assert (ref - ours).abs().max().item() <= TOL


def test_vision_tower_matches(hf_model, our_model):
    grids = [(1, 4, 6), (1, 10, 8)]
    pixels = torch.randn(4 * 6 + 80, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf_model.model.visual(pixels, grid_thw=torch.tensor(grids)).pooler_output
        ours = our_model.encode_images(pixels, grids)
    assert ref.shape == ours.shape
    assert (ref - ours).abs().max().item() <= TOL * max(1.0, ref.abs().max().item())


def test_checkpoint_loads_in_transformers(tiny_model_dir, hf_model):
    import json

    index = json.loads((tiny_model_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2, "tiny checkpoint should be sharded"
    missing = [n for n, p in hf_model.named_parameters() if n not in index["weight_map"]]
    assert not missing


def test_vision_geometry_is_kept_per_grid_and_follows_the_weights(our_model):
    import copy

    visual = copy.deepcopy(our_model.visual)
    grids = [(1, 4, 6)]
    first = visual.geometry(grids)
    assert visual.geometry(grids) is first and visual.geometry([(1, 6, 4)]) is not first
    with torch.no_grad():
        visual.embeddings.position_embedding.weight.mul_(2)  # an in-place write (a weight load) drops the entry
    again = visual.geometry(grids)
    assert again is not first and torch.allclose(again[2], 2 * first[2]) and torch.equal(again[0], first[0])
    for i in range(6):
        visual.geometry([(1, 2, 2 + 2 * i)])
    assert len(visual._geometry) <= 4
