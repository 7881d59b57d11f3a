"""Explicit INT8 for an exported decoder graph: QuantizeLinear/DequantizeLinear pairs, as TensorRT 10+ prefers.

For every decoder linear (a Gemm/MatMul whose weight initializer is named "...layers.{i}.<linear>.weight",
reached directly or through Transpose/Cast):
  activation: [Mul(1/s) ->] Q(per-tensor scale from calibration) -> DQ -> the linear's input
  weight:     (W * s) -> Q -> DQ per output channel (or, weights_int8=True, int8 initializer -> DQ)
The graph stays float otherwise; smoothing (smooth=True) is inserted as an explicit Mul so the fp
function is unchanged before rounding. Tensor names follow names.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from autoglm_trt.calibration.cache import CalibrationResult
from autoglm_trt.calibration.names import (
    key_of_weight,
    onnx_input_name,
    onnx_smoothed_input_name,
)
from autoglm_trt.errors import UserError

_EXTERNAL_BYTES = 1_900_000_000  # NOTE: protobuf's 2 GB limit: larger graphs keep weights in a .data file


@dataclass
class LinearSite:
    key: str  # "layers.3.mlp.down_proj"
    node: onnx.NodeProto  # the Gemm / MatMul
    weight: str  # initializer name
    out_axis: int  # output-channel axis of the initializer (0 for [N, K])
    edge: tuple[onnx.NodeProto, int]  # (node, input index) that reads the initializer
    act_type: int  # TensorProto elem type of the activation


def find_linears(graph: onnx.GraphProto) -> list[LinearSite]:
    inits = {i.name: i for i in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}
    sites, seen = [], set()
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type not in ("Gemm", "MatMul") or attrs.get("transA", 0):
            continue
        out_axis = 0 if attrs.get("transB", 0) else 1  # of the B operand
        name, edge, act_type = node.input[1], (node, 1), None
        while name not in inits and name in producer and producer[name].op_type in ("Transpose", "Cast"):
            p = producer[name]
            pa = {a.name: helper.get_attribute_value(a) for a in p.attribute}
            if p.op_type == "Transpose":
                out_axis = list(pa.get("perm", [1, 0]))[out_axis]
            elif act_type is None:
                act_type = pa["to"]
            name, edge = p.input[0], (p, 0)
        key = key_of_weight(name) if name in inits else None
        if key is None or key in seen or len(inits[name].dims) != 2:
            continue
        seen.add(key)
        sites.append(LinearSite(key, node, name, out_axis, edge, act_type or inits[name].data_type))
    return sites


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for n in graph.node:
        n.input[:] = [new if i == old else i for i in n.input]
        n.output[:] = [new if o == old else o for o in n.output]
    for v in graph.value_info:
        if v.name == old:
            v.name = new


def canonicalize_linear_inputs(model: onnx.ModelProto) -> dict[str, str]:
    """Rename each decoder linear's activation input to "{key}.input" (graph inputs/outputs keep their
    names); returns {key: the tensor name now feeding it}. Call after export so the cache names match."""
    graph = model.graph
    io = {v.name for v in graph.input} | {v.name for v in graph.output}
    names = {}
    for site in find_linears(graph):
        x, want = site.node.input[0], onnx_input_name(site.key)
        if x not in io and x != want and not any(want in n.output for n in graph.node):
            _rename(graph, x, want)
            x = want
        names[site.key] = x
    return names


def _const(name: str, array: np.ndarray, elem: int) -> onnx.TensorProto:
    """A float initializer of the graph's element type (bfloat16 through onnx's own conversion)."""
    if elem == TensorProto.BFLOAT16:
        return helper.make_tensor(name, elem, array.shape, array.astype(np.float32).flatten().tolist())
    return numpy_helper.from_array(array.astype(helper.tensor_dtype_to_np_dtype(elem)), name)


def _site_nodes(site: LinearSite, graph: onnx.GraphProto, calib: CalibrationResult, smooth: bool,
                activations: bool, weights_int8: bool) -> tuple[list, list, list]:
    """-> (nodes before the linear, nodes before the weight edge, new initializers)."""
    init = next(i for i in graph.initializer if i.name == site.weight)
    w = numpy_helper.to_array(init).astype(np.float64)  # [N, K] or [K, N]
    in_axis = 1 - site.out_axis
    act_nodes, inits = [], []
    if smooth:
        s = calib.smooth_scales[site.key].double().numpy()  # [K]
        if s.shape[0] != w.shape[in_axis]:
            raise UserError(f"{site.key}: calibration has {s.shape[0]} input channels, the graph {w.shape[in_axis]}")
        w = w * (s[None, :] if in_axis == 1 else s[:, None])
        inits.append(_const(f"{site.key}.smooth_inv", 1.0 / s, site.act_type))
        act_nodes.append(helper.make_node("Mul", [site.node.input[0], f"{site.key}.smooth_inv"],
                                          [onnx_smoothed_input_name(site.key)], name=f"{site.key}.smooth"))
        site.node.input[0] = onnx_smoothed_input_name(site.key)
    if activations:
        amax = float((calib.smoothed_amax if smooth else calib.act_amax)[site.key])
        nodes, q_inits = _act_qdq(site, site.node.input[0], amax)
        act_nodes, inits = act_nodes + nodes, inits + q_inits
    w_nodes, w_inits = _weight_qdq(site, graph, init, w, weights_int8)
    return act_nodes, w_nodes, inits + w_inits


def _act_qdq(site: LinearSite, x: str, amax: float) -> tuple[list, list]:
    """Per-tensor Q -> DQ on the linear's activation input (symmetric: zero point 0)."""
    key = site.key
    qdq = [f"{key}.input_scale", f"{key}.input_zero_point"]
    inits = [_const(qdq[0], np.array(max(amax, 1e-8) / 127.0), site.act_type),
             numpy_helper.from_array(np.array(0, dtype=np.int8), qdq[1])]
    nodes = [helper.make_node("QuantizeLinear", [x, *qdq], [f"{key}.input_q"], name=f"{key}.input_Q"),
             helper.make_node("DequantizeLinear", [f"{key}.input_q", *qdq], [f"{key}.input_dq"],
                              name=f"{key}.input_DQ")]
    site.node.input[0] = f"{key}.input_dq"
    return nodes, inits


def _weight_qdq(site: LinearSite, graph: onnx.GraphProto, init: onnx.TensorProto, w: np.ndarray,
                weights_int8: bool) -> tuple[list, list]:
    """Per-output-channel Q -> DQ on the (smoothed) weight, or an int8 initializer -> DQ."""
    key, axis = site.key, site.out_axis
    w_scale = np.maximum(np.abs(w).max(axis=1 - axis), 1e-8) / 127.0  # [N]
    wq = [f"{key}.weight_scale", f"{key}.weight_zero_point"]
    inits = [_const(wq[0], w_scale, init.data_type), numpy_helper.from_array(np.zeros(w.shape[axis], np.int8), wq[1])]
    dq_out = f"{key}.weight_dq"
    if weights_int8:
        q = np.clip(np.round(w / w_scale.reshape((-1, 1) if axis == 0 else (1, -1))), -127, 127).astype(np.int8)
        inits.append(numpy_helper.from_array(q, f"{key}.weight_int8"))
        nodes = [helper.make_node("DequantizeLinear", [f"{key}.weight_int8", *wq], [dq_out], axis=axis,
                                  name=f"{key}.weight_DQ")]
        graph.initializer.remove(init)
    else:
        init.CopyFrom(_const(site.weight, w, init.data_type))
        nodes = [helper.make_node("QuantizeLinear", [site.weight, *wq], [f"{key}.weight_q"], axis=axis,
                                  name=f"{key}.weight_Q"),
                 helper.make_node("DequantizeLinear", [f"{key}.weight_q", *wq], [dq_out], axis=axis,
                                  name=f"{key}.weight_DQ")]
    edge_node, idx = site.edge
    edge_node.input[idx] = dq_out
    return nodes, inits


def insert_qdq(src: str | Path | onnx.ModelProto, dst: str | Path | None, calib: CalibrationResult, *,
               smooth: bool = True, activations: bool = True, weights_int8: bool = False) -> list[str]:
    """Write a Q/DQ copy of the decoder graph `src` to `dst`; returns the keys of the linears quantized.

    smooth: insert SmoothQuant (Mul 1/s, W * s) and use the smoothed activation amax.
    activations=False gives weight-only INT8 (W8A16 in TensorRT: DQ on weights only).
    """
    model = onnx.load(str(src)) if not isinstance(src, onnx.ModelProto) else src
    graph = model.graph
    canonicalize_linear_inputs(model)
    sites = find_linears(graph)
    if not sites:
        raise UserError("no decoder linears found in the ONNX graph (weights named '...layers.N.<linear>.weight'; "
                        "export with torch.onnx.export(dynamo=True) so initializers keep module names)")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 19 and any(s.act_type != TensorProto.FLOAT for s in sites):
        raise UserError(f"Q/DQ on float16/bfloat16 activations needs opset >= 19, the graph has {opset}")
    before: dict[int, list] = {}
    for site in sites:
        act_nodes, w_nodes, inits = _site_nodes(site, graph, calib, smooth, activations, weights_int8)
        before.setdefault(id(site.edge[0]), []).extend(w_nodes)
        before.setdefault(id(site.node), []).extend(act_nodes)
        graph.initializer.extend(inits)
    nodes = [n for node in graph.node for n in (*before.get(id(node), []), node)]
    del graph.node[:]
    graph.node.extend(nodes)
    meta = {"method": calib.method, "smooth": smooth, "smooth_alpha": calib.smooth_alpha,
            "activations": activations, "weights_int8": weights_int8, "linears": len(sites)}
    model.metadata_props.append(onnx.StringStringEntryProto(key="autoglm_trt.qdq", value=json.dumps(meta)))
    if dst is not None:
        _save(model, Path(dst))
    return [s.key for s in sites]


def _save(model: onnx.ModelProto, dst: Path) -> None:
    big = sum(len(i.raw_data) for i in model.graph.initializer) > _EXTERNAL_BYTES
    onnx.save_model(model, str(dst), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=dst.name + ".data")


def random_feeds(path: str | Path, dynamic: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for a smoke run: floats ~ N(0, 1), integers 0; dynamic dims take `dynamic`."""
    rng = np.random.default_rng(seed)
    sess = session(path)
    feeds = {}
    for inp in sess.get_inputs():
        shape = [d if isinstance(d, int) else dynamic for d in inp.shape]
        dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                 "tensor(int32)": np.int32, "tensor(bool)": np.bool_}.get(inp.type, np.float32)
        feeds[inp.name] = (rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating)
                           else np.zeros(shape, dtype=dtype))
    return feeds


def session(path: str | Path, exact: bool = True):
    """An onnxruntime CPU session; exact=True runs Q/DQ as written (its fused int8 CPU kernels compute
    u8*s8 pairs in saturating int16 on AVX2, which TensorRT does not)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if exact:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_qdq(src: str | Path, dst: str | Path, feeds: dict[str, np.ndarray] | None = None) -> float:
    """Run both graphs in onnxruntime; relative L2 error of the Q/DQ graph's first output."""
    feeds = feeds if feeds is not None else random_feeds(src)
    outs = [session(p).run(None, feeds)[0] for p in (src, dst)]
    ref, got = (o.astype(np.float64) for o in outs)
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
