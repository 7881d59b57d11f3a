"""Q/DQ insertion on an exported decoder MLP block: structure, onnxruntime, and parity with PyTorch INT8."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from autoglm_trt.calibration import load_calibration
from autoglm_trt.calibration.onnx_qdq import (
    canonicalize_linear_inputs,
    check_qdq,
    find_linears,
    insert_qdq,
    session,
)
from autoglm_trt.errors import UserError
from autoglm_trt.layers.quant import quantize_model


def _run(path, x: np.ndarray, exact: bool = True) -> np.ndarray:
    return session(path, exact).run(None, {"x": x})[0]


def _torch_int8(block, calib, mode: str, act_quant: str = "static"):
    """The same block quantized by layers/quant.py (folded smoothing, static per-tensor activations)."""
    m = copy.deepcopy(block)  # quantize_model walks m.layers like a decoder's
    quantize_model(m, mode, calib if mode == "w8a8" else None, calib.smooth_alpha, act_quant=act_quant)
    return m


def test_qdq_graph_structure(mlp_onnx, calib_dir, tmp_path) -> None:
    src, _ = mlp_onnx
    keys = insert_qdq(src, tmp_path / "q.onnx", load_calibration(calib_dir), smooth=True)
    assert keys == ["layers.0.mlp.gate_up_proj", "layers.0.mlp.down_proj"]
    g = onnx.load(str(tmp_path / "q.onnx")).graph
    ops = [n.op_type for n in g.node]
    assert ops.count("QuantizeLinear") == 4 and ops.count("DequantizeLinear") == 4 and ops.count("Mul") >= 2
    tensors = {o for n in g.node for o in n.output}
    assert {"layers.0.mlp.gate_up_proj.input", "layers.0.mlp.down_proj.input",
            "layers.0.mlp.down_proj.smoothed_input"} <= tensors  # the calibration cache's names
    w_dq = [n for n in g.node if n.op_type == "DequantizeLinear" and n.name.endswith("weight_DQ")]
    assert all(onnx.helper.get_attribute_value(n.attribute[0]) == 0 for n in w_dq)  # per-channel, axis 0
    onnx.checker.check_model(onnx.load(str(tmp_path / "q.onnx")))


@pytest.mark.parametrize("weights_int8", [False, True])
def test_qdq_runs_in_onnxruntime_and_matches_pytorch_w8a8(mlp_onnx, calib_dir, tmp_path, weights_int8) -> None:
    src, block = mlp_onnx
    calib = load_calibration(calib_dir)
    dst = tmp_path / "q.onnx"
    insert_qdq(src, dst, calib, smooth=True, weights_int8=weights_int8)
    x = torch.randn(9, block.layers[0].mlp.down_proj.out_features, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        ref = block(x).numpy()
        emulated = _torch_int8(block, calib, "w8a8")(x).numpy()
    got = _run(dst, x.numpy())
    assert np.linalg.norm(got - emulated) / np.linalg.norm(emulated) < 1e-4  # the same INT8 function as PyTorch
    # NOTE: random x is far from the calibration data (static scales clip it): a sanity bound only
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.4
    fused = _run(dst, x.numpy(), exact=False)  # onnxruntime's own int8 kernels run it too
    assert fused.shape == got.shape and np.isfinite(fused).all()
    assert check_qdq(src, dst) < 0.4


def test_weight_only_qdq_matches_pytorch_int8_wo(mlp_onnx, calib_dir, tmp_path) -> None:
    src, block = mlp_onnx
    calib = load_calibration(calib_dir)
    insert_qdq(src, tmp_path / "wo.onnx", calib, smooth=False, activations=False, weights_int8=True)
    x = torch.randn(5, block.layers[0].mlp.down_proj.out_features, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        emulated = _torch_int8(block, calib, "int8-wo")(x).numpy()
    got = _run(tmp_path / "wo.onnx", x.numpy())
    assert np.abs(got - emulated).max() <= 1e-4 * max(1.0, np.abs(emulated).max())
    ops = [n.op_type for n in onnx.load(str(tmp_path / "wo.onnx")).graph.node]
    assert "QuantizeLinear" not in ops and ops.count("DequantizeLinear") == 2


def test_transposed_matmul_weights_and_foreign_graphs(calib_dir) -> None:
    """A MatMul reading Transpose(W [N, K]) gets per-channel axis 0 on W; graphs without our names are refused."""
    from onnx import TensorProto, helper, numpy_helper

    k, n = 128, 512
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((n, k)).astype(np.float32),
                                "model.language_model.layers.1.mlp.gate_up_proj.weight")
    nodes = [helper.make_node("Transpose", [w.name], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    sites = find_linears(model.graph)
    assert [(s.key, s.out_axis) for s in sites] == [("layers.1.mlp.gate_up_proj", 0)]
    assert canonicalize_linear_inputs(model) == {"layers.1.mlp.gate_up_proj": "x"}  # graph inputs keep names
    insert_qdq(model, None, load_calibration(calib_dir), smooth=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": np.ones((2, k), np.float32)})[0].shape == (2, n)
    foreign = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "f",
                                                  graph.input, graph.output,
                                                  [numpy_helper.from_array(np.ones((k, n), np.float32), "w")]))
    with pytest.raises(UserError, match="no decoder linears"):
        insert_qdq(foreign, None, load_calibration(calib_dir))
