"""Accuracy of an INT8 model against its float original: next-token agreement, KL, perplexity.

Both models run the same prompts (plain forward, no cache). At every text position (image tokens
excluded) the next-token distributions are compared: top-1 agreement and mean KL(p_float || p_quantized).
Perplexity is measured on a shipped held-out text. On random-weight checkpoints the figures are
what they are; they still show whether quantization moved the function.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from autoglm_trt.calibration.cache import load_calibration
from autoglm_trt.calibration.runner import resolve_device
from autoglm_trt.calibration.samples import HELDOUT_DATASET, HELDOUT_TEXT, encode, forward, load_samples
from autoglm_trt.layers.quantize import quantize_model
from autoglm_trt.processing.inputs import InputProcessor
from autoglm_trt.utils.logging import log
from autoglm_trt.utils.progress import step_progress

_CHUNK = 256  # positions per LM-head call (bounds the [chunk, vocab] fp32 logits)


class _Totals:
    def __init__(self) -> None:
        self.positions, self.agree, self.kl = 0, 0, 0.0
        self.nll_ref, self.nll_q = 0.0, 0.0

    def metrics(self) -> dict:
        n = max(self.positions, 1)
        return {"positions": self.positions, "top1_agreement": round(self.agree / n, 6),
                "mean_kl": round(self.kl / n, 8)}


def _compare(ref_model, q_model, h_ref: torch.Tensor, h_q: torch.Tensor, keep: torch.Tensor,
             targets: torch.Tensor | None, tot: _Totals) -> None:
    """Accumulate agreement / KL (and NLL of `targets`) over the kept positions, in chunks."""
    idx = keep.nonzero().flatten()
    for chunk in idx.split(_CHUNK):
        lp_ref = F.log_softmax(ref_model.compute_logits(h_ref[chunk]), dim=-1)  # [c, V] fp32
        lp_q = F.log_softmax(q_model.compute_logits(h_q[chunk]), dim=-1)
        tot.positions += chunk.numel()
        tot.agree += int((lp_ref.argmax(-1) == lp_q.argmax(-1)).sum())
        tot.kl += float((lp_ref.exp() * (lp_ref - lp_q)).sum())
        if targets is not None:
            t = targets[chunk].unsqueeze(1)
            tot.nll_ref -= float(lp_ref.gather(1, t).sum())
            tot.nll_q -= float(lp_q.gather(1, t).sum())


@torch.inference_mode()
def _run_set(ref_model, q_model, processor, samples, device, max_pixels, label: str | None = None) -> dict:
    tot = _Totals()
    with step_progress(label or "", len(samples), enabled=label is not None) as advance:
        for sample in samples:
            prompt = encode(processor, sample, max_pixels)
            ids = torch.tensor(prompt.prompt_token_ids, device=device)
            keep = ids != processor.image_token_id
            _compare(ref_model, q_model, forward(ref_model, prompt, device), forward(q_model, prompt, device),
                     keep, None, tot)
            advance()
    return {"samples": len(samples), **tot.metrics()}


@torch.inference_mode()
def _perplexity(ref_model, q_model, processor, text: str, device, max_tokens: int) -> dict:
    prompt = processor.process_text(text)
    prompt.prompt_token_ids = prompt.prompt_token_ids[:max_tokens]
    prompt.mrope_positions = prompt.mrope_positions[:, :max_tokens]
    ids = torch.tensor(prompt.prompt_token_ids, device=device)
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[-1] = False  # the last position has no next token
    tot = _Totals()
    _compare(ref_model, q_model, forward(ref_model, prompt, device), forward(q_model, prompt, device),
             keep, torch.roll(ids, -1), tot)
    n = max(tot.positions, 1)
    ppl_ref, ppl_q = math.exp(tot.nll_ref / n), math.exp(tot.nll_q / n)
    return {"tokens": tot.positions, "reference": round(ppl_ref, 4), "quantized": round(ppl_q, 4),
            "relative_change": round(ppl_q / ppl_ref - 1.0, 6), **tot.metrics()}


def _report(ref, q, model_dir, dev, header: dict, calib, samples, max_pixels, max_ppl_tokens,
            show_progress: bool = False) -> dict:
    """header + the three comparisons every report holds: calibration prompts (calib's set and image size, or the
    shipped set when calib is None), held-out prompts, perplexity text."""
    info = calib.info if calib is not None else {}
    max_pixels = max_pixels if max_pixels is not None else info.get("max_pixels")
    calib_set = load_samples(info.get("dataset"), samples or (calib.num_samples if calib is not None else None) or None)
    processor = InputProcessor.from_dir(model_dir)
    label = f"report {header['mode']}" if show_progress else None
    calib_row = _run_set(ref, q, processor, calib_set, dev, max_pixels, label and f"{label}: calibration set")
    heldout = _run_set(ref, q, processor, load_samples(HELDOUT_DATASET, samples), dev, max_pixels,
                       label and f"{label}: held-out set")
    if label:
        log(f"{label}: perplexity text")
    ppl = _perplexity(ref, q, processor, HELDOUT_TEXT.read_text(encoding="utf-8"), dev, max_ppl_tokens)
    return {**header, "device": str(dev), "reference_dtype": _dtype_name(ref),
            "calibration_method": calib.method if calib is not None else None,
            "calibration_set": calib_row, "heldout_set": heldout, "perplexity": ppl}


def _dtype_name(model) -> str:
    """The model's float dtype (its first floating-point parameter: INT8 weights are not it)."""
    dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point and p.element_size() > 1)
    return str(dtype).replace("torch.", "")


def accuracy_report(model_dir: str | Path, calib_dir: str | Path, mode: str, *, act_quant: str = "dynamic",
                    device: str = "auto", dtype: str = "auto", samples: int | None = None,
                    max_pixels: int | None = None, max_ppl_tokens: int = 2048, show_progress: bool = False) -> dict:
    """INT8 (`mode`, calibrated from calib_dir) vs the float model on the calibration and held-out sets."""
    from autoglm_trt.models.loader import load_model

    calib = load_calibration(calib_dir)
    dev = resolve_device(device)
    ref = load_model(model_dir, dtype=dtype, device=dev, show_progress=show_progress)
    q = load_model(model_dir, dtype=dtype, device=dev, show_progress=show_progress)
    quantize_model(q, mode, calib if mode in ("w8a8", "int4-awq") else None, act_quant=act_quant,
                   smooth_alpha=calib.smooth_alpha)
    header = {"mode": mode, "act_quant": act_quant if mode == "w8a8" else None}
    return _report(ref, q, model_dir, dev, header, calib, samples, max_pixels, max_ppl_tokens, show_progress)


def engine_accuracy_report(model_dir: str | Path, engine_dir: str | Path, *, device: str = "auto",
                           samples: int | None = None, max_pixels: int | None = None, max_ppl_tokens: int = 2048,
                           show_progress: bool = False) -> dict:
    """A built tp-1 engine (its pre-quantized rank0.safetensors, as `serve` loads it) vs the checkpoint it was
    built from, read in the float dtype the engine loads in, so that only quantization differs. The calibration
    prompts are the engine's calibration/ set when it has one, else the shipped set."""
    from autoglm_trt.formats.manifest import read_manifest
    from autoglm_trt.models.loader import load_model

    manifest = read_manifest(engine_dir)
    dev = resolve_device(device)
    q = load_model(engine_dir, device=dev, show_progress=show_progress)
    ref = load_model(model_dir, dtype=_dtype_name(q), device=dev, show_progress=show_progress)
    calib_dir = Path(engine_dir) / "calibration"
    calib = load_calibration(calib_dir) if calib_dir.is_dir() else None
    header = {"mode": manifest.quantization["mode"], "act_quant": manifest.quantization.get("act_quant")}
    return _report(ref, q, model_dir, dev, header, calib, samples, max_pixels, max_ppl_tokens, show_progress)
