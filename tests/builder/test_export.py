"""ONNX export of the tiny model: graphs pass the checker, match PyTorch through onnxruntime (fp32 <= 1e-3)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file

from autoglm_trt.builder.onnx_io import consolidate
from autoglm_trt.formats.manifest import sha256_file


def ort_session(path):
    """A plain onnxruntime session (the export's own checks run through Polygraphy; these do not)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def test_parity_all_graphs_within_1e3(tiny_export):
    seen = {(r.graph, r.case) for r in tiny_export.parity}
    assert seen == {("llm", "prefill"), ("llm", "decode"), ("visual", "images")}
    for r in tiny_export.parity:
        print(f"{r.graph}/{r.case}/{r.output}: max abs diff {r.max_abs_diff:.3g}")
        assert r.max_abs_diff <= 1e-3, r
    # both references: the export wrapper and our production model
    assert any("vs model" in r.output for r in tiny_export.parity if r.case == "decode")
    assert any("vs model" in r.output for r in tiny_export.parity if r.graph == "visual")


def test_layout_manifest_and_checksums(tiny_export):
    out = tiny_export.out_dir
    meta = json.loads((out / "export.json").read_text())
    assert meta["format"] == "autoglm-trt-onnx" and meta["format_version"] == 1 and meta["opset"] == 17
    assert meta["dtype"] == "float32" and len(meta["source"]["sha256"]) == 64
    assert {"llm/model.onnx", "llm/embedding.safetensors", "visual/model.onnx", "profiles.json"} <= set(meta["files"])
    for name, entry in meta["files"].items():
        assert sha256_file(out / name) == entry["sha256"], name
    for graph in ("llm", "visual"):
        onnx.checker.check_model(str(out / graph / "model.onnx"))
    emb = load_file(str(out / "llm" / "embedding.safetensors"))["embedding"]
    assert emb.shape == (151552, 128)


def _graph_inputs(path):
    model = onnx.load(str(path), load_external_data=False)
    return {i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input}


def test_profiles_cover_every_dynamic_input(tiny_export):
    out = tiny_export.out_dir
    profiles = json.loads((out / "profiles.json").read_text())
    assert set(profiles["llm"]) == {"context", "generation"}
    for graph, by_name in profiles.items():
        inputs = _graph_inputs(out / graph / "model.onnx")
        for name, prof in by_name.items():
            assert set(prof) == set(inputs), (graph, name)
            for inp, dims in prof.items():
                lo, opt, hi = dims["min"], dims["opt"], dims["max"]
                assert len(lo) == len(inputs[inp])
                for d, (a, b, c) in zip(inputs[inp], zip(lo, opt, hi)):
                    assert a <= b <= c
                    if isinstance(d, int) and d > 0:
                        assert a == b == c == d, (inp, d)
    gen = profiles["llm"]["generation"]["inputs_embeds"]
    assert gen["max"] == [4, 1, 128] and profiles["llm"]["context"]["inputs_embeds"]["max"] == [4, 128, 128]


def test_dynamic_axes_are_symbolic(tiny_export):
    llm = _graph_inputs(tiny_export.out_dir / "llm" / "model.onnx")
    assert llm["inputs_embeds"][:2] == ["batch", "seq"] and llm["position_ids"][0] == 3
    assert llm["past_key_values.0.key"] == ["batch", 2, "past_seq", 32]
    vis = _graph_inputs(tiny_export.out_dir / "visual" / "model.onnx")
    assert vis["pixel_values"] == ["num_patches", 1176]


@torch.no_grad()
def test_onnx_greedy_loop_matches_model(tiny_export, our_model):
    """Embedding sidecar + prefill + 4 decode steps on the graph = greedy decoding of our model."""
    out = tiny_export.out_dir
    sess = ort_session(out / "llm" / "model.onnx")
    emb = load_file(str(out / "llm" / "embedding.safetensors"))["embedding"].numpy()
    names = [i.name for i in sess.get_inputs()]
    ids = [5, 17, 300, 42, 9, 1200]
    kv = [np.zeros((1, 2, 0, 32), np.float32)] * (len(names) - 3)
    new, graph_tokens = ids, []
    for _ in range(5):
        past = kv[0].shape[2]
        pos = np.broadcast_to(np.arange(past, past + len(new)), (3, 1, len(new))).astype(np.int64)
        feed = [emb[new][None], pos, np.ones((1, past + len(new)), np.int64), *kv]
        logits, *kv = sess.run(None, dict(zip(names, feed)))
        new = [int(logits[0, -1].argmax())]
        graph_tokens += new
    seq, model_tokens = list(ids), []
    for _ in range(5):
        t = torch.tensor(seq)
        logits = our_model.compute_logits(our_model(our_model.embed(t), torch.arange(len(seq)).expand(3, -1)))
        seq.append(int(logits[-1].argmax()))
        model_tokens.append(seq[-1])
    assert graph_tokens == model_tokens


def test_consolidate_streams_external_data_into_one_file(tmp_path):
    """Exports over 2 GB come out of the exporter as one file per tensor; they end up in model.onnx.data."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((64, 32), dtype=np.float32), rng.standard_normal((32, 8), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(model, str(src / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)
    assert len(list(src.iterdir())) == 3  # model + one file per tensor, like the TorchScript exporter
    dst = tmp_path / "out" / "model.onnx"
    dst.parent.mkdir()
    consolidate(src / "model.onnx", dst)
    assert sorted(p.name for p in dst.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    onnx.checker.check_model(str(dst))
    x = rng.standard_normal((3, 64), dtype=np.float32)
    (y,) = ort_session(dst).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ w1 @ w2, rtol=1e-5, atol=1e-5)


def test_export_refuses_a_non_empty_directory(tiny_model_dir, tmp_path):
    from autoglm_trt.builder.export import export_onnx
    from autoglm_trt.errors import UserError

    (tmp_path / "junk").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        export_onnx(tiny_model_dir, tmp_path, show_progress=False)


def test_polygraphy_comparison_reports_each_outputs_max_abs_diff():
    """The export's parity numbers come from Polygraphy's comparator: a planted error shows, per output name."""
    from autoglm_trt.builder.verify import max_abs_diffs

    a, b = np.zeros((2, 3), np.float32), np.ones(4, np.float32)
    bad = torch.zeros(2, 3)
    bad[1, 2] = 0.25
    diffs = max_abs_diffs({"logits": a, "present.0.key": b}, {"logits": bad, "present.0.key": torch.ones(4)}, 1e-3)
    assert diffs == {"logits": 0.25, "present.0.key": 0.0}
