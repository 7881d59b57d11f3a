import math

import pytest
import torch

from autoglm_trt.engine.sampling_params import SamplingParams
from autoglm_trt.engine.sequence import Sequence
from autoglm_trt.layers.sampler import (Sampler, SamplingMetadata, apply_min_p, apply_penalties,
                                        apply_top_k_top_p, seeded_generator, token_counts)

V = 50


def seq(prompt=(1, 2, 3), outputs=(), rid="r", **params):
    s = Sequence(rid, list(prompt), SamplingParams(**params))
    for t in outputs:
        s.append_token(t)
    return s


def sample(logits, seqs):
    return Sampler()(logits, SamplingMetadata.from_sequences(seqs, logits.shape[-1]))


def rand_logits(b, v=V, seed=0):
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    logits = rand_logits(6)
    out = sample(logits, [seq(temperature=0.0) for _ in range(6)])
    assert out.token_ids == logits.argmax(-1).tolist() and out.logprobs is None


@pytest.mark.parametrize("params", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0),
                                    dict(temperature=1e-7)])
def test_degenerate_filters_equal_greedy(params):
    logits = rand_logits(8, seed=1)
    for _ in range(5):
        out = sample(logits, [seq(**params) for _ in range(8)])
        assert out.token_ids == logits.argmax(-1).tolist()


def test_mixed_greedy_and_random_rows():
    logits = rand_logits(4, seed=2)
    seqs = [seq(temperature=0.0), seq(temperature=1.0), seq(temperature=0.0), seq(temperature=2.0)]
    out = sample(logits, seqs)
    greedy = logits.argmax(-1).tolist()
    assert out.token_ids[0] == greedy[0] and out.token_ids[2] == greedy[2]


def test_seeded_sampling_reproducible_and_batch_independent():
    logits = rand_logits(1, seed=3)[0]
    alone = sample(logits[None], [seq(seed=42)]).token_ids[0]
    batch_logits = torch.stack([rand_logits(1, seed=9)[0], logits, rand_logits(1, seed=8)[0]])
    for _ in range(3):
        out = sample(batch_logits, [seq(seed=7), seq(seed=42), seq()])
        assert out.token_ids[1] == alone
    flat = torch.zeros(1, V)  # uniform: draws differ between steps and between seeds
    by_step = {sample(flat, [seq(seed=42, outputs=[5] * k)]).token_ids[0] for k in range(20)}
    by_seed = {sample(flat, [seq(seed=s)]).token_ids[0] for s in range(20)}
    assert len(by_step) > 5 and len(by_seed) > 5


def test_seeded_generator_is_a_function_of_seed_and_step():
    draw = lambda s, k: torch.rand(4, generator=seeded_generator(s, k)).tolist()  # noqa: E731
    assert draw(1, 0) == draw(1, 0) and draw(1, 0) != draw(1, 1) and draw(1, 0) != draw(2, 0)
    assert draw(-3, 5) == draw(-3, 5)


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20000
    logits = probs.log().expand(n, 4).contiguous()
    out = sample(logits, [seq()] * n)
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=4).float() / n
    assert torch.allclose(freq, probs, atol=0.015)
    out = sample(logits * 2, [seq(temperature=2.0)] * n)  # temperature undoes *2
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=4).float() / n
    assert torch.allclose(freq, probs, atol=0.015)


def test_min_p_filters_low_probability_tokens():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    masked = apply_min_p(probs.log(), torch.tensor([0.2]))  # threshold 0.1
    assert torch.isinf(masked[0, 3]) and torch.isfinite(masked[0, :3]).all()
    n = 4000
    out = sample(probs.log().expand(n, 4).contiguous(), [seq(min_p=0.2)] * n)
    assert 3 not in out.token_ids and {0, 1, 2} <= set(out.token_ids)


def test_top_k_and_top_p_masks():
    logits = torch.tensor([[4.0, 1.0, 3.0, 2.0], [4.0, 1.0, 3.0, 2.0]])
    out = apply_top_k_top_p(logits, torch.tensor([2, 4]), None)
    assert torch.isfinite(out).tolist() == [[True, False, True, False], [True] * 4]
    probs = torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.5, 0.1, 0.3, 0.1]])
    out = apply_top_k_top_p(probs.log(), None, torch.tensor([0.75, 0.85]))
    # 0.75: {0.5, 0.3} reaches it; 0.85 needs one of the 0.1s
    assert torch.isfinite(out[0]).tolist() == [True, False, True, False]
    assert torch.isfinite(out[1]).sum().item() == 3
    assert torch.equal(apply_top_k_top_p(logits, None, None), logits)


def test_penalties_match_hand_computation():
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5, -2.0, 3.0]])
    s = seq(prompt=[1, 4], outputs=[2, 2, 3], repetition_penalty=2.0, frequency_penalty=0.5,
            presence_penalty=0.25)
    meta = SamplingMetadata.from_sequences([s], 6)
    got = apply_penalties(logits, meta)[0].tolist()
    # token 0: unseen -> 1.0; token 1 (prompt): 2/2 = 1.0; token 2 (out x2): -1*2 - 0.5*2 - 0.25 = -3.25
    # token 3 (out x1): 0.5/2 - 0.5 - 0.25 = -0.5; token 4 (prompt): -2*2 = -4; token 5: 3.0
    assert got == pytest.approx([1.0, 1.0, -3.25, -0.5, -4.0, 3.0])
    out = Sampler()(torch.tensor([[1.0, 2.0, -1.0, 0.5, -2.0, 1.5]]),
                    SamplingMetadata.from_sequences([seq(prompt=[1], temperature=0, repetition_penalty=2.0)], 6))
    assert out.token_ids == [5]  # 2.0 -> 1.0 after the penalty, so 1.5 wins


def test_no_penalty_tensors_when_unused():
    meta = SamplingMetadata.from_sequences([seq(), seq(temperature=0)], V)
    assert meta.output_counts is None and meta.seen_mask is None and meta.top_k is None
    assert meta.top_p is None and meta.min_p is None and meta.generators == {} and not meta.all_greedy


def test_token_counts_ignores_padding_and_out_of_vocab():
    counts = token_counts([[1, 1, 3], [], [7, 2]], 5)
    assert counts.tolist() == [[0, 2, 0, 1, 0], [0] * 5, [0, 0, 1, 0, 0]]


def test_logprobs_match_log_softmax():
    logits = rand_logits(3, seed=5)
    seqs = [seq(logprobs=3), seq(), seq(temperature=0.0, logprobs=0)]
    out = sample(logits, seqs)
    ref = torch.log_softmax(logits, -1)
    assert out.logprobs[1] is None
    for row in (0, 2):
        lp = out.logprobs[row]
        assert lp.token_id == out.token_ids[row]
        assert lp.logprob == pytest.approx(ref[row, lp.token_id].item(), abs=1e-5)
    top_vals, top_ids = ref[0].topk(3)
    assert [t for t, _ in out.logprobs[0].top] == top_ids.tolist()
    assert [v for _, v in out.logprobs[0].top] == pytest.approx(top_vals.tolist(), abs=1e-5)
    assert out.logprobs[2].top == []


def test_logprobs_are_before_temperature():
    logits = rand_logits(1, seed=6)
    out = sample(logits, [seq(temperature=0.3, logprobs=1)])
    tok = out.token_ids[0]
    assert out.logprobs[0].logprob == pytest.approx(torch.log_softmax(logits, -1)[0, tok].item(), abs=1e-5)
    assert sum(math.exp(v) for _, v in out.logprobs[0].top) <= 1.0


def test_empty_batch():
    out = Sampler()(torch.zeros(0, V), SamplingMetadata.from_sequences([], V))
    assert out.token_ids == [] and out.logprobs is None
