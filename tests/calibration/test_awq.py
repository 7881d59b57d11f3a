"""AWQ scales for INT4 (calibration/awq.py): the search, the observer, and the tiny model end to end (CPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from autoglm_trt.calibration import awq
from autoglm_trt.layers import int4_model as M
from autoglm_trt.layers import quant as Q


def outlier_inputs(k: int, seed: int, outliers: int = 8, gain: float = 30.0):
    """A sampler of activations [T, K] whose `outliers` channels are `gain` times larger (LLM-like)."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.ones(k)
    mag[torch.randperm(k, generator=g)[:outliers]] = gain
    return lambda t: torch.randn(t, k, generator=g) * mag


def heldout_error(w: torch.Tensor, s: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ awq.fake_quant(w, s, 128).t() - x @ w.t()) ** 2).sum())


@pytest.mark.parametrize("objective", ["samples", "stats"])
def test_awq_beats_round_to_nearest_on_outlier_channels(objective: str) -> None:
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(1)) * 0.02
    sample = outlier_inputs(512, seed=2)
    xc, xt = sample(512), sample(2048)  # calibration rows, held-out rows
    stats = awq.ChannelStats(xc.abs().mean(0), (xc * xc).mean(0), xc if objective == "samples" else None)
    r = awq.search_scale(w, stats, 128)
    assert r.objective == objective and 0.0 < r.alpha < 1.0 and r.scale.shape == (512,)
    assert r.err_awq < 0.5 * r.err_rtn
    assert heldout_error(w, r.scale, xt) < 0.5 * heldout_error(w, torch.ones(512), xt)


def test_awq_is_never_worse_than_round_to_nearest_on_its_objective() -> None:
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(64, 256, generator=g), torch.randn(256, 256, generator=g)  # no outliers: s = 1 may win
    a, x2 = x.abs().mean(0), (x * x).mean(0)
    for stats in (awq.ChannelStats(a, x2, x), awq.ChannelStats(a, x2)):
        r = awq.search_scale(w, stats, 128)
        assert r.err_awq <= r.err_rtn
        if r.alpha == 0.0:
            assert torch.allclose(r.scale, torch.ones(256))


def test_tied_channels_get_one_scale() -> None:
    tie = torch.arange(8) % 4  # o_proj of 2 heads x 4 dims over 1 kv head: channel d of both heads ties
    a = torch.tensor([1.0, 2.0, 3.0, 40.0, 3.0, 2.0, 1.0, 0.0])
    assert torch.equal(awq.tied(a, tie), torch.tensor([2.0, 2.0, 2.0, 20.0] * 2))
    stats = awq.ChannelStats(a, a ** 2)
    r = awq.search_scale(torch.randn(16, 8) * torch.tensor([1.0, 1, 1, 0.01, 1, 1, 1, 1]), stats, 16, tie=tie)
    assert torch.equal(r.scale[:4], r.scale[4:])


def test_candidate_scales_are_normalised_and_spare_dead_channels() -> None:
    a = torch.tensor([0.0, 1.0, 4.0, 16.0])
    s = awq.candidate_scale(a, 0.5)
    assert float(s[0]) == 1.0 and torch.allclose(torch.log(s[1:]).mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(s[2] / s[1], torch.tensor(2.0)) and torch.equal(awq.candidate_scale(a, 0.0), torch.ones(4))


# ---- the observer and the tiny model ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 151000, (n,), generator=g), torch.arange(n).expand(3, -1)) for n in (40, 24)]


def run(model, batch) -> torch.Tensor:
    ids, pos = batch
    with torch.inference_mode():
        return model.compute_logits(model(model.embed(ids), pos))  # [T, V]


def test_observer_records_means_second_moments_and_a_bounded_sample(our_model, batches) -> None:
    seen, handles = {}, []
    key = "layers.1.mlp.down_proj"
    lin = dict(Q.decoder_linears(our_model))[key]
    handles.append(lin.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", []).append(args[0].float())))
    with awq.AwqObserver(our_model, rows=32) as obs:
        for b in batches:
            run(our_model, b)
    handles[0].remove()
    stats = obs.stats()
    assert set(stats) == {k for k, _ in Q.decoder_linears(our_model)}
    x = torch.cat(seen["x"])  # [64, K]
    assert torch.allclose(stats[key].mean_abs, x.abs().mean(0), rtol=1e-5)
    assert torch.allclose(stats[key].sq_mean, (x * x).mean(0), rtol=1e-5)
    samples = stats[key].samples
    assert samples.shape == (32, x.shape[1])  # 40 + 24 rows seen, 32 kept
    assert all(any(torch.equal(r, y) for y in x) for r in samples.float())  # real rows, not blends


def with_outlier_channels(model, gain: float = 25.0):
    """The same float function, but a few channels of every norm's output `gain` times larger and the weights
    that read them `gain` times smaller: the activation outliers of trained LLMs, on random weights."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in Q.decoder_layers(m):
            for norm, lin in ((layer.input_layernorm, layer.self_attn.qkv_proj),
                              (layer.post_attention_layernorm, layer.mlp.gate_up_proj)):
                idx = torch.randperm(norm.weight.numel(), generator=g)[:4]
                norm.weight[idx] *= gain
                lin.weight[:, idx] /= gain
    return m


def test_awq_lowers_the_tiny_models_error_with_outlier_channels(our_model, batches) -> None:
    model = with_outlier_channels(our_model)
    ref = run(model, batches[0])
    assert torch.allclose(ref, run(our_model, batches[0]), atol=1e-4)
    with awq.AwqObserver(model) as obs:
        run(model, batches[1])  # calibrate on one batch, judge on the other
    results = awq.search_model(model, obs.stats(), grid=10)
    assert all(r.err_awq <= r.err_rtn for r in results.values())
    assert max(r.alpha for k, r in results.items() if k.endswith("qkv_proj")) > 0
    errs = []
    for scales in (None, awq.scales_of(results)):
        m = copy.deepcopy(model)
        M.quantize_model_int4(m, scales)
        errs.append(float((run(m, batches[0]) - ref).norm() / ref.norm()))
    assert errs[1] < 0.85 * errs[0], errs  # measured 0.26 vs 0.35: o_proj and down_proj see no outliers here


def test_statistic_only_awq_from_a_calibration_directory(calib_dir, our_model) -> None:
    """Today's calibration directories hold per-channel amax only: AWQ's statistic-only search still runs."""
    from autoglm_trt.calibration import load_calibration

    stats = awq.stats_from_amax(load_calibration(calib_dir).channel_amax)
    results = awq.search_model(our_model, stats, grid=5)
    assert set(results) == {k for k, _ in Q.decoder_linears(our_model)}
    assert all(r.objective == "stats" and r.err_awq <= r.err_rtn for r in results.values())
    table = awq.summary(results)
    assert set(table["layers.0.mlp.down_proj"]) == {"alpha", "objective", "err_rtn", "err_awq", "ratio"}
    m = copy.deepcopy(our_model)
    M.quantize_model_int4(m, awq.scales_of(results), {k: s.sq_mean for k, s in stats.items()})
    assert m.quant_config["awq"] and m.quant_config["clip_search"]
