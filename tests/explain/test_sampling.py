"""Attention sampling (Katharopoulos and Fleuret 2019): the draw without replacement has the
sequential-sampling distribution, the estimator is unbiased (exactly, by enumerating every
ordered draw in float64, and empirically over many seeds), K = N is exact, seeds reproduce,
bad input fails clearly."""
import itertools
import math

import pytest
import torch

from attnkern.explain import attention_sample, sampled_expectation


def _ordered_draw_probability(p, order):
    """Probability of drawing ``order`` (a tuple of positions) sequentially without
    replacement, each draw from p renormalised over the positions not drawn yet."""
    prob, left = 1.0, 1.0
    for i in order:
        prob *= p[i] / left
        left -= p[i]
    return prob


def _estimate(p, f, order):
    """The estimator of the paper for one ordered draw, straight from its definition:
    the mean over k of S_k = sum_{j<k} a_{q_j} f_{q_j} + (1 - sum_{j<k} a_{q_j}) f_{q_k}."""
    K = len(order)
    total = 0.0
    for k in range(K):
        seen = order[:k]
        total += sum(p[j] * f[j] for j in seen) + (1 - sum(p[j] for j in seen)) * f[order[k]]
    return total / K


def test_weights_are_the_estimator_of_the_paper():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(4, 9, generator=g, dtype=torch.float64) + 0.05
    f = torch.randn(4, 9, generator=g, dtype=torch.float64)
    s = attention_sample(a, 4, seed=11)
    p = (a / a.sum(1, keepdim=True)).tolist()
    est = sampled_expectation(s, f.gather(1, s.indices))
    for b in range(4):
        expect = _estimate(p[b], f[b].tolist(), tuple(s.indices[b].tolist()))
        assert abs(est[b].item() - expect) < 1e-12
    torch.testing.assert_close(s.weights.sum(1), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("K", [1, 2, 3])
def test_unbiased_exactly_over_every_ordered_draw(K):
    """E over all ordered draws (with their exact probabilities) of the estimate equals
    sum_i a_i f_i, in float64."""
    g = torch.Generator().manual_seed(K)
    N = 5
    a = torch.rand(N, generator=g, dtype=torch.float64) ** 2 + 0.01
    p = (a / a.sum()).tolist()
    f = torch.randn(N, generator=g, dtype=torch.float64).tolist()
    exact = sum(pi * fi for pi, fi in zip(p, f))
    mean = sum(_ordered_draw_probability(p, o) * _estimate(p, f, o) for o in itertools.permutations(range(N), K))
    assert abs(mean - exact) < 1e-12


def test_draw_follows_sequential_sampling():
    """The Gumbel-top-k draw: the frequency of each ordered pair matches its probability
    under sequential sampling without replacement (within 4.5 standard errors)."""
    a = torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64)
    R = 20000
    s = attention_sample(a.expand(R, 4), 2, seed=0)
    counts = {}
    for o in map(tuple, s.indices.tolist()):
        counts[o] = counts.get(o, 0) + 1
    for o in itertools.permutations(range(4), 2):
        p = _ordered_draw_probability(a.tolist(), o)
        se = math.sqrt(p * (1 - p) / R)
        assert abs(counts.get(o, 0) / R - p) < 4.5 * se, (o, counts.get(o, 0) / R, p)


@pytest.mark.parametrize("K", [1, 4, 16])
def test_mean_over_seeds_is_the_exhaustive_expectation(K):
    """Many seeded draws of a peaked attention over N = 64 positions: the mean of the
    estimates is within 4 standard errors of sum_i a_i f_i (computed in float64)."""
    g = torch.Generator().manual_seed(100 + K)
    N, R = 64, 4000
    a = torch.softmax(2 * torch.randn(N, generator=g, dtype=torch.float64), 0)
    f = torch.randn(N, 3, generator=g, dtype=torch.float64)
    exact = (a[:, None] * f).sum(0)
    s = attention_sample(a.expand(R, N), K, generator=torch.Generator().manual_seed(K))
    est = sampled_expectation(s, f[s.indices])          # [R, 3]
    se = est.std(0) / math.sqrt(R)
    assert bool(((est.mean(0) - exact).abs() < 4 * se + 1e-12).all()), (est.mean(0), exact, se)
    assert bool((se > 0).all())                          # the draws do vary


def test_k_equals_n_is_exhaustive():
    g = torch.Generator().manual_seed(5)
    a = torch.rand(3, 7, generator=g, dtype=torch.float64)
    f = torch.randn(3, 7, 2, generator=g, dtype=torch.float64)
    exact = ((a / a.sum(1, keepdim=True))[..., None] * f).sum(1)
    for seed in range(5):
        s = attention_sample(a, 7, seed=seed)
        assert sorted(s.indices[0].tolist()) == list(range(7))
        est = sampled_expectation(s, f.gather(1, s.indices[..., None].expand(-1, -1, 2)))
        torch.testing.assert_close(est, exact, rtol=0, atol=1e-14)


def test_reproducible_under_a_seed():
    a = torch.rand(2, 50)
    s1, s2 = attention_sample(a, 10, seed=42), attention_sample(a, 10, seed=42)
    assert torch.equal(s1.indices, s2.indices) and torch.equal(s1.weights, s2.weights)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(attention_sample(a, 10, generator=g1).indices, attention_sample(a, 10, generator=g2).indices)
    assert not torch.equal(attention_sample(a, 10, seed=1).indices, attention_sample(a, 10, seed=2).indices)
    assert s1.weights.dtype == torch.float32 and s1.indices.dtype == torch.int64
    assert len(set(s1.indices[0].tolist())) == 10          # without replacement


def test_zero_attention_positions_come_last_with_weight_zero():
    a = torch.tensor([[0.0, 0.7, 0.0, 0.3, 0.0]], dtype=torch.float64)
    f = torch.tensor([[100.0, 1.0, 100.0, 2.0, 100.0]], dtype=torch.float64)
    for seed in range(10):
        s = attention_sample(a, 4, seed=seed)
        assert sorted(s.indices[0, :2].tolist()) == [1, 3]
        assert s.weights[0, 2:].tolist() == [0.0, 0.0]
        torch.testing.assert_close(sampled_expectation(s, f.gather(1, s.indices)),
                                   torch.tensor([0.7 + 0.6], dtype=torch.float64), rtol=0, atol=1e-14)


@pytest.mark.parametrize("attention,k,err,msg", [
    (torch.rand(2, 5), 6, ValueError, "k must be in 1 .. N = 5"),
    (torch.rand(2, 5), 0, ValueError, "k must be in 1 .. N = 5"),
    (torch.rand(2, 5), 2.0, TypeError, "k must be an int"),
    (torch.tensor([[0.2, 0.8], [0.0, 0.0]]), 1, ValueError, "row(s) [1] are all zero"),
    (torch.tensor([[0.2, -0.1]]), 1, ValueError, "non-negative"),
    (torch.tensor([[0.2, float("nan")]]), 1, ValueError, "finite"),
    (torch.ones(2, 5, dtype=torch.long), 1, TypeError, "floating"),
    (torch.rand(2, 3, 4), 1, ValueError, "[B, N]"),
])
def test_bad_input(attention, k, err, msg):
    with pytest.raises(err) as e:
        attention_sample(attention, k, seed=0)
    assert msg in str(e.value)
