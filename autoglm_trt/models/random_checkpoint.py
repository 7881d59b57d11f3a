"""`autoglm-trt init-random`: write a complete Hugging Face GLM-4.1V model directory with random weights.

The layout is the real one (config.json, sharded safetensors + index, generation_config.json, tokenizer,
chat template, preprocessor config), so the same loading code serves the downloaded model. Tensors are
generated and written shard by shard: the 9B preset never holds the whole model in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from autoglm_trt.errors import UserError

SPECIAL_IDS = dict(pad=151329, eos=[151329, 151336, 151338, 151348], image=151343, video=151344,
                   image_start=151339, image_end=151340, video_start=151341, video_end=151342)


@dataclass(frozen=True)
class Preset:
    text: dict
    vision: dict
    dtype: str
    shard_bytes: int


PRESETS = {
    "phone-9b": Preset(
        text=dict(vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_hidden_layers=40,
                  num_attention_heads=32, num_key_value_heads=2, mrope_section=[8, 12, 12],
                  max_position_embeddings=65536),
        vision=dict(depth=24, hidden_size=1536, num_heads=12, intermediate_size=13696, out_hidden_size=4096),
        dtype="bfloat16", shard_bytes=4 << 30),
    "tiny": Preset(
        # head_dim 32 (16 rotary dims = 8 pairs for M-RoPE), GQA 2:1 so that TP=2 splits the KV heads
        text=dict(vocab_size=151552, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, mrope_section=[2, 3, 3],
                  max_position_embeddings=65536),
        vision=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=96, out_hidden_size=128),
        dtype="float32", shard_bytes=32 << 20),
}


def build_config(preset: Preset, dtype: str) -> dict:
    t, v = dict(preset.text), preset.vision
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "mrope_section": t.pop("mrope_section")}
    text_config = dict(model_type="glm4v_text", hidden_act="silu", rms_norm_eps=1e-5, attention_bias=True,
                       attention_dropout=0.0, initializer_range=0.02, use_cache=True, rope_parameters=rope,
                       pad_token_id=SPECIAL_IDS["pad"], eos_token_id=SPECIAL_IDS["eos"], dtype=dtype, **t)
    vision_config = dict(model_type="glm4v_vision", hidden_act="silu", attention_bias=False, attention_dropout=0.0,
                         image_size=336, patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                         in_channels=3, rms_norm_eps=1e-5, initializer_range=0.02,
                         rope_parameters={"rope_type": "axial", "rope_theta": 10000.0}, **v)
    return dict(architectures=["Glm4vForConditionalGeneration"], model_type="glm4v", dtype=dtype,
                text_config=text_config, vision_config=vision_config, tie_word_embeddings=False,
                image_token_id=SPECIAL_IDS["image"], video_token_id=SPECIAL_IDS["video"],
                image_start_token_id=SPECIAL_IDS["image_start"], image_end_token_id=SPECIAL_IDS["image_end"],
                video_start_token_id=SPECIAL_IDS["video_start"], video_end_token_id=SPECIAL_IDS["video_end"],
                pad_token_id=SPECIAL_IDS["pad"], eos_token_id=SPECIAL_IDS["eos"], transformers_version="5.17.0")


def text_weight_shapes(t: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, inter, heads, kv = t["hidden_size"], t["intermediate_size"], t["num_attention_heads"], t["num_key_value_heads"]
    d = h // heads
    out = [("model.language_model.embed_tokens.weight", (t["vocab_size"], h))]
    for i in range(t["num_hidden_layers"]):
        p = f"model.language_model.layers.{i}."
        out += [(p + n + ".weight", (h,)) for n in ("input_layernorm", "post_self_attn_layernorm",
                                                   "post_attention_layernorm", "post_mlp_layernorm")]
        for name, rows in (("q_proj", heads * d), ("k_proj", kv * d), ("v_proj", kv * d)):
            out += [(p + f"self_attn.{name}.weight", (rows, h)), (p + f"self_attn.{name}.bias", (rows,))]
        out += [(p + "self_attn.o_proj.weight", (h, heads * d)), (p + "mlp.gate_up_proj.weight", (2 * inter, h)),
                (p + "mlp.down_proj.weight", (h, inter))]
    return out + [("model.language_model.norm.weight", (h,)), ("lm_head.weight", (t["vocab_size"], h))]


def vision_weight_shapes(v: dict) -> list[tuple[str, tuple[int, ...]]]:
    c, o, i = v["hidden_size"], v["out_hidden_size"], v["intermediate_size"]
    p = "model.visual."
    out = [(p + "patch_embed.proj.weight", (c, 3, 2, 14, 14)), (p + "patch_embed.proj.bias", (c,)),
           (p + "post_conv_layernorm.weight", (c,)), (p + "embeddings.position_embedding.weight", (576, c))]
    for j in range(v["depth"]):
        b = f"{p}blocks.{j}."
        out += [(b + "norm1.weight", (c,)), (b + "norm2.weight", (c,)), (b + "attn.qkv.weight", (3 * c, c)),
                (b + "attn.proj.weight", (c, c)), (b + "mlp.gate_proj.weight", (o, c)),
                (b + "mlp.up_proj.weight", (o, c)), (b + "mlp.down_proj.weight", (c, o))]
    m = p + "merger."
    return out + [(p + "post_layernorm.weight", (c,)), (p + "downsample.weight", (o, c, 2, 2)),
                  (p + "downsample.bias", (o,)), (m + "proj.weight", (o, o)),
                  (m + "post_projection_norm.weight", (o,)), (m + "post_projection_norm.bias", (o,)),
                  (m + "gate_proj.weight", (i, o)), (m + "up_proj.weight", (i, o)), (m + "down_proj.weight", (o, i))]


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """Norm weights near 1, everything else N(0, 0.02): random, but a forward pass stays well scaled."""
    x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 0.02
    if len(shape) == 1 and ("norm" in name) and name.endswith(".weight"):
        x = x + 1.0
    return x.to(dtype).cpu()


def write_weights(out: Path, shapes: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, shard_bytes: int,
                  seed: int, device: torch.device, advance) -> None:
    gen = torch.Generator(device=device).manual_seed(seed)
    groups, cur, size = [], [], 0
    for name, shape in shapes:  # plan shards first so file names can carry the total
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if cur and size + nbytes > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nbytes
    groups.append(cur)
    weight_map, total = {}, 0
    for k, group in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: random_tensor(n, s, gen, dtype, device) for n, s in group}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        for n, t in tensors.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
        advance(sum(t.numel() * t.element_size() for t in tensors.values()))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def init_random(out_dir: str | Path, preset: str = "tiny", seed: int = 0, dtype: str | None = None,
                device: str = "cpu", show_progress: bool = True) -> Path:
    from autoglm_trt.processing.tokenizer_files import write_processing_files
    from autoglm_trt.utils.progress import byte_progress

    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    dtype = dtype or p.dtype
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise UserError(f"--dtype must be bfloat16, float16 or float32, not {dtype!r}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    cfg = build_config(p, dtype)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen_cfg = {"eos_token_id": SPECIAL_IDS["eos"], "pad_token_id": SPECIAL_IDS["pad"], "do_sample": False,
               "transformers_version": "5.17.0"}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    write_processing_files(out, "autoglm-phone-9b" if preset == "phone-9b" else preset)
    shapes = text_weight_shapes(cfg["text_config"]) + vision_weight_shapes(cfg["vision_config"])
    total = sum(torch.Size(s).numel() for _, s in shapes) * torch_dtype.itemsize
    with byte_progress(f"Writing random {preset} weights", total, enabled=show_progress) as advance:
        write_weights(out, shapes, torch_dtype, p.shard_bytes, seed, torch.device(device), advance)
    return out
