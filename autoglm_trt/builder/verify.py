"""Check the exported graphs against PyTorch through onnxruntime; every check reports a max abs diff.

Two references per graph: the export wrapper itself (same function, same inputs: every output is
compared) and our production model (Glm4vForConditionalGeneration: logits / image embeddings), so the
functional re-implementation is checked too. The decoder is checked on a left-padded prefill batch
(past length 0) and on a decode step that feeds the prefill's present KV back in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from autoglm_trt.builder.onnx_text import DecoderGraph, decoder_io_names
from autoglm_trt.builder.onnx_vision import INPUT_NAMES as VISION_INPUTS
from autoglm_trt.builder.onnx_vision import VisionGraph, vision_graph_inputs
from autoglm_trt.models.glm4v import Glm4vForConditionalGeneration
from autoglm_trt.models.glm4v_vision import Glm4vVisionModel


@dataclass(frozen=True)
class ParityResult:
    graph: str  # "llm" | "visual"
    case: str  # "prefill" | "decode" | "images"
    output: str  # output name (or "logits vs model")
    max_abs_diff: float
    atol: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.atol

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    return ort.InferenceSession(str(path), opts, providers=providers)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _diff(a, b) -> float:
    a = torch.as_tensor(np.asarray(a)).float()
    b = b.detach().float().cpu() if isinstance(b, torch.Tensor) else torch.as_tensor(np.asarray(b)).float()
    return float((a - b).abs().max()) if a.numel() else 0.0


def _decoder_case(model: Glm4vForConditionalGeneration, batch: int, seq: int, pad: int):
    """Random token ids (row 1 left-padded by `pad`) with distinct t/h/w positions -> (ids, pos, mask)."""
    t = model.cfg.text
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, min(t.vocab_size, 2000), (batch, seq), generator=g)
    pos = torch.arange(seq).view(1, 1, seq).repeat(3, batch, 1)
    pos[1:] += torch.randint(0, 3, (2, batch, seq), generator=g).cumsum(-1)  # h/w drift apart from t
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1 and pad:
        mask[1, :pad] = 0
        pos[:, 1, pad:] = pos[:, 1, :-pad].clone()
        pos[:, 1, :pad] = 0
    return ids, pos, mask


@torch.no_grad()
def _model_logits(model: Glm4vForConditionalGeneration, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One unpadded sequence: ids [T], pos [3, T] -> logits [T, V] from the production model."""
    hidden = model(model.embed(ids), pos)
    return model.compute_logits(hidden)


@torch.no_grad()
def verify_decoder(model: Glm4vForConditionalGeneration, path: Path, atol: float) -> list[ParityResult]:
    graph = DecoderGraph(model).eval()
    t = model.cfg.text
    dtype = graph.lm_head.weight.dtype
    names_in, names_out = decoder_io_names(t.num_hidden_layers)
    sess = ort_session(path)
    b, s, pad = 2, 5, 2
    ids, pos, mask = _decoder_case(model, b, s, pad)
    embeds = model.embed(ids.flatten()).view(b, s, -1).to(dtype)
    empty = [torch.zeros(b, t.num_key_value_heads, 0, t.head_dim, dtype=dtype)] * (2 * t.num_hidden_layers)
    results = []
    feeds = [embeds, pos, mask, *empty]
    ort_out = sess.run(None, dict(zip(names_in, map(_np, feeds))))
    results += _compare("prefill", graph(*feeds), ort_out, names_out, atol)
    for row in range(b):  # real tokens of each row against the production model
        keep = mask[row] > 0
        ref = _model_logits(model, ids[row][keep], pos[:, row][:, keep])
        results.append(ParityResult("llm", "prefill", f"logits vs model (row {row})",
                                    _diff(ort_out[0][row][keep.numpy()], ref), atol))
    # decode: one new token per row over the prefill's KV
    nxt = torch.tensor([[7], [11]])
    npos = pos[:, :, -1:] + 1
    feeds = [model.embed(nxt.flatten()).view(b, 1, -1).to(dtype), npos, torch.ones(b, s + 1, dtype=torch.long)]
    feeds[2][1, :pad] = 0
    feeds += [torch.from_numpy(x) for x in ort_out[1:]]
    ort_dec = sess.run(None, dict(zip(names_in, map(_np, feeds))))
    results += _compare("decode", graph(*feeds), ort_dec, names_out, atol)
    for row in range(b):
        keep = mask[row] > 0
        full_ids = torch.cat((ids[row][keep], nxt[row]))
        full_pos = torch.cat((pos[:, row][:, keep], npos[:, row]), dim=1)
        ref = _model_logits(model, full_ids, full_pos)[-1]
        results.append(ParityResult("llm", "decode", f"logits vs model (row {row})",
                                    _diff(ort_dec[0][row, -1], ref), atol))
    return results


def _compare(case: str, torch_out, ort_out, names: list[str], atol: float) -> list[ParityResult]:
    worst_kv = max((_diff(o, t) for o, t in zip(ort_out[1:], torch_out[1:])), default=0.0)
    return [ParityResult("llm", case, "logits", _diff(ort_out[0], torch_out[0]), atol),
            ParityResult("llm", case, f"present.* (worst of {len(names) - 1})", worst_kv, atol)]


@torch.no_grad()
def verify_vision(visual: Glm4vVisionModel, path: Path, atol: float,
                  grid_thw=((1, 4, 6), (1, 2, 2), (2, 2, 4))) -> list[ParityResult]:
    c = visual.cfg
    width = c.in_channels * c.temporal_patch_size * c.patch_size ** 2
    n = sum(t * h * w for t, h, w in grid_thw)
    pixels = torch.randn(n, width, generator=torch.Generator().manual_seed(2)).to(visual.dtype)
    idx = vision_graph_inputs(list(grid_thw), c.spatial_merge_size)
    feeds = [pixels, *(idx[k] for k in VISION_INPUTS[1:])]
    out = ort_session(path).run(None, dict(zip(VISION_INPUTS, map(_np, feeds))))[0]
    wrapper = VisionGraph(visual).eval()(*feeds)
    ref = visual(pixels, list(grid_thw))
    return [ParityResult("visual", "images", "image_embeds", _diff(out, wrapper), atol),
            ParityResult("visual", "images", "image_embeds vs model", _diff(out, ref), atol)]
