"""Sampling formulas on hand-made logits."""
import math

import pytest
import torch

from mistralrs.engine.sampling import SamplingParams, apply_penalties, sample, top_k_top_p_mask


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_penalties_follow_openai_formula():
    logits = torch.zeros(2, 5)
    recent = [[1, 1, 3], []]
    out = apply_penalties(logits, recent, torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.25]))
    # logit[t] -= count[t] * frequency + (count[t] > 0) * presence
    assert out[0].tolist() == [0.0, -(2 * 0.25 + 0.5), 0.0, -(0.25 + 0.5), 0.0]
    assert out[1].tolist() == [0.0] * 5


def test_greedy_takes_argmax_after_bias_and_penalty():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    p = SamplingParams(temperature=0.0)
    assert sample(logits, [p], [[]], gens(1)).tokens == [1]
    p = SamplingParams(temperature=0.0, logit_bias={3: 5.0})
    assert sample(logits, [p], [[]], gens(1)).tokens == [3]
    p = SamplingParams(temperature=0.0, presence_penalty=2.0)
    assert sample(logits, [p], [[1]], gens(1)).tokens == [2]


def test_logprobs_are_the_models_own_log_softmax():
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0]])
    p = SamplingParams(temperature=0.0, logit_bias={0: 10.0}, logprobs=True, top_logprobs=2)
    s = sample(logits, [p], [[]], gens(1))
    ref = torch.log_softmax(logits[0], -1)
    assert s.tokens == [0]
    assert math.isclose(s.logprobs[0], ref[0].item(), rel_tol=1e-6)
    assert [t for t, _ in s.top[0]] == [1, 3]
    assert math.isclose(s.top[0][0][1], ref[1].item(), rel_tol=1e-6)


def test_top_k_and_top_p_masks():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    keep = lambda k, p: torch.isfinite(top_k_top_p_mask(logits, torch.tensor([k]), torch.tensor([p])))[0].tolist()
    assert keep(2, 1.0) == [True, True, False, False, False]
    # nucleus: smallest prefix reaching p; the token that crosses p is kept
    assert keep(5, 0.6) == [True, True, False, False, False]
    assert keep(5, 0.5) == [True, False, False, False, False]
    assert keep(5, 0.71) == [True, True, True, False, False]
    assert keep(1, 0.99) == [True, False, False, False, False]


def test_sampling_distribution_matches_temperature():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).repeat(4000, 1)
    p = SamplingParams(temperature=2.0)
    s = sample(logits, [p] * 4000, [[]] * 4000, gens(4000))
    freq = torch.bincount(torch.tensor(s.tokens), minlength=3).float() / 4000
    expected = torch.softmax(torch.tensor([0.0, 1.0, 2.0]) / 2.0, -1)
    assert torch.allclose(freq, expected, atol=0.03), (freq, expected)


def test_top_k_restricts_samples():
    logits = torch.tensor([[0.0, 0.1, 0.2, 0.3]]).repeat(500, 1)
    s = sample(logits, [SamplingParams(top_k=2)] * 500, [[]] * 500, gens(500))
    assert set(s.tokens) == {2, 3}


@pytest.mark.parametrize("seed", [0, 7])
def test_seeded_generators_reproduce(seed):
    logits = torch.randn(3, 50)
    ps = [SamplingParams(temperature=1.3, top_p=0.9)] * 3
    a = sample(logits, ps, [[]] * 3, gens(3, seed)).tokens
    b = sample(logits, ps, [[]] * 3, gens(3, seed)).tokens
    assert a == b
