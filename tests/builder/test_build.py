"""Engine directories: layout and manifest, round trips (greedy tokens, TP shards, INT8), refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from autoglm_trt.config import ModelConfig
from autoglm_trt.engine.distributed import free_port
from autoglm_trt.errors import UserError
from autoglm_trt.formats.manifest import MANIFEST_KEY, is_engine_dir, read_manifest, sha256_file
from autoglm_trt.models.engine_loader import load_engine_model
from autoglm_trt.models.loader import load_model

HERE = Path(__file__).parent


def test_layout_and_manifest(tiny_engine, tiny_model_dir):
    d = tiny_engine.engine_dir
    assert is_engine_dir(d) and not is_engine_dir(tiny_model_dir)
    for name in ("rank0.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "preprocessor_config.json", "generation_config.json"):
        assert (d / name).is_file(), name
    m = read_manifest(d)
    assert m.format_version == 2 and m.tp_size == 1 and m.quantization["mode"] == "none"
    assert m.build["dtype"] == "float32" and m.build["page_size"] == 16 and m.gpu is None
    assert len(m.source.sha256) == 64 and m.source.hash_method == "fast"
    assert set(m.profiles) == {"runtime", "llm", "visual"}
    assert m.profiles["runtime"]["batch_size"] == {"min": [1], "opt": [4], "max": [8]}
    assert m.command.startswith("autoglm-trt build ") and "--tp 1" in m.command
    for name, entry in m.files.items():
        assert sha256_file(d / name) == entry.sha256 and (d / name).stat().st_size == entry.bytes
    cfg = ModelConfig.from_dir(d)  # config.json stays a Hugging Face config
    assert cfg.text.num_hidden_layers == 2 and cfg.torch_dtype == "float32"
    with safe_open(str(d / "rank0.safetensors"), framework="pt") as f:
        assert f.metadata()["tp_size"] == "1"
        assert "language_model.layers.0.self_attn.qkv_proj.weight" in set(f.keys())


def test_llm_round_trip_same_greedy_tokens(tiny_engine, tiny_model_dir):
    from autoglm_trt import LLM, SamplingParams

    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    prompts = ["hello world", "the quick brown fox jumps"]
    tokens = []
    for d in (tiny_model_dir, tiny_engine.engine_dir):
        llm = LLM(str(d), device="cpu", dtype="float32", max_model_len=128, num_blocks=32)
        tokens.append([o.token_ids for o in llm.generate(prompts, params)])
    assert tokens[0] == tokens[1] and len(tokens[0][0]) == 10


@pytest.mark.slow
def test_llm_tp2_engine_round_trip_same_greedy_tokens(tiny_engine_tp2, tiny_model_dir):
    """`LLM(engine, tensor_parallel_size=2)`: the engine's own TP workers load rank0/rank1 pre-sharded."""
    from autoglm_trt import LLM, SamplingParams

    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    kw = dict(device="cpu", dtype="float32", max_model_len=128, num_blocks=32)
    ref = LLM(str(tiny_model_dir), **kw).generate(["hello world"], params)[0].token_ids
    llm = LLM(str(tiny_engine_tp2.engine_dir), tensor_parallel_size=2, **kw)
    try:
        assert llm.generate(["hello world"], params)[0].token_ids == ref
    finally:
        llm.engine.shutdown()  # NOTE: else this process stays rank 0 of 2 and later tests' all-reduces hang


def test_engine_weights_equal_checkpoint_weights(tiny_engine, our_model):
    model = load_model(tiny_engine.engine_dir, dtype="float32", show_progress=False)
    ref = our_model.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(t, ref[name]), name


def test_tp2_rank_files_equal_live_sharding(tiny_engine_tp2, tiny_model_dir):
    """Pre-sharded rank files hold exactly what the weight loaders shard from the checkpoint at load time."""
    from autoglm_trt.layers.parallel import parallel_state

    for rank in range(2):
        engine = load_model(tiny_engine_tp2.engine_dir, dtype="float32", rank=rank, tp_size=2, show_progress=False)
        with parallel_state(rank, 2):
            live = load_model(tiny_model_dir, dtype="float32", show_progress=False)
        live_sd = live.state_dict()
        for name, t in engine.state_dict().items():
            assert torch.equal(t, live_sd[name]), (rank, name)
        assert engine.language_model.layers[0].self_attn.qkv_proj.weight.shape == (2 * 32 + 2 * 32, 128)


@pytest.mark.slow
def test_tp2_engine_forward_over_gloo_matches_tp1(tiny_engine_tp2, our_model, tmp_path):
    port, out = free_port(), tmp_path / "logits.pt"
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1])}
    procs = [subprocess.Popen([sys.executable, str(HERE / "tp_worker.py"), str(tiny_engine_tp2.engine_dir),
                               str(r), "2", str(port), str(out)], env=env) for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    ids = torch.arange(1, 10) * 37
    with torch.no_grad():
        ref = our_model.compute_logits(our_model(our_model.embed(ids), torch.arange(9).expand(3, -1)))
    assert (torch.load(out) - ref).abs().max() < 1e-4


# ---- refusals ---------------------------------------------------------------------------------------
@pytest.fixture()
def engine_copy(tiny_engine, tmp_path):
    return Path(shutil.copytree(tiny_engine.engine_dir, tmp_path / "engine"))


def test_tampered_weights_refused(engine_copy):
    with open(engine_copy / "rank0.safetensors", "r+b") as f:
        f.seek(-3, 2)
        f.write(b"\x01\x02\x03")
    with pytest.raises(UserError, match=r"rank0\.safetensors does not match its sha256.*rebuild it: `autoglm-trt"):
        load_model(engine_copy, show_progress=False)


def test_damaged_header_refused(engine_copy):
    with open(engine_copy / "rank0.safetensors", "r+b") as f:
        f.seek(9)
        f.write(b"!!")
    with pytest.raises(UserError, match=r"rank0\.safetensors is damaged .*rebuild it"):
        load_engine_model(engine_copy, show_progress=False, verify=False)  # past the checksums: still caught


def test_skip_checksums_still_checks_sizes(engine_copy, monkeypatch):
    monkeypatch.setenv("AUTOGLM_TRT_SKIP_CHECKSUMS", "1")
    path = engine_copy / "tokenizer.json"
    data = bytearray(path.read_bytes())
    data[-2] ^= 1  # same size, different bytes: accepted without checksums
    path.write_bytes(bytes(data))
    load_model(engine_copy, show_progress=False)
    path.write_bytes(bytes(data) + b" ")
    with pytest.raises(UserError, match="tokenizer.json does not match"):
        load_model(engine_copy, show_progress=False)


def test_tampered_tokenizer_refused(engine_copy):
    (engine_copy / "tokenizer.json").write_text("{}")
    with pytest.raises(UserError, match="tokenizer.json does not match its sha256"):
        load_model(engine_copy, show_progress=False)


def test_missing_rank_file_refused(engine_copy):
    (engine_copy / "rank0.safetensors").unlink()
    with pytest.raises(UserError, match="rank0.safetensors is missing"):
        load_model(engine_copy, show_progress=False)


def test_engine_built_for_another_gpu_refused(engine_copy, monkeypatch):
    """An engine whose manifest names the GPU it was built for (TensorRT engines inside) loads on that
    architecture only; the refusal names the rebuild. The CPU runs the portable rank files."""
    from autoglm_trt.models.engine_loader import check_built_gpu

    cfg = json.loads((engine_copy / "config.json").read_text())
    cfg[MANIFEST_KEY]["gpu"] = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    (engine_copy / "config.json").write_text(json.dumps(cfg))
    manifest = read_manifest(engine_copy)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    with pytest.raises(UserError, match=r"built for NVIDIA H100 80GB HBM3 \(sm 9.0\); this GPU is NVIDIA GeForce "
                                        r"RTX 3090 \(sm 8.6\): rebuild it: `autoglm-trt build"):
        check_built_gpu(engine_copy, manifest, torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_built_gpu(engine_copy, manifest, torch.device("cuda", 0))  # the same architecture: fine
    check_built_gpu(engine_copy, manifest, torch.device("cpu"))
    assert load_model(engine_copy, show_progress=False) is not None


def test_unknown_format_version_refused(engine_copy):
    cfg = json.loads((engine_copy / "config.json").read_text())
    cfg[MANIFEST_KEY]["format_version"] = 99
    (engine_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"engine format version 99; autoglm-trt .* reads version\(s\) 1, 2: rebuild"):
        load_model(engine_copy, show_progress=False)


def test_wrong_tp_refused(tiny_engine, tiny_engine_tp2):
    with pytest.raises(UserError, match="built for tensor parallelism 2 but is being loaded with 1"):
        load_model(tiny_engine_tp2.engine_dir, show_progress=False)
    with pytest.raises(UserError, match="built for tensor parallelism 1 but is being loaded with 2.*--tp 2"):
        load_model(tiny_engine.engine_dir, rank=0, tp_size=2, show_progress=False)


def test_tp_engine_on_too_few_gpus_names_the_rebuild(tiny_engine_tp2, tiny_model_dir, monkeypatch):
    """A --tp 2 engine on a one-GPU machine: refused before any worker starts, with the build line for --tp 1."""
    from autoglm_trt.engine.executor import check_tp_size

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg, cuda = ModelConfig.from_dir(tiny_engine_tp2.engine_dir), torch.device("cuda")
    with pytest.raises(UserError, match=r"needs 2 GPUs; 1 visible: .* rebuild it for this machine with "
                                        r"`autoglm-trt build .*--tp 1"):
        check_tp_size(cfg, 2, cuda, str(tiny_engine_tp2.engine_dir))
    with pytest.raises(UserError, match=r"needs 2 GPUs; 1 visible$"):  # a checkpoint shards at load: no rebuild
        check_tp_size(cfg, 2, cuda, str(tiny_model_dir))


def test_build_refuses_bad_inputs(tiny_model_dir, tmp_path, tiny_engine):
    from autoglm_trt.builder.build import build_engine
    from autoglm_trt.builder.options import BuildConfig

    with pytest.raises(UserError, match="cannot be split 3 ways"):
        build_engine(tiny_model_dir, tmp_path / "a", BuildConfig(tp=3), show_progress=False)
    assert not (tmp_path / "a").exists()  # nothing written before the checks pass
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        build_engine(tiny_model_dir, tmp_path / "b", show_progress=False)
    with pytest.raises(UserError, match="is an engine directory; build or export from the Hugging Face"):
        build_engine(tiny_engine.engine_dir, tmp_path / "c", show_progress=False)
    with pytest.raises(ValueError, match="page_size"):
        BuildConfig(page_size=12)
    with pytest.raises(ValueError, match="cuda_graph_batch_sizes"):
        BuildConfig(cuda_graph_batch_sizes=(1, 128))
