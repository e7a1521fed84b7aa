"""The paper's VAE: shapes, initialisation, bounds, and single-backward gradient routing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dreg.estimators import IWAE, GradientWeights, routed_loss, surrogate_losses
from dreg.estimators.ops import normalized_weights
from dreg.model import VAE


def make_vae(context_dim: int = 0, dtype=torch.float64, seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    mean = torch.rand(12) * 0.9
    context_mean = torch.rand(context_dim)
    net = VAE(
        12,
        latent_dim=3,
        hidden_dims=[7, 5],
        train_mean=mean,
        context_dim=context_dim,
        context_mean=context_mean if context_dim else None,
    )
    return net.to(dtype)


def test_paper_architecture_shapes_and_init():
    mean = torch.linspace(0, 1, 784)
    net = VAE(784, latent_dim=50, hidden_dims=[200, 200], train_mean=mean)
    dims = [(m.in_features, m.out_features) for m in net.encoder.net if hasattr(m, "weight")]
    assert dims == [(784, 200), (200, 200), (200, 100)]
    dims = [(m.in_features, m.out_features) for m in net.decoder if hasattr(m, "weight")]
    assert dims == [(50, 200), (200, 200), (200, 784)]
    assert all(isinstance(m, torch.nn.Tanh) for m in net.decoder[1:-1:2])
    # Output bias = logit of the clipped training mean; other biases zero; Xavier-uniform.
    expected = torch.logit(mean.clamp(1e-3, 1 - 1e-3))
    torch.testing.assert_close(net.decoder[-1].bias.detach(), expected)
    assert torch.count_nonzero(net.decoder[0].bias) == 0
    assert torch.count_nonzero(net.encoder.net[-1].bias) == 0
    bound = math.sqrt(6 / (200 + 784))
    w = net.decoder[-1].weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert net.prior is None


def test_encoder_centres_input_and_scale_is_shifted_softplus():
    net = make_vae()
    x = torch.rand(4, 12, dtype=torch.float64)
    mean, scale = net.posterior_params(x)
    raw = net.encoder.net(x - net.train_mean)
    torch.testing.assert_close(mean, raw[:, :3])
    torch.testing.assert_close(scale, F.softplus(raw[:, 3:] + 0.25))


def test_particle_shapes_and_log_weights():
    net = make_vae()
    x = torch.bernoulli(torch.full((5, 12), 0.3, dtype=torch.float64))
    p = net.particles(x, 7)
    assert p.log_p.shape == p.log_q_stopped.shape == p.log_q_stop_z.shape == (7, 5)
    assert p.z_for_p.shape == (7, 5, 3)
    # log_q_stopped and log_q_stop_z share values: they differ only in what carries gradient.
    torch.testing.assert_close(p.log_q_stopped, p.log_q_stop_z)
    assert not p.log_w.requires_grad


def test_iwae_bound_is_logmeanexp_and_k1_is_elbo():
    log_w = torch.randn(64, 9, dtype=torch.float64) * 5
    direct = torch.log(torch.exp(log_w).mean(0))
    torch.testing.assert_close(IWAE()(log_w).objective, direct)
    one = torch.randn(1, 9, dtype=torch.float64)
    torch.testing.assert_close(IWAE()(one).objective, one[0])


def dreg_like(log_w: torch.Tensor) -> GradientWeights:
    """DReG-IWAE coefficients, written here so the routing test needs no other estimator."""
    w = normalized_weights(log_w)
    return GradientWeights(objective=log_w.logsumexp(0), model=w, path=w**2, score=w * 0)


def jvi_like(log_w: torch.Tensor) -> GradientWeights:
    """Signed model coefficients with exact zeros: the hardest case for the routing ratio."""
    w = normalized_weights(log_w)
    model = 2 * w - 0.5
    model[0] = 0.0
    return GradientWeights(objective=log_w.logsumexp(0), model=model, path=w**2 - 0.3, score=-w)


@pytest.mark.parametrize("context_dim", [0, 4], ids=["unconditional", "context"])
@pytest.mark.parametrize(
    "coefficients",
    [lambda lw: IWAE()(lw), dreg_like, jvi_like],
    ids=["iwae", "dreg", "signed-with-zeros"],
)
def test_single_backward_routes_each_surrogate_to_its_own_group(context_dim, coefficients):
    net = make_vae(context_dim)
    x = torch.bernoulli(torch.full((5, 12), 0.4, dtype=torch.float64))
    context = torch.rand(5, context_dim, dtype=torch.float64) if context_dim else None
    model_params, inference_params = net.model_parameters(), net.inference_parameters()

    torch.manual_seed(1)
    particles = net.particles(x, 6, context)
    weights = coefficients(particles.log_w)
    model_loss, inference_loss = surrogate_losses(particles, weights)
    want_model = torch.autograd.grad(model_loss, model_params, retain_graph=True)
    want_inference = torch.autograd.grad(inference_loss, inference_params)

    torch.manual_seed(1)  # the same noise, a fresh graph
    particles = net.particles(x, 6, context)
    net.zero_grad()
    routed_loss(particles, coefficients(particles.log_w)).backward()
    for got, want in zip(model_params, want_model, strict=True):
        torch.testing.assert_close(got.grad, want, rtol=1e-10, atol=1e-10)
    for got, want in zip(inference_params, want_inference, strict=True):
        torch.testing.assert_close(got.grad, want, rtol=1e-10, atol=1e-10)


def test_frozen_model_still_gets_the_full_inference_gradient():
    net = make_vae()
    x = torch.bernoulli(torch.full((5, 12), 0.4, dtype=torch.float64))
    torch.manual_seed(2)
    particles = net.particles(x, 6)
    _, inference_loss = surrogate_losses(particles, dreg_like(particles.log_w))
    want = torch.autograd.grad(inference_loss, net.inference_parameters())
    for p in net.model_parameters():
        p.requires_grad_(False)
    torch.manual_seed(2)
    particles = net.particles(x, 6)
    routed_loss(particles, dreg_like(particles.log_w), train_model=False).backward()
    for got, expected in zip(net.inference_parameters(), want, strict=True):
        torch.testing.assert_close(got.grad, expected, rtol=1e-10, atol=1e-10)
    assert all(p.grad is None for p in net.model_parameters())


def test_log_likelihood_in_chunks_and_above_the_bound_on_average():
    net = make_vae()
    x = torch.bernoulli(torch.full((20, 12), 0.4, dtype=torch.float64))
    chunked = net.log_weights(x, 300, chunk_size=7)  # 42 full chunks and one of 6
    assert chunked.shape == (300, 20) and torch.isfinite(chunked).all()
    ll = net.log_likelihood(x, 2000, chunk_size=500)
    bounds = torch.stack([net.log_likelihood(x, 4) for _ in range(50)]).mean(0)
    assert (ll - bounds).mean() > 0


def test_antithetic_needs_even_k():
    with pytest.raises(ValueError, match="even K"):
        make_vae().particles(torch.zeros(2, 12, dtype=torch.float64), 3, antithetic=True)
