"""Guards against silent misuse, each one clear line: routed_loss twice on one pass,
train_model=False with a model that still trains, and antithetic noise (however wrapped) with a
DReG estimator."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.distributions import Independent, Normal

from dreg.estimators import IWAE, DReGIWAE, routed_loss, surrogate_losses
from dreg.hierarchical import TwoLayerVAE
from dreg.library import (
    HierarchicalProposal,
    antithetic_noise,
    make_particles,
    monte_carlo_objective,
    standard_normal_noise,
)

K, B, D = 4, 3, 2


def one_line_error(error_type, match: str, call) -> str:
    with pytest.raises(error_type, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def gaussian():
    loc = torch.zeros(B, D, dtype=torch.float64, requires_grad=True)
    return Independent(Normal(loc, torch.ones_like(loc)), 1)


def log_joint(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * z.square().sum(-1)


# -- routed_loss twice ----------------------------------------------------------------------------
def test_routed_loss_twice_on_the_same_particles_is_refused():
    torch.manual_seed(0)
    net = TwoLayerVAE(6, latent_dims=(3, 2), hidden_dims=[[4], [4]]).double()
    x = torch.bernoulli(torch.full((B, 6), 0.5, dtype=torch.float64))
    particles = net.particles(x, K)
    weights = DReGIWAE()(particles.log_w)
    # surrogate_losses registers nothing: any number of them on one pass is fine.
    surrogate_losses(particles, weights)
    surrogate_losses(particles, IWAE()(particles.log_w))
    routed_loss(particles, weights).backward()
    message = one_line_error(
        ValueError,
        "routed_loss was already called on these Particles",
        lambda: routed_loss(particles, IWAE()(particles.log_w)),
    )
    assert "build new Particles" in message and "surrogate_losses" in message
    routed_loss(net.particles(x, K), weights)  # a new pass is fine


def test_routed_loss_twice_through_the_library_result():
    result = monte_carlo_objective(gaussian(), log_joint, K)
    one_line_error(
        ValueError,
        "already called",
        lambda: routed_loss(result.particles, result.weights),
    )


def test_particles_without_a_path_can_be_routed_again():
    """No hook is registered when z carries no gradient (e.g. under no_grad): nothing to guard."""
    with torch.no_grad():
        particles = make_particles(gaussian(), log_joint, K)
        weights = DReGIWAE()(particles.log_w)
        routed_loss(particles, weights)
        routed_loss(particles, weights)


# -- train_model=False with a model that still requires grad --------------------------------------
def test_train_model_false_with_trainable_model_parameters_is_refused():
    decoder = torch.nn.Linear(D, 3, dtype=torch.float64)
    x = torch.randn(B, 3, dtype=torch.float64)

    def model_log_joint(z):
        return log_joint(z) - 0.5 * (x - decoder(z)).square().sum(-1)

    message = one_line_error(
        ValueError,
        r"train_model=False, but log_joint depends on 2 tensor\(s\) that require grad",
        lambda: monte_carlo_objective(gaussian(), model_log_joint, K, train_model=False),
    )
    assert "[3, 2], [3]" in message and "requires_grad_(False)" in message
    decoder.requires_grad_(False)
    result = monte_carlo_objective(gaussian(), model_log_joint, K, train_model=False)
    result.loss.backward()  # frozen: accepted, and the proposal still gets its gradient
    assert result.particles.z_for_p.requires_grad


def test_routed_loss_called_directly_refuses_a_trainable_model_under_train_model_false():
    """The guard lives in routed_loss itself, not only in monte_carlo_objective."""
    decoder = torch.nn.Linear(D, 3, dtype=torch.float64)
    x = torch.randn(B, 3, dtype=torch.float64)

    def model_log_joint(z):
        return log_joint(z) - 0.5 * (x - decoder(z)).square().sum(-1)

    particles = make_particles(gaussian(), model_log_joint, K)
    weights = DReGIWAE()(particles.log_w)
    message = one_line_error(
        ValueError,
        r"train_model=False, but log_joint depends on 2 tensor\(s\)",
        lambda: routed_loss(particles, weights, train_model=False),
    )
    assert "requires_grad_(False)" in message


def test_train_model_false_checks_hierarchical_proposals_too():
    torch.manual_seed(0)
    net = TwoLayerVAE(6, latent_dims=(3, 2), hidden_dims=[[4], [4]]).double()
    x = torch.bernoulli(torch.full((B, 6), 0.5, dtype=torch.float64))
    layer2 = torch.nn.Linear(3, 4, dtype=torch.float64)

    def q2(z1):
        loc, log_scale = layer2(z1).chunk(2, -1)
        return Independent(Normal(loc, log_scale.exp()), 1)

    def proposal():
        return HierarchicalProposal([lambda: Independent(Normal(*net.encoder_z1(x)), 1), q2], net)

    with pytest.raises(ValueError, match="still depends on 2 tensor"):  # layer2 is not net's
        monte_carlo_objective(proposal(), lambda z: net.log_joint(x, z), K)
    net.layer2 = layer2  # now net owns every parameter the layers use
    one_line_error(
        ValueError,
        "train_model=False, but log_joint depends on",
        lambda: monte_carlo_objective(
            proposal(), lambda z: net.log_joint(x, z), K, train_model=False
        ),
    )
    for p in net.model_parameters():
        p.requires_grad_(False)
    monte_carlo_objective(
        proposal(), lambda z: net.log_joint(x, z), K, train_model=False
    ).loss.backward()


# -- antithetic noise, however it is wrapped ------------------------------------------------------
@functools.wraps(antithetic_noise)
def decorated(shape, dtype, device):
    return antithetic_noise(shape, dtype, device)


def interleaved_pairs(shape, dtype, device):
    """A custom antithetic scheme with no marker: draws 2j and 2j+1 mirror each other."""
    half = torch.randn((shape[0] // 2, *shape[1:]), dtype=dtype, device=device)
    return torch.stack([half, -half], dim=1).reshape(shape)


def repeated(shape, dtype, device):
    return torch.randn(shape[1:], dtype=dtype, device=device).expand(shape).clone()


def marked(shape, dtype, device):
    return standard_normal_noise(shape, dtype, device)


marked.dependent_samples = True  # e.g. a quasi-random scheme the user knows to be dependent

SAMPLERS = {
    "antithetic_noise": antithetic_noise,
    "partial": functools.partial(antithetic_noise),
    "nested-partial": functools.partial(functools.partial(antithetic_noise)),
    "lambda": lambda shape, dtype, device: antithetic_noise(shape, dtype, device),
    "wraps": decorated,
    "interleaved-pairs": interleaved_pairs,
    "repeated-draws": repeated,
    "marked": marked,
}


@pytest.mark.parametrize("sampler", list(SAMPLERS.values()), ids=list(SAMPLERS))
@pytest.mark.parametrize("name", ["dreg_iwae", "dreg_rws", "dreg_jvi", "dreg_alpha"])
def test_dependent_noise_is_refused_for_dreg_estimators(sampler, name):
    one_line_error(
        ValueError,
        f"estimator '{name}' needs independent samples",
        lambda: monte_carlo_objective(gaussian(), log_joint, K, name, noise=sampler),
    )


@pytest.mark.parametrize("sampler", list(SAMPLERS.values()), ids=list(SAMPLERS))
def test_dependent_noise_is_refused_through_a_hierarchical_proposal(sampler):
    encoder = torch.nn.Linear(D, 2 * D, dtype=torch.float64)

    def q2(z1):
        loc, log_scale = encoder(z1).chunk(2, -1)
        return Independent(Normal(loc, log_scale.exp()), 1)

    layers = [gaussian, q2]
    one_line_error(
        ValueError,
        "'dreg_iwae' needs independent samples",
        lambda: monte_carlo_objective(
            HierarchicalProposal(layers, encoder), log_joint, K, noise=sampler
        ),
    )


@pytest.mark.parametrize("sampler", list(SAMPLERS.values()), ids=list(SAMPLERS))
def test_dependent_noise_stays_allowed_for_fully_reparameterized_estimators(sampler):
    monte_carlo_objective(gaussian(), log_joint, K, "iwae", noise=sampler).loss.backward()


def test_independent_samplers_and_replayed_tensors_pass():
    def own_sampler(shape, dtype, device):
        return torch.randn(shape, dtype=dtype, device=device)

    for noise in (
        None,
        standard_normal_noise,
        own_sampler,
        torch.randn(K, B, D, dtype=torch.float64),
    ):
        monte_carlo_objective(gaussian(), log_joint, K, noise=noise).loss.backward()
    assert not hasattr(standard_normal_noise, "dependent_samples")
