"""`LLM(ENGINE_DIR)` takes its limits, page size, CUDA-graph sizes, TP and quant from the build; explicit kwargs
win; a checkpoint takes the one set of defaults in config.py (max_model_len: the model's own maximum)."""

from __future__ import annotations

import pytest

from autoglm_trt import config as C
from autoglm_trt.config import EngineArgs, ModelConfig
from autoglm_trt.errors import UserError
from autoglm_trt.formats.manifest import engine_defaults


def engine_config_from_kwargs(model_dir: str, **kwargs) -> C.EngineConfig:
    return EngineArgs(model_dir, **kwargs).create_engine_config()


@pytest.fixture(scope="module")
def int8_page32(build_engine_dir):
    pytest.importorskip("autoglm_trt.layers.quant")
    return build_engine_dir("defaults-int8-p32", quant="int8-wo", page_size=32).engine_dir


def test_engine_defaults_read_the_manifest(tiny_engine, int8_page32):
    d = engine_defaults(tiny_engine.engine_dir)  # conftest: limits 8 / 512 / 256, graphs 1,2,4,8
    assert d == {"max_model_len": 512, "max_num_seqs": 8, "max_num_batched_tokens": 256, "block_size": 16,
                 "cuda_graph_batch_sizes": (1, 2, 4, 8), "tensor_parallel_size": 1, "quant": "none",
                 "act_quant": "dynamic"}
    assert engine_defaults(int8_page32)["block_size"] == 32 and engine_defaults(int8_page32)["quant"] == "int8-wo"


def test_engine_config_defaults_come_from_the_build(tiny_engine, int8_page32, tiny_model_dir):
    cfg = engine_config_from_kwargs(str(tiny_engine.engine_dir))
    assert (cfg.scheduler.max_model_len, cfg.scheduler.max_num_seqs, cfg.scheduler.max_num_batched_tokens) == \
        (512, 8, 256)
    assert cfg.cuda_graph_batch_sizes == (1, 2, 4, 8) and cfg.parallel.tensor_parallel_size == 1
    q = engine_config_from_kwargs(str(int8_page32))
    assert q.cache.block_size == 32 and q.quant == "int8-wo"
    ckpt = engine_config_from_kwargs(str(tiny_model_dir))  # a checkpoint: the library defaults
    most = ModelConfig.from_dir(tiny_model_dir).text.max_position_embeddings
    assert (ckpt.scheduler.max_model_len, ckpt.max_model_len_origin) == (most, C.MODEL_MAXIMUM)
    assert (ckpt.cache.block_size, ckpt.quant, ckpt.scheduler.max_num_seqs) == \
        (C.DEFAULT_BLOCK_SIZE, "none", C.DEFAULT_MAX_NUM_SEQS)
    assert ckpt.cuda_graph_batch_sizes == (1, 2, 4, 8, 16, 24, 32, 48, 64)


def test_max_model_len_past_the_models_positions_is_refused(tiny_model_dir):
    most = ModelConfig.from_dir(tiny_model_dir).text.max_position_embeddings
    with pytest.raises(ValueError, match=f"max_model_len {most + 1} is more than the model's"):
        engine_config_from_kwargs(str(tiny_model_dir), max_model_len=most + 1)


def test_model_maximum_is_lowered_to_the_kv_capacity(tiny_model_dir):
    from autoglm_trt import LLM

    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32", num_blocks=8)  # 128 tokens of KV
    assert llm.engine.config.scheduler.max_model_len == 128
    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32", num_blocks=8, max_model_len=256)  # asked for
    assert llm.engine.config.scheduler.max_model_len == 256


def test_explicit_kwargs_win(tiny_engine, int8_page32):
    cfg = engine_config_from_kwargs(str(tiny_engine.engine_dir), max_model_len=128, max_num_seqs=2,
                                    cuda_graph_batch_sizes=(1,), block_size=64)
    assert (cfg.scheduler.max_model_len, cfg.scheduler.max_num_seqs, cfg.cache.block_size) == (128, 2, 64)
    assert cfg.cuda_graph_batch_sizes == (1,) and cfg.scheduler.max_num_batched_tokens == 256
    assert engine_config_from_kwargs(str(int8_page32), quant="int8-wo").quant == "int8-wo"  # the same: fine


@pytest.mark.parametrize("kwargs, match", [
    ({"tensor_parallel_size": 2}, r"built with --tp 1, but tensor_parallel_size=2 .*rebuild with --tp 2"),
    ({"quant": "w8a8"}, r"built with --quant none, but quant='w8a8' .*rebuild with --quant w8a8"),
])
def test_options_baked_into_the_rank_files_are_refused(tiny_engine, kwargs, match):
    with pytest.raises(UserError, match=match):
        engine_config_from_kwargs(str(tiny_engine.engine_dir), **kwargs)


def test_llm_on_an_engine_uses_its_limits(tiny_engine):
    from autoglm_trt import LLM, SamplingParams
    from autoglm_trt.errors import RequestError

    llm = LLM(str(tiny_engine.engine_dir), device="cpu", dtype="float32", num_blocks=48)
    assert llm.engine.config.scheduler.max_model_len == 512
    with pytest.raises(RequestError, match="max_model_len is 512"):  # the build's limit, not 8192
        llm.generate("hello", SamplingParams(max_tokens=600))
    assert len(llm.generate("hello", SamplingParams(max_tokens=3, temperature=0.0))[0].token_ids) == 3
