"""Check the exported graphs against PyTorch through onnxruntime; every check reports a max abs diff.

Two references per graph: the export wrapper itself (same function, same inputs: every output is
compared) and our production model (Glm4vForConditionalGeneration: logits / image embeddings), so the
functional re-implementation is checked too. The decoder is checked on a left-padded prefill batch
(past length 0) and on a decode step that feeds the prefill's present KV back in.
The graphs run through Polygraphy's onnxruntime runner, and the wrapper comparison is Polygraphy's
comparator (`Comparator.compare_accuracy`, every output by name); the model comparisons slice rows out of
padded batches, which it does not do, so they are a plain max |a - b|.
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


class OrtGraph:
    """An exported graph in Polygraphy's onnxruntime runner (CUDA when onnxruntime has it, else CPU). A context
    manager: the session is built once on entry (for the 9B, that reads the external data) and serves every run."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
        from polygraphy.logger import G_LOGGER

        G_LOGGER.module_severity = G_LOGGER.ERROR  # NOTE: its INFO lines would bury the export's own output
        ort.set_default_logger_severity(3)
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.runner = OnnxrtRunner(SessionFromOnnx(str(path), providers=providers))  # NOTE: a path: external data

    def __enter__(self) -> OrtGraph:
        self.runner.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.runner.deactivate()

    def run(self, names: list[str], feeds: list[torch.Tensor]) -> dict[str, np.ndarray]:
        return dict(self.runner.infer(dict(zip(names, map(_np, feeds)))))


def max_abs_diffs(ort_out: dict[str, np.ndarray], torch_out: dict[str, torch.Tensor], atol: float) -> dict[str, float]:
    """Polygraphy's comparator on onnxruntime's outputs vs PyTorch's, by name -> max |a - b| of each output."""
    from polygraphy import comparator
    from polygraphy.comparator import Comparator, IterationResult, RunResults

    results = RunResults()
    results.append(("onnxruntime", [IterationResult(ort_out, runner_name="onnxruntime")]))
    results.append(("pytorch", [IterationResult({k: _np(v) for k, v in torch_out.items()}, runner_name="pytorch")]))
    simple = getattr(comparator, "SimpleCompareFunc", None) or comparator.CompareFunc.simple  # NOTE: renamed in 0.5x
    accuracy = Comparator.compare_accuracy(results, compare_func=simple(atol=atol, rtol=0.0))
    if not hasattr(accuracy, "items"):  # NOTE: Polygraphy >= 0.50 returns one result per compare function
        (accuracy,) = accuracy
    first_iteration = accuracy[("onnxruntime", "pytorch")][0]
    return {name: float(r.max_absdiff) for name, r in first_iteration.items()}


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
    with OrtGraph(path) as ort:  # one session for the prefill and the decode step
        return _decoder_checks(model, ort, atol)


def _decoder_checks(model: Glm4vForConditionalGeneration, ort: OrtGraph, atol: float) -> list[ParityResult]:
    graph = DecoderGraph(model).eval()
    t = model.cfg.text
    dtype = graph.lm_head.weight.dtype
    names_in, names_out = decoder_io_names(t.num_hidden_layers)
    b, s, pad = 2, 5, 2
    ids, pos, mask = _decoder_case(model, b, s, pad)
    embeds = model.embed(ids.flatten()).view(b, s, -1).to(dtype)
    empty = [torch.zeros(b, t.num_key_value_heads, 0, t.head_dim, dtype=dtype)] * (2 * t.num_hidden_layers)
    results = []
    feeds = [embeds, pos, mask, *empty]
    ort_out = ort.run(names_in, feeds)  # name -> array
    results += _compare("prefill", graph(*feeds), ort_out, names_out, atol)
    for row in range(b):  # real tokens of each row against the production model
        keep = mask[row] > 0
        ref = _model_logits(model, ids[row][keep], pos[:, row][:, keep])
        results.append(ParityResult("llm", "prefill", f"logits vs model (row {row})",
                                    _diff(ort_out["logits"][row][keep.numpy()], ref), atol))
    # decode: one new token per row over the prefill's KV
    nxt = torch.tensor([[7], [11]])
    npos = pos[:, :, -1:] + 1
    feeds = [model.embed(nxt.flatten()).view(b, 1, -1).to(dtype), npos, torch.ones(b, s + 1, dtype=torch.long)]
    feeds[2][1, :pad] = 0
    feeds += [torch.from_numpy(ort_out[n]) for n in names_out[1:]]  # present -> past
    ort_dec = ort.run(names_in, feeds)
    results += _compare("decode", graph(*feeds), ort_dec, names_out, atol)
    for row in range(b):
        keep = mask[row] > 0
        full_ids = torch.cat((ids[row][keep], nxt[row]))
        full_pos = torch.cat((pos[:, row][:, keep], npos[:, row]), dim=1)
        ref = _model_logits(model, full_ids, full_pos)[-1]
        results.append(ParityResult("llm", "decode", f"logits vs model (row {row})",
                                    _diff(ort_dec["logits"][row, -1], ref), atol))
    return results


def _compare(case: str, torch_out, ort_out, names: list[str], atol: float) -> list[ParityResult]:
    """The wrapper's outputs vs onnxruntime's, every one by name (Polygraphy): logits, and the worst present KV."""
    diffs = max_abs_diffs(ort_out, dict(zip(names, torch_out)), atol)
    worst_kv = max((diffs[n] for n in names[1:]), default=0.0)
    return [ParityResult("llm", case, "logits", diffs[names[0]], atol),
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
    with OrtGraph(path) as ort:
        ort_out = ort.run(VISION_INPUTS, feeds)  # {"image_embeds": [N / 4, H]}
    (name, out), = ort_out.items()
    wrapper = VisionGraph(visual).eval()(*feeds)
    ref = visual(pixels, list(grid_thw))
    return [ParityResult("visual", "images", name, max_abs_diffs(ort_out, {name: wrapper}, atol)[name], atol),
            ParityResult("visual", "images", f"{name} vs model", _diff(out, ref), atol)]
