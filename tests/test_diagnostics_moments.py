"""Moment, variance, SNR and test arithmetic of the diagnostics against numpy/scipy."""

import numpy as np
import pytest
import torch
from scipy import stats

from dreg.diagnostics.bias_check import holm_reject, t_test
from dreg.diagnostics.moments import EMAMoments, SampleMoments


@pytest.fixture
def draws() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(loc=rng.normal(size=7), scale=rng.uniform(0.5, 2, size=7), size=(40, 7))


def test_ema_moments_match_normalized_weighted_average(draws):
    decay = 0.9
    ema = EMAMoments(decay)
    for g in draws:
        ema.update(torch.from_numpy(g))
    t = len(draws)
    weights = decay ** np.arange(t - 1, -1, -1)  # d^(t-i) for i = 1..t
    weights /= weights.sum()
    mean = weights @ draws
    var = weights @ draws**2 - mean**2
    got_mean, got_var = ema.moments()
    np.testing.assert_allclose(got_mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(got_var.numpy(), var, rtol=1e-10)
    summary = ema.summary()
    assert summary.variance == pytest.approx(var.mean(), rel=1e-10)
    assert summary.snr == pytest.approx((mean**2).mean() / var.mean(), rel=1e-10)
    part = ema.summary(slice(2, 5))
    assert part.snr == pytest.approx((mean[2:5] ** 2).mean() / var[2:5].mean(), rel=1e-10)


def test_ema_first_update_is_the_gradient_and_constant_has_zero_variance():
    ema = EMAMoments(0.99)
    for _ in range(5):
        ema.update(torch.tensor([2.0, -1.0]))
    mean, var = ema.moments()
    assert mean.tolist() == pytest.approx([2.0, -1.0])
    assert var.abs().max().item() < 1e-12


@pytest.mark.parametrize("decay", [-0.1, 1.0])
def test_ema_rejects_bad_decay(decay):
    with pytest.raises(ValueError, match="decay must be in"):
        EMAMoments(decay)


def test_sample_moments_match_numpy_and_are_unbiased(draws):
    moments = SampleMoments(draws.shape[1])
    for g in draws:
        moments.update(torch.from_numpy(g))
    mean, var, mean_square = moments.moments()
    n = len(draws)
    np.testing.assert_allclose(mean.numpy(), draws.mean(0), rtol=1e-12)
    np.testing.assert_allclose(var.numpy(), draws.var(0, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(mean_square.numpy(), draws.mean(0) ** 2 - draws.var(0, ddof=1) / n)
    summary = moments.summary()
    expected = (draws.mean(0) ** 2 - draws.var(0, ddof=1) / n).mean() / draws.var(0, ddof=1).mean()
    assert summary.snr == pytest.approx(expected, rel=1e-10)


def test_sample_moments_all_reduce_equals_union(draws):
    """Two 'ranks' with interleaved draws, their sums all-reduced, give the moments of all."""
    parts = [SampleMoments(draws.shape[1]) for _ in range(2)]
    for i, g in enumerate(draws):
        parts[i % 2].update(torch.from_numpy(g))
    # all_reduce reduces (total, total_sq, count) in this order: add rank 1's to rank 0's.
    other = iter([parts[1].total, parts[1].total_sq, torch.tensor([float(parts[1].count)])])
    parts[0].all_reduce(lambda t: t + next(other))
    whole = SampleMoments(draws.shape[1])
    for g in draws:
        whole.update(torch.from_numpy(g))
    assert parts[0].count == len(draws)
    for got, want in zip(parts[0].moments(), whole.moments(), strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12)


def test_sample_moments_zero_mean_sequence_has_unbiased_zero_signal():
    moments = SampleMoments(1)
    for value in [1.0, -1.0] * 10:
        moments.update(torch.tensor([value]))
    mean, var, mean_square = moments.moments()
    assert mean.item() == 0.0
    assert var.item() == pytest.approx(20 / 19)
    assert mean_square.item() == pytest.approx(-(20 / 19) / 20)


def test_sample_moments_need_two_draws():
    moments = SampleMoments(3)
    moments.update(torch.zeros(3))
    with pytest.raises(ValueError, match="at least 2 draws"):
        moments.moments()


def test_t_test_matches_scipy(draws):
    x = draws[:, 0] - draws[:, 0].mean() + 0.3
    got = t_test(x.sum(), (x**2).sum(), len(x))
    want = stats.ttest_1samp(x, 0.0)
    assert got["t"] == pytest.approx(want.statistic, rel=1e-9)
    assert got["p_value"] == pytest.approx(want.pvalue, rel=1e-7)


def test_t_test_zero_spread():
    assert t_test(0.0, 0.0, 5)["t"] == 0.0
    assert t_test(5.0, 5.0, 5)["t"] == float("inf")


def test_holm_step_down():
    # sorted: 0.005 <= 0.05/4 reject; 0.01 <= 0.05/3 reject; 0.03 > 0.05/2 stop.
    assert holm_reject([0.01, 0.04, 0.03, 0.005], 0.05) == [True, False, False, True]
    assert holm_reject([0.2, 0.3], 0.05) == [False, False]
