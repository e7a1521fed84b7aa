"""Antithetic sampling (``model.antithetic``): half the noise mirrored, (eps, -eps).

Each z_k is still distributed as q, so the ELBO (``vae``) gradient stays unbiased, here checked
against the closed-form ELBO gradient. The DReG identity, however, needs independent samples:
with mirrored pairs dreg_iwae no longer has the expectation of iwae. The last test pins this
down so that nobody relies on the combination.
"""

from __future__ import annotations

import math

import pytest
import torch

from dreg.analytic import GaussianModel
from dreg.model import VAE
from tests.estimators.cases import sample_gradients, t_statistics


def test_vae_particles_mirror_the_noise():
    torch.manual_seed(0)
    vae = VAE(data_dim=6, latent_dim=3, hidden_dims=[5])
    x = torch.bernoulli(torch.full((4, 6), 0.5))
    particles = vae.particles(x, 6, antithetic=True)
    mean, _ = vae.posterior_params(x)
    z = particles.z_for_p.detach()  # [K, B, Dz]
    assert torch.allclose(z[:3] + z[3:], 2 * mean.detach().expand(3, -1, -1), atol=1e-6)
    assert not torch.allclose(z[0], z[1])
    with pytest.raises(ValueError, match="even K"):
        vae.particles(x, 5, antithetic=True)


def exact_elbo_gradient(model: GaussianModel) -> torch.Tensor:
    """d/d(mu, log_sigma) of ELBO = log p(x) - KL(q || p(z|x)), flattened like Draw.gradients."""
    mu = model.mu.clone().requires_grad_(True)
    log_sigma = model.log_sigma.clone().requires_grad_(True)
    mean, std = model.posterior()
    sigma = log_sigma.exp()
    kl = (torch.log(std / sigma) + (sigma**2 + (mu - mean) ** 2) / (2 * std**2) - 0.5).sum()
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(-kl, [mu, log_sigma])])


@pytest.mark.parametrize("antithetic", [False, True], ids=["iid", "antithetic"])
def test_elbo_gradient_is_unbiased(antithetic):
    model, num_draws = GaussianModel.default(), 2000
    g = sample_gradients(model, 4, num_draws, ["vae"], seed=41, antithetic=antithetic)["vae"][1]
    se = g.std(0) / math.sqrt(num_draws)
    # The mu-gradient of a quadratic log-joint is linear in eps: exact (SE = 0) when mirrored.
    assert ((g.mean(0) - exact_elbo_gradient(model)).abs() <= 4 * se + 1e-10).all()


def test_mirrored_pairs_break_the_dreg_identity():
    g = sample_gradients(
        GaussianModel.default(), 2, 4000, ["iwae", "dreg_iwae"], seed=42, antithetic=True
    )
    assert t_statistics(g["dreg_iwae"][1] - g["iwae"][1]).abs().max() > 10
