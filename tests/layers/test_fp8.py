"""The fp8 mode's numerics (layers/fp8.py): the CPU reference, and on a GPU the Triton quantizer, the GEMV on
e4m3 weights and torch._scaled_mm at the 9B shapes. Its sm_90 compiles run with the INT8 ones (test_quant.py)."""

from __future__ import annotations

import pytest
import torch

from autoglm_trt.layers import fp8
from autoglm_trt.layers import quant as Q
from test_quant import rel_err  # noqa: I001 - the sibling test module (pytest puts this folder on the path)


def test_fp8_reference_quantizes_rows_and_channels_to_e4m3() -> None:
    torch.manual_seed(0)
    w, x = torch.randn(48, 64) * 0.02, torch.randn(5, 64) * 3
    q, s = fp8.quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and torch.allclose(q.float().abs().amax(1), torch.full((48,), 448.0))
    assert float((q.float() * s[:, None] - w).abs().max()) <= float(w.abs().max()) / 16  # 3 mantissa bits
    xq, xs = fp8.quantize_rows_reference(x)
    assert torch.allclose(xs, x.abs().amax(1) / 448) and float(xq.float().abs().max()) == 448.0
    y = fp8.fp8_linear(x, q, s, torch.ones(48), None)
    assert torch.equal(y, fp8.fp8_reference(x, q, s, torch.ones(48)))
    assert rel_err(y, x @ w.t() + 1) < 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 3, 8, 300])
def test_gpu_fp8_linear_at_9b_shapes(m) -> None:
    from autoglm_trt.plugins import int8_gemm as G

    if torch.cuda.get_device_capability() < fp8.MIN_CAPABILITY:
        pytest.skip("no FP8 tensor cores")
    torch.manual_seed(0)
    for n, k in ((4608, 4096), (4096, 13696)):
        x, w = torch.randn(m, k, device="cuda").bfloat16(), torch.randn(n, k, device="cuda") * 0.02
        b = torch.randn(n, device="cuda").bfloat16()
        q, s = fp8.quantize_weight(w)
        xq, xs = G.quantize_per_token(x, fp8=True)
        rq, rs = fp8.quantize_rows_reference(x)
        # NOTE: the scales may differ in their last fp32 bit (H100: ~0.3% of values then round to the other
        # e4m3 neighbour, one step = 1/8 relative at most)
        off = xq.float() != rq.float()
        assert float(off.float().mean()) < 0.01 and float((xs - rs).abs().max() / rs.max()) < 1e-6
        assert bool(((xq.float() - rq.float()).abs() <= rq.float().abs() / 8 + 1e-3)[off].all())
        y = fp8.fp8_linear(x, q, s, b, G)  # m <= GEMV_ROWS: the GEMV on bf16 x; else per-token FP8 on the tensor cores
        ref = fp8.fp8_reference(x, q, s, b) if m > fp8.GEMV_ROWS else Q.w8a16_reference(x, q, s, b)
        assert rel_err(y, ref) < 1e-2 and rel_err(y, (x.float() @ w.t() + b.float())) < 0.06


@pytest.mark.parametrize("mode", ["fp8", "int8-wo"])
def test_fp8_mode_quantizes_the_vision_tower_at_load(tiny_model_dir, mode) -> None:
    from autoglm_trt.models.loader import apply_quantization, load_model

    model = load_model(tiny_model_dir, dtype="float32", show_progress=False)
    grids = [(1, 4, 6), (1, 10, 8)]
    pixels = torch.randn(4 * 6 + 80, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model.encode_images(pixels, grids)  # [merged tokens, hidden]
        apply_quantization(model, mode, None)
        got = model.encode_images(pixels, grids)
    linears = [m for m in model.visual.blocks.modules() if isinstance(m, torch.nn.Linear)]
    quantized = [m for m in model.visual.modules() if isinstance(m, fp8.Fp8Linear)]
    if mode == "int8-wo":  # only fp8 touches the tower
        assert not quantized and torch.equal(got, ref)
        return
    assert not linears and len(quantized) == 5 * model.cfg.vision.depth  # qkv, proj, gate, up, down
    assert all(m.weight.dtype == fp8.FP8 for m in quantized)
    assert not any(isinstance(m, fp8.Fp8Linear) for m in model.visual.merger.modules())  # stays bf16
    assert 0 < rel_err(got, ref) < 0.01
