"""Calibration fixtures: one small calibration of the tiny checkpoint, one exported MLP block graph."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def calib_dir(tiny_model_dir, tmp_path_factory):
    from autoglm_trt.calibration import CalibrateOptions, calibrate

    out = tmp_path_factory.mktemp("calib")
    opts = CalibrateOptions(method="entropy", samples=2, max_pixels=40_000)
    calibrate(tiny_model_dir, out, opts=opts, device="cpu", show_progress=False)
    return out


class MlpBlock(torch.nn.Module):
    """post_attention_layernorm -> gate_up_proj -> SiLU * up -> down_proj of decoder layer 0."""

    def __init__(self, layer) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([layer])  # NOTE: keeps the 'layers.0.' initializer names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layers[0]
        return layer.mlp(layer.post_attention_layernorm(x))


@pytest.fixture(scope="session")
def mlp_onnx(our_model, tmp_path_factory):
    """(path, float block) of layer 0's MLP exported with torch.onnx.export(dynamo=True)."""
    import copy

    block = MlpBlock(copy.deepcopy(our_model.language_model.layers[0])).eval()
    path = tmp_path_factory.mktemp("onnx") / "mlp.onnx"
    x = torch.randn(6, block.layers[0].mlp.down_proj.out_features)
    torch.onnx.export(block, (x,), str(path), dynamo=True, input_names=["x"], output_names=["y"],
                      dynamic_shapes=({0: torch.export.Dim("T")},), verbose=False)
    return path, block
