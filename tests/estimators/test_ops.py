"""O(K) leave-one-out helpers against naive O(K^2) references (TFP VIMCO-test style)."""

from __future__ import annotations

import math

import pytest
import torch

from dreg.estimators.jackknife import jackknife_bound, jackknife_weights
from dreg.estimators.ops import leave_one_out_logsumexp, log_one_minus_normalized, safe_softmax
from tests.estimators.cases import loo_weight_powers, naive_jackknife_bound

INF = math.inf


def naive_leave_one_out(log_w: torch.Tensor) -> torch.Tensor:
    k = log_w.shape[0]
    return torch.stack(
        [torch.logsumexp(torch.cat([log_w[:i], log_w[i + 1 :]]), 0) for i in range(k)]
    )


def log_weight_cases() -> dict[str, torch.Tensor]:
    """``[K, B]`` float64 log-weights: ordinary, 1e4-nat spreads, -inf entries, K = 2."""
    gen = torch.Generator().manual_seed(0)
    ordinary = 3 * torch.randn(7, 5, generator=gen, dtype=torch.float64) - 90
    spread = ordinary.clone()
    spread[0] += 1e4
    spread[3, :2] -= 1e4
    with_inf = ordinary.clone()
    with_inf[2, :] = -INF
    with_inf[5, 1] = -INF
    pair = torch.tensor([[0.0, -1e4, 5.0], [-1e4, 0.0, 5.0]], dtype=torch.float64)
    return {"ordinary": ordinary, "spread": spread, "with_inf": with_inf, "pair": pair}


CASES = log_weight_cases()


@pytest.mark.parametrize("case", CASES)
def test_leave_one_out_logsumexp_matches_naive(case):
    log_w = CASES[case]
    assert torch.allclose(leave_one_out_logsumexp(log_w), naive_leave_one_out(log_w), atol=1e-10)


def test_leave_one_out_single_sample_is_minus_inf():
    assert leave_one_out_logsumexp(torch.zeros(1, 3)).eq(-INF).all()


@pytest.mark.parametrize("case", CASES)
def test_jackknife_bound_matches_brute_force(case):
    log_w = CASES[case]
    assert torch.allclose(jackknife_bound(log_w), naive_jackknife_bound(log_w), atol=1e-5, rtol=0)


@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("case", CASES)
def test_jackknife_weights_match_loops(case, power):
    log_w = CASES[case]
    k = log_w.shape[0]
    norm_w = torch.softmax(log_w, 0)
    expected = k * norm_w**power - (k - 1) / k * loo_weight_powers(log_w, power)
    assert torch.allclose(jackknife_weights(log_w, power), expected, atol=1e-10)


def test_jackknife_weights_are_the_gradient_of_the_bound():
    log_w = CASES["ordinary"].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(naive_jackknife_bound(log_w).sum(), log_w)
    assert torch.allclose(jackknife_weights(log_w.detach()), grad, atol=1e-10)


def test_shift_invariance():
    """Weights depend on log-weight differences only; the bounds shift by the constant."""
    log_w = CASES["ordinary"]
    for shift in (1e3, -1e3):
        assert torch.allclose(jackknife_weights(log_w + shift), jackknife_weights(log_w))
        assert torch.allclose(jackknife_bound(log_w + shift), jackknife_bound(log_w) + shift)


def test_log_one_minus_normalized_is_accurate_when_one_weight_dominates():
    log_w = torch.tensor([[0.0], [-50.0]], dtype=torch.float64)  # w~_0 = 1 - 2e-22
    expected = torch.tensor([[-50.0], [0.0]], dtype=torch.float64)  # log(1 - w~)
    assert torch.allclose(log_one_minus_normalized(log_w), expected, atol=1e-12)


def test_safe_softmax_all_minus_inf_column_is_zero():
    logits = torch.tensor([[-INF, 0.0], [-INF, 1.0]])
    out = safe_softmax(logits)
    assert out[:, 0].eq(0).all() and torch.allclose(out[:, 1].sum(), torch.tensor(1.0))
