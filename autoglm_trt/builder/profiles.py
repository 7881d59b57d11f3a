"""TensorRT optimization profiles (min/opt/max per dynamic input) for the exported graphs.

The decoder gets two profiles, as TensorRT Edge-LLM does: "context" (prompts, chunked prefill: many
tokens per sequence, any past length) and "generation" (one token per sequence over a long past).
The runtime profile records the limits the torch backend was built for (batch, tokens, sequence).
"""

from __future__ import annotations

from autoglm_trt.builder.options import ShapeLimits
from autoglm_trt.config import ModelConfig

Shape = list[int]


def _dims(min_: Shape, opt: Shape, max_: Shape) -> dict[str, Shape]:
    return {"min": min_, "opt": opt, "max": max_}


def _decoder_inputs(cfg: ModelConfig, b: tuple[int, int, int], s: tuple[int, int, int],
                    past: tuple[int, int, int], max_len: int) -> dict[str, dict[str, Shape]]:
    """b, s, past: (min, opt, max) of batch, new tokens and past length; past + new <= max_len."""
    t = cfg.text
    h, kvh, d = t.hidden_size, t.num_key_value_heads, t.head_dim
    out = {
        "inputs_embeds": _dims(*([b[i], s[i], h] for i in range(3))),
        "position_ids": _dims(*([3, b[i], s[i]] for i in range(3))),
        "attention_mask": _dims(*([b[i], min(max_len, past[i] + s[i])] for i in range(3))),
    }
    for layer in range(t.num_hidden_layers):
        for kind in ("key", "value"):
            out[f"past_key_values.{layer}.{kind}"] = _dims(*([b[i], kvh, past[i], d] for i in range(3)))
    return out


def llm_profiles(cfg: ModelConfig, lim: ShapeLimits) -> dict[str, dict]:
    max_s = min(lim.max_num_tokens, lim.max_seq_len)
    opt_s = min(512, max_s)
    max_past = max(1, lim.max_seq_len - 1)  # NOTE: the last chunk of a long prompt sits over a long past
    context = _decoder_inputs(cfg, (1, 1, lim.max_batch_size), (1, opt_s, max_s), (0, 0, max_past),
                              lim.max_seq_len)
    opt_b = max(1, lim.max_batch_size // 2)
    generation = _decoder_inputs(cfg, (1, opt_b, lim.max_batch_size), (1, 1, 1),
                                 (1, max(1, max_past // 2), max_past), lim.max_seq_len)
    return {"context": context, "generation": generation}


def visual_profiles(cfg: ModelConfig, lim: ShapeLimits) -> dict[str, dict]:
    v = cfg.vision
    width = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    n = (4, min(1024, lim.max_image_patches), lim.max_image_patches)
    return {"default": {
        "pixel_values": _dims(*([n[i], width] for i in range(3))),
        "patch_pos": _dims(*([n[i], 2] for i in range(3))),
        "patch_grid": _dims(*([n[i], 2] for i in range(3))),
        "segment_ids": _dims(*([n[i]] for i in range(3))),
    }}


def runtime_profile(lim: ShapeLimits, page_size: int, graph_sizes: tuple[int, ...]) -> dict:
    """What the torch backend was built for (min/opt/max of the step shapes it serves)."""
    return {
        "batch_size": _dims([1], [max(1, lim.max_batch_size // 2)], [lim.max_batch_size]),
        "num_tokens": _dims([1], [min(512, lim.max_num_tokens)], [lim.max_num_tokens]),
        "seq_len": _dims([1], [min(2048, lim.max_seq_len)], [lim.max_seq_len]),
        "image_patches": _dims([4], [min(1024, lim.max_image_patches)], [lim.max_image_patches]),
        "page_size": page_size,
        "cuda_graph_batch_sizes": list(graph_sizes),
    }


def all_profiles(cfg: ModelConfig, lim: ShapeLimits, page_size: int = 16,
                 graph_sizes: tuple[int, ...] = ()) -> dict:
    return {"runtime": runtime_profile(lim, page_size, graph_sizes), "llm": llm_profiles(cfg, lim),
            "visual": visual_profiles(cfg, lim)}
