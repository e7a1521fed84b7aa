"""``VAE.particles`` builds its Particles through ``dreg.library.make_particles``, with
bitwise the particles and gradients of the hand-written construction it replaced."""

from __future__ import annotations

import pytest
import torch

import dreg.model
from dreg.estimators import IWAE, DReGIWAE, Particles, routed_loss
from dreg.model import VAE, gaussian_log_prob


def hand_written_particles(
    net: VAE, x: torch.Tensor, num_samples: int, context=None, antithetic: bool = False
) -> Particles:
    """A verbatim copy of ``VAE.particles`` before it used the library (commit 7bee051)."""
    mean, scale = net.posterior_params(x, context)  # [B, Dz] each
    shape = (num_samples, *mean.shape)
    if antithetic:
        if num_samples % 2:
            raise ValueError(f"antithetic sampling needs an even K, got K={num_samples}")
        half = torch.randn((num_samples // 2, *mean.shape), device=x.device, dtype=mean.dtype)
        eps = torch.cat([half, -half], dim=0)  # [K, B, Dz]
    else:
        eps = torch.randn(shape, device=x.device, dtype=mean.dtype)  # [K, B, Dz]
    z = mean + scale * eps  # [K, B, Dz]
    z_for_p = z.view_as(z)  # a distinct autograd node: the routing hook goes here
    return Particles(
        log_p=net.log_joint(x, z_for_p, context),
        log_q_stopped=gaussian_log_prob(z, mean.detach(), scale.detach()),
        log_q_stop_z=gaussian_log_prob(z.detach(), mean, scale),
        z_for_p=z_for_p,
    )


def make_vae(context_dim: int, dtype: torch.dtype) -> VAE:
    torch.manual_seed(0)
    net = VAE(
        12,
        latent_dim=3,
        hidden_dims=[7, 5],
        train_mean=torch.rand(12) * 0.9,
        context_dim=context_dim,
        context_mean=torch.rand(context_dim) if context_dim else None,
    )
    return net.to(dtype)


def particles_and_grads(build, net, x, context, antithetic, estimator):
    torch.manual_seed(7)
    particles = build(net, x, 6, context, antithetic)
    net.zero_grad(set_to_none=True)
    routed_loss(particles, estimator(particles.log_w)).backward()
    return particles, [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("context_dim", [0, 4], ids=["unconditional", "context"])
@pytest.mark.parametrize(
    ("antithetic", "estimator"),
    [(False, DReGIWAE()), (True, IWAE())],
    ids=["iid-dreg_iwae", "antithetic-iwae"],
)
def test_vae_particles_and_gradients_are_bitwise_the_hand_written_ones(
    dtype, context_dim, antithetic, estimator
):
    net = make_vae(context_dim, dtype)
    x = torch.bernoulli(torch.full((5, 12), 0.4, dtype=dtype))
    context = torch.rand(5, context_dim, dtype=dtype) if context_dim else None
    old, old_grads = particles_and_grads(
        hand_written_particles, net, x, context, antithetic, estimator
    )
    new, new_grads = particles_and_grads(VAE.particles, net, x, context, antithetic, estimator)
    for field in ("log_p", "log_q_stopped", "log_q_stop_z", "z_for_p"):
        assert torch.equal(getattr(new, field), getattr(old, field)), field
    assert len(new_grads) == len(old_grads)
    assert all(torch.equal(a, b) for a, b in zip(new_grads, old_grads, strict=True))


def test_vae_builds_particles_through_the_library(monkeypatch):
    calls = []
    real = dreg.model.make_particles

    def spy(*args, **kwargs):
        calls.append(kwargs.get("noise"))
        return real(*args, **kwargs)

    monkeypatch.setattr(dreg.model, "make_particles", spy)
    net = make_vae(0, torch.float64)
    x = torch.zeros(2, 12, dtype=torch.float64)
    net.particles(x, 4)
    net.particles(x, 4, antithetic=True)
    assert calls == [None, dreg.model.antithetic_noise]


def test_vae_keeps_a_nan_scale_for_the_nonfinite_policy():
    """The proposal is built without argument validation: a NaN encoder output must reach the
    loss (where ``model.nonfinite`` raises or skips), not fail in a distribution constructor."""
    net = make_vae(0, torch.float64)
    with torch.no_grad():
        net.encoder.net[-1].bias.fill_(float("nan"))
    particles = net.particles(torch.zeros(2, 12, dtype=torch.float64), 4)
    assert torch.isnan(particles.log_w).all()
