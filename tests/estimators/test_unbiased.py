"""Unbiasedness and bias over many independent draws (analytic model, float64, fixed seeds).

Estimators are compared *paired*: on the same draws, the per-coordinate mean of their
difference must lie within 4 standard errors of zero. STL fails the same check by more than 10
standard errors, which shows the test has power.
"""

from __future__ import annotations

import math

import pytest
import torch

from dreg.analytic import GaussianModel
from tests.estimators.cases import ALPHA, sample_gradients, t_statistics

NUM_DRAWS = 2000
MAX_T = 4.0


@pytest.fixture(scope="module")
def model() -> GaussianModel:
    return GaussianModel.default()


@pytest.fixture(scope="module")
def gradients(model):
    """Inference gradients of every compared estimator, K -> name -> [N, P]."""
    names = ["iwae", "stl", "dreg_iwae", "rws", "dreg_rws", "dreg_alpha", "jvi", "dreg_jvi"]
    names += ["dreg_cv", "miwae", "dreg_miwae", "piwae", "dreg_piwae"]
    return {
        k: {n: g[1] for n, g in sample_gradients(model, k, NUM_DRAWS, names, seed=k).items()}
        for k in (2, 8, 64)
    }


@pytest.mark.parametrize("k", [2, 8, 64])
@pytest.mark.parametrize(
    ("name", "reference"),
    [("dreg_iwae", "iwae"), ("dreg_rws", "rws"), ("dreg_jvi", "jvi"), ("dreg_cv", "iwae"),
     ("dreg_miwae", "miwae"), ("dreg_piwae", "piwae")],
    ids=["dreg_iwae-iwae", "dreg_rws-rws", "dreg_jvi-jvi", "dreg_cv-iwae",
         "dreg_miwae-miwae", "dreg_piwae-piwae"],
)  # fmt: skip
def test_dreg_estimator_is_unbiased_for_its_reference(gradients, name, reference, k):
    diff = gradients[k][name] - gradients[k][reference]  # [N, P], paired
    assert t_statistics(diff).abs().max() < MAX_T


@pytest.mark.parametrize("k", [2, 8, 64])
def test_dreg_alpha_estimates_the_alpha_mixture(gradients, k):
    g = gradients[k]
    mixture = (1 - ALPHA) * g["iwae"] + ALPHA * g["rws"]
    assert t_statistics(g["dreg_alpha"] - mixture).abs().max() < MAX_T


@pytest.mark.parametrize("k", [8, 64])
def test_miwae_is_not_the_iwae_gradient(gradients, k):
    """The check has power for the grouped estimators: MIWAE(M, K/M)'s expected inference
    gradient differs from IWAE_K's (M = 2 groups). Shown on the DReG forms, whose paired
    difference is far less noisy (IWAE's own noise hides the gap at K = 64 with these draws)."""
    diff = gradients[k]["dreg_miwae"] - gradients[k]["dreg_iwae"]
    assert t_statistics(diff).abs().max() > 10


@pytest.mark.parametrize("k", [2, 8, 64])
def test_stl_is_biased_away_from_the_posterior(gradients, k):
    diff = gradients[k]["stl"] - gradients[k]["iwae"]
    assert t_statistics(diff).abs().max() > 10


def test_dreg_iwae_norm_is_not_the_iwae_gradient(gradients, model):
    g = sample_gradients(model, 8, NUM_DRAWS, ["iwae", "dreg_iwae_norm"], seed=11)
    diff = g["dreg_iwae_norm"][1] - g["iwae"][1]
    assert t_statistics(diff).abs().max() > 10


# -- what the _norm variants estimate (their K -> infinity limits) -------------------------
def closed_form_gradient(model: GaussianModel, objective) -> torch.Tensor:
    """d objective(mu, log_sigma) / d(mu, log_sigma), flattened like Draw.gradients."""
    mu = model.mu.clone().requires_grad_(True)
    log_sigma = model.log_sigma.clone().requires_grad_(True)
    grads = torch.autograd.grad(objective(model, mu, log_sigma), [mu, log_sigma])
    return torch.cat([g.reshape(-1) for g in grads])


def half_neg_renyi2(model: GaussianModel, mu, log_sigma):
    """-1/2 log E_q[w^2] up to phi-independent terms: -1/2 sum log int p(z|x)^2 / q(z) dz."""
    mean, std = model.posterior()
    s2, v = std**2, (2 * log_sigma).exp()
    a = 1 / s2 - 1 / (2 * v)  # > 0 needs sigma^2 > 1/4
    b = mean / s2 - mu / (2 * v)
    c = mean**2 / s2 - mu**2 / (2 * v)
    log_int = (
        -torch.log(2 * math.pi * s2)
        + 0.5 * torch.log(2 * math.pi * v)
        + 0.5 * torch.log(math.pi / a)
        + b**2 / a
        - c
    )
    return -0.5 * log_int.sum()


def neg_kl_posterior_to_q(model: GaussianModel, mu, log_sigma):
    """-KL(p(z|x) || q), whose gradient is E_p[d log q]: the RWS wake-phi target."""
    mean, std = model.posterior()
    sigma = log_sigma.exp()
    kl = torch.log(sigma / std) + (std**2 + (mean - mu) ** 2) / (2 * sigma**2) - 0.5
    return -kl.sum()


@pytest.mark.parametrize(
    ("name", "objective"),
    [
        ("dreg_iwae_norm", half_neg_renyi2),
        ("dreg_rws_norm", neg_kl_posterior_to_q),
        ("rws", neg_kl_posterior_to_q),  # fixes the sign of the RWS score convention
        ("dreg_rws", neg_kl_posterior_to_q),
    ],
)
def test_large_k_limit(name, objective):
    """dreg_iwae_norm -> -1/2 d D_2(p(z|x) || q); (dreg_)rws(_norm) -> -d KL(p(z|x) || q).
    Tolerance: 4 SE plus 5/K relative for the O(1/K) self-normalization bias."""
    k, num_draws = 2048, 100
    model = GaussianModel.default(mu_offset=0.3, sigma=0.8)
    g = sample_gradients(model, k, num_draws, [name], seed=12)[name][1]
    target = closed_form_gradient(model, objective)
    se = g.std(0) / math.sqrt(num_draws)
    assert ((g.mean(0) - target).abs() <= MAX_T * se + 5 / k * target.abs().max()).all()
