"""INT4 weight-only (layers/int4.py, layers/int4_model.py): format, reference, transform, round trips (CPU).

The Triton kernels are tested in tests/plugins/test_int4_gemm.py (interpreter, sm_90 compile, GPU).
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from autoglm_trt.layers import int4 as L
from autoglm_trt.layers import int4_model as M
from autoglm_trt.layers import quant as Q
from autoglm_trt.layers.linear import ColumnParallelLinear, RowParallelLinear


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


# ---- packing and the quantizer --------------------------------------------------------------------------
def test_pack_unpack_round_trip_every_nibble_and_the_sign_bit() -> None:
    q = torch.randint(0, 16, (7, 64), generator=torch.Generator().manual_seed(0))
    q[0] = 15  # all ones: the int32 word is -1
    q[1, 7::8] = 8  # the top nibble's high bit is the sign bit of every word
    packed = L.pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (7, 8)
    assert torch.equal(L.unpack_int4(packed), q.to(torch.uint8))
    assert int(packed[0, 0]) == -1 and int(packed[2, 0]) == sum(int(q[2, i]) << (4 * i) for i in range(8)) - (
        2**32 if int(q[2, 7]) >= 8 else 0)  # nibble i of word j is q[:, 8j + i]
    with pytest.raises(ValueError, match="multiple of 8"):
        L.pack_int4(torch.zeros(2, 12, dtype=torch.int32))


@pytest.mark.parametrize("k,group", [(256, 128), (200, 64), (96, 128), (6848, 128)])  # 6848: down_proj at TP 2
def test_quantize_within_half_a_step_with_a_short_last_group(k: int, group: int) -> None:
    w = torch.randn(24, k) * torch.logspace(-2, 0, 24)[:, None]
    w[3, :group] = 0.0  # an all-zero group
    w[4, :group] = 0.25  # a constant group (its range widens to hold 0)
    packed, scale, zero = L.quantize_int4(w, group)
    gs = -(-k // group)
    assert scale.shape == zero.shape == (24, gs) and scale.dtype == zero.dtype == torch.float16
    assert bool((zero == zero.round()).all()) and 0 <= float(zero.min()) and float(zero.max()) <= 15
    deq = L.dequantize_int4(packed, scale, zero, group)
    step = scale.float().repeat_interleave(group, 1)[:, :k]
    assert bool(((deq - w).abs() <= 0.51 * step + 1e-7).all())  # NOTE: 0.5 step, + the fp16 scale's rounding
    assert bool((deq[3, :group] == 0).all()) and float((deq[4, :group] - 0.25).abs().max()) < 1e-3
    assert bool((L.dequantize_int4(*L.quantize_int4(torch.zeros(2, k), group), group) == 0).all())


def test_bad_shapes_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="in_features % 8"):
        L.quantize_int4(torch.randn(4, 100), 128)
    with pytest.raises(ValueError, match="power-of-two group"):
        L.quantize_int4(torch.randn(4, 128), 96)


def test_clipping_search_is_never_worse_and_helps_gaussian_weights() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 512, generator=g)  # a group's extremes are rare: finer steps for the rest pay (AWQ's clip)
    weight = torch.rand(512, generator=g) + 0.1
    clip = M.search_clip(w, 128, weight)
    assert clip.shape == (64, 4) and float(clip.min()) >= min(M.CLIP_GRID) and float(clip.max()) <= 1.0
    assert L.quant_error(w, 128, clip, weight) < 0.95 * L.quant_error(w, 128, None, weight)
    flat = torch.rand(64, 512, generator=g) * 2 - 1  # uniform: every value as likely as the extremes
    assert L.quant_error(flat, 128, M.search_clip(flat, 128, weight), weight) <= L.quant_error(flat, 128, None, weight)


# ---- the reference and the linear method -----------------------------------------------------------------
def test_reference_is_the_dequantized_matmul_and_close_to_float() -> None:
    x, w, b = torch.randn(5, 256), torch.randn(40, 256) * 0.05, torch.randn(40)
    packed, scale, zero = L.quantize_int4(w, 128)
    y = L.int4_reference(x, packed, scale, zero, 128, b)
    assert torch.allclose(y, x @ L.dequantize_int4(packed, scale, zero, 128).t() + b, atol=1e-5)
    assert rel_err(y - b, x @ w.t()) < 0.12  # 4 bits, group 128: ~0.05-0.1 on Gaussian weights
    assert L.int4_reference(x.to(torch.bfloat16), packed, scale, zero, 128).dtype == torch.bfloat16


def test_int4_method_on_column_and_row_parallel_linears() -> None:
    col, row = ColumnParallelLinear(256, 48, bias=True), RowParallelLinear(256, 48, bias=True)
    for lin in (col, row):
        lin.weight.data.normal_(0, 0.05)
        lin.bias.data.normal_()
        fl = copy.deepcopy(lin)
        L.quantize_linear(lin)
        assert lin.weight.dtype == torch.int32 and lin.weight.shape == (48, 32)
        assert lin.weight_scale.shape == lin.weight_zero.shape == (48, 2)
        x = torch.randn(2, 3, 256)
        assert lin(x).shape == (2, 3, 48)
        assert torch.allclose(lin(x), L.float_linear(x, lin) + (lin.bias if lin is row else 0), atol=1e-5)
        assert rel_err(lin(x), fl(x)) < 0.12


# ---- the tiny model -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 151000, (48,), generator=g), torch.arange(48).expand(3, -1)


def logits(m, batch) -> torch.Tensor:
    ids, pos = batch
    with torch.inference_mode():
        return m.compute_logits(m(m.embed(ids), pos))  # [T, V]


def input_stats(m, batch) -> dict[str, torch.Tensor]:
    """E[x^2] per input channel of every decoder linear (what calibration.awq.AwqObserver records)."""
    sq, handles = {}, []
    for key, lin in Q.decoder_linears(m):
        handles.append(lin.register_forward_pre_hook(
            lambda _m, args, key=key: sq.__setitem__(key, (args[0].float() ** 2).reshape(-1, args[0].shape[-1])
                                                     .mean(0))))
    logits(m, batch)
    for h in handles:
        h.remove()
    return sq


def random_scales(model, seed: int = 0) -> dict[str, torch.Tensor]:
    """AWQ-shaped scales for every decoder linear (o_proj's tied across the query heads of a kv head)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, lin in Q.decoder_linears(model):
        s = torch.rand(lin.in_features, generator=g) * 3 + 0.3
        if key.endswith("o_proj"):
            attn = Q.decoder_layers(model)[int(key.split(".")[1])].self_attn
            idx = M.heads_of_kv(attn)
            s = s[: int(idx.max()) + 1][idx]
        out[key] = s
    return out


def test_folding_awq_scales_leaves_the_float_function_unchanged(our_model, batch) -> None:
    ref = logits(our_model, batch)
    m = copy.deepcopy(our_model)
    M.fold_awq_scales(m, {f"model.language_model.{k}": v for k, v in random_scales(m).items()})  # any prefix
    layer, orig = m.language_model.layers[1], our_model.language_model.layers[1]
    assert not torch.equal(layer.mlp.gate_up_proj.weight, orig.mlp.gate_up_proj.weight)
    assert not torch.equal(layer.self_attn.qkv_proj.bias, orig.self_attn.qkv_proj.bias)  # v bias / s
    assert float((logits(m, batch) - ref).abs().max()) <= 1e-4 * max(1.0, float(ref.abs().max()))


def test_o_proj_scales_must_be_tied_within_a_kv_group(our_model) -> None:
    m = copy.deepcopy(our_model)
    s = torch.ones(m.language_model.layers[0].self_attn.o_proj.in_features)
    s[0] = 2.0  # head 0 only: head 1 reads the same kv head
    with pytest.raises(ValueError, match="kv head"):
        M.fold_awq_scales(m, {"layers.0.self_attn.o_proj": s})


def dequantized_copy(m):
    """The float model that an INT4 model computes: every INT4 / INT8 weight replaced by its dequantized value."""
    f = copy.deepcopy(m)
    for _, lin in Q.decoder_linears(f):
        w = L.dequantized_linear(lin)
        del lin.weight_scale, lin.weight_zero
        lin.weight, lin.quant_method = torch.nn.Parameter(w, requires_grad=False), None
    head = f.lm_head
    head.weight = torch.nn.Parameter(Q.dequantize_weight(head.weight, head.weight_scale), requires_grad=False)
    del head.weight_scale
    return f


@pytest.mark.parametrize("awq,clip,max_rel", [(False, False, 0.3), (False, True, 0.3), (True, True, None)])
def test_int4_tiny_model_computes_its_dequantized_weights(our_model, batch, awq, clip, max_rel) -> None:
    ref = logits(our_model, batch)
    m = copy.deepcopy(our_model)
    M.quantize_model_int4(m, random_scales(m) if awq else None, input_stats(our_model, batch) if clip else None)
    out = logits(m, batch)
    assert float((out - logits(dequantized_copy(m), batch)).abs().max()) <= 1e-5 * float(ref.abs().max())
    if max_rel is not None:  # NOTE: random weights, 4 bits (int8-wo: 0.017 here); random AWQ scales only hurt
        assert rel_err(out, ref) < max_rel and float((out.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.4
    lin = m.language_model.layers[0].mlp.down_proj
    assert lin.weight.dtype == torch.int32 and isinstance(lin.quant_method, L.Int4Method)
    assert m.lm_head.weight.dtype == torch.int8 and m.quant_config["mode"] == "int4-awq"
    cfg = m.quant_config
    assert cfg["awq"] is awq and cfg["clip_search"] is clip and cfg["group_size"] == 128


def test_clipping_search_lowers_the_tiny_models_error(our_model, batch) -> None:
    ref = logits(our_model, batch)
    errs = []
    for stats in (None, input_stats(our_model, batch)):
        m = copy.deepcopy(our_model)
        M.quantize_model_int4(m, None, stats)
        errs.append(rel_err(logits(m, batch), ref))
    assert errs[1] < errs[0]


def test_state_dict_round_trip_gives_the_same_logits(our_model, batch, tiny_model_dir) -> None:
    """What build -> load does: quantize, save the state_dict; the same transform on a meta model (what the
    engine loader runs) lays out exactly those parameters, and the state loads into them strictly."""
    from autoglm_trt.config import ModelConfig
    from autoglm_trt.layers.quantize import quantize_model
    from autoglm_trt.models.checkpoint import build_model, materialize

    m = copy.deepcopy(our_model)
    M.quantize_model_int4(m, random_scales(m), input_stats(our_model, batch))
    fresh = build_model(ModelConfig.from_dir(tiny_model_dir), torch.float32, "meta")
    quantize_model(fresh, "int4-awq", None, lm_head=True)
    materialize(fresh, "cpu")
    fresh.load_state_dict(m.state_dict(), strict=True)
    assert torch.equal(logits(fresh, batch), logits(m, batch))
    keys = set(m.state_dict())
    for name in ("weight", "weight_scale", "weight_zero"):
        assert f"language_model.layers.1.self_attn.qkv_proj.{name}" in keys
    assert "lm_head.weight_scale" in keys


# ---- torch's tinygemm layout (benchmarks/bench_int4.py compares against it on the GPU) -------------------
def test_tinygemm_scales_and_zeros_describe_our_weights() -> None:
    script = Path(__file__).parents[2] / "benchmarks" / "bench_int4.py"
    spec = importlib.util.spec_from_file_location("bench_int4", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    w, x = torch.randn(64, 256) * 0.02, torch.randn(3, 256).to(torch.bfloat16)
    packed, scale, zero = L.quantize_int4(w, 128)
    tw = torch.ops.aten._convert_weight_to_int4pack_for_cpu(L.unpack_int4(packed).to(torch.int32), 8)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, tw, 128, bench.tinygemm_scales_and_zeros(scale, zero))
    assert rel_err(y, L.int4_reference(x.float(), packed, scale, zero, 128)) < 0.01  # bf16 scales there
