"""TwoLayerVAE (Burda et al. 2016): shapes and initialisation, the propose / log_joint /
particles interface, gradients of every estimator, evaluation, and its config."""

from __future__ import annotations

import pytest
import torch
import yaml
from hydra.utils import instantiate
from torch.distributions import Independent, Normal

from dreg.estimators import routed_loss, surrogate_losses
from dreg.hierarchical import TwoLayerVAE
from dreg.library import HierarchicalProposal, make_hierarchical_particles
from dreg.model import gaussian_log_prob
from tests.conftest import CONF_DIR, compose_config
from tests.estimators.cases import ESTIMATORS, MIN_SAMPLES, NAMES

DATA_DIM, DIMS, K, B = 12, (3, 2), 6, 5


def make_net(context_dim: int = 0, dtype=torch.float64, seed: int = 0) -> TwoLayerVAE:
    torch.manual_seed(seed)
    net = TwoLayerVAE(
        DATA_DIM,
        latent_dims=DIMS,
        hidden_dims=[[7, 5], [4]],
        train_mean=torch.rand(DATA_DIM) * 0.9,
        context_dim=context_dim,
        context_mean=torch.rand(context_dim) if context_dim else None,
    )
    return net.to(dtype)


def batch(context_dim: int = 0, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.bernoulli(torch.full((B, DATA_DIM), 0.4, dtype=torch.float64), generator=gen)
    context = torch.rand(B, context_dim, generator=gen, dtype=torch.float64)
    return x, context if context_dim else None


def test_burda_architecture_shapes_and_init():
    mean = torch.linspace(0, 1, 784)
    net = TwoLayerVAE(784, train_mean=mean)
    assert net.latent_dims == (100, 50) and net.noise_dim == 150 and net.context_dim == 0

    def dims(seq):
        return [(m.in_features, m.out_features) for m in seq if hasattr(m, "weight")]

    assert dims(net.encoder_z1.net) == [(784, 200), (200, 200), (200, 200)]  # mean and scale
    assert dims(net.encoder_z2.net) == [(100, 100), (100, 100), (100, 100)]
    assert dims(net.decoder_z1.net) == [(50, 100), (100, 100), (100, 200)]
    assert dims(net.decoder_x) == [(100, 200), (200, 200), (200, 784)]
    assert all(isinstance(m, torch.nn.Tanh) for m in net.decoder_x[1:-1:2])
    assert net.prior is None
    expected = torch.logit(mean.clamp(1e-3, 1 - 1e-3))
    assert torch.allclose(net.decoder_x[-1].bias, expected)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert all((m.bias == 0).all() for m in linears if m is not net.decoder_x[-1])
    bound = (6 / sum(net.decoder_x[0].weight.shape)) ** 0.5  # Xavier-uniform
    assert net.decoder_x[0].weight.abs().max() <= bound
    assert torch.equal(net.train_mean, mean) and net.context_mean.shape == (0,)


@pytest.mark.parametrize("context_dim", [0, 4], ids=["unconditional", "context"])
def test_parameter_groups_partition_the_parameters(context_dim):
    net = make_net(context_dim)
    model, inference = net.model_parameters(), net.inference_parameters()
    ids = [id(p) for p in [*model, *inference]]
    assert len(ids) == len(set(ids)) == len(list(net.parameters()))
    layers = net.layer_parameters()
    assert [id(p) for p in [*layers["layer1"], *layers["layer2"]]] == [id(p) for p in inference]
    assert (net.prior is not None) == bool(context_dim)


@pytest.mark.parametrize("context_dim", [0, 4], ids=["unconditional", "context"])
def test_propose_and_particles(context_dim):
    net = make_net(context_dim)
    x, context = batch(context_dim)
    eps = torch.randn(K, B, net.noise_dim, dtype=torch.float64)
    z, log_q_stopped, log_q_stop_z = net.propose(x, context, eps)
    assert z.shape == (K, B, sum(DIMS))
    assert log_q_stopped.shape == log_q_stop_z.shape == (K, B)
    torch.testing.assert_close(log_q_stopped, log_q_stop_z, rtol=0, atol=1e-12)  # same value
    # z1 = mean1 + scale1 eps1 (the encoder of the centred input), z2 from q(z2 | z1).
    inputs = x - net.train_mean
    if context_dim:
        inputs = torch.cat([inputs, context - net.context_mean], -1)
    mean1, scale1 = net.encoder_z1(inputs)
    torch.testing.assert_close(z[..., :3], mean1 + scale1 * eps[..., :3])

    torch.manual_seed(2)
    particles = net.particles(x, K, context)
    torch.manual_seed(2)
    z_again, _, _ = net.propose(x, context, torch.randn(K, B, net.noise_dim, dtype=torch.float64))
    assert torch.equal(particles.z_for_p, z_again)
    assert particles.z_for_p._base is not None  # an alias of z: the routing hook's own node
    assert torch.equal(particles.log_p, net.log_joint(x, z_again, context))
    assert particles.log_w.shape == (K, B) and not particles.log_w.requires_grad


def test_log_joint_is_the_sum_of_the_three_factors():
    net = make_net()
    x, _ = batch()
    z = torch.randn(K, B, sum(DIMS), dtype=torch.float64)
    z1, z2 = z[..., :3], z[..., 3:]
    prior = Independent(Normal(torch.zeros_like(z2), torch.ones_like(z2)), 1).log_prob(z2)
    middle = gaussian_log_prob(z1, *net.decoder_z1(z2))
    logits = net.decoder_x(z1)
    likelihood = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(-1)
    torch.testing.assert_close(net.log_joint(x, z), prior + middle + likelihood)


@pytest.mark.parametrize("context_dim", [0, 4], ids=["unconditional", "context"])
def test_propose_equals_the_library_hierarchical_proposal(context_dim):
    """Two implementations of the generalized DReG densities: the model's own (by hand) and
    dreg.library's HierarchicalProposal over the same networks; same noise, same gradients."""
    net = make_net(context_dim)
    x, context = batch(context_dim)
    eps = torch.randn(K, B, net.noise_dim, dtype=torch.float64)
    c = None if context is None else context - net.context_mean

    def with_c(inputs):
        return inputs if c is None else torch.cat([inputs, c.expand(*inputs.shape[:-1], -1)], -1)

    def gaussian(mean_scale):
        return Independent(Normal(*mean_scale), 1)

    proposal = HierarchicalProposal(
        [
            lambda: gaussian(net.encoder_z1(with_c(x - net.train_mean))),
            lambda z1: gaussian(net.encoder_z2(with_c(z1))),
        ],
        module=net,
    )

    def gradients(particles):
        net.zero_grad(set_to_none=True)
        routed_loss(particles, ESTIMATORS["dreg_iwae"]().double()(particles.log_w)).backward()
        return [p.grad.clone() for p in net.parameters()]

    def log_joint(z):
        return net.log_joint(x, z, context)

    library = make_hierarchical_particles(proposal, log_joint, K, noise=eps)
    z, log_q_stopped, log_q_stop_z = net.propose(x, context, eps)
    for got, want in [
        (library.z_for_p, z),
        (library.log_q_stopped, log_q_stopped),
        (library.log_q_stop_z, log_q_stop_z),
    ]:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.manual_seed(3)
    got_grads = gradients(net.particles(x, K, context))
    torch.manual_seed(3)  # the same noise
    eps = torch.randn(K, B, net.noise_dim, dtype=torch.float64)
    want_grads = gradients(make_hierarchical_particles(proposal, log_joint, K, noise=eps))
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("context_dim", [0, 4], ids=["unconditional", "context"])
@pytest.mark.parametrize("name", NAMES)
def test_routed_single_backward_equals_per_group_surrogates(name, context_dim):
    """Every estimator on the two-layer model: the one routed backward gives each parameter
    group the gradient of its own surrogate (two autograd passes), float64."""
    net = make_net(context_dim)
    x, context = batch(context_dim)
    estimator = ESTIMATORS[name]().double()
    model_params, inference_params = net.model_parameters(), net.inference_parameters()
    torch.manual_seed(4)
    particles = net.particles(x, K, context)
    model_loss, inference_loss = surrogate_losses(particles, estimator(particles.log_w))
    want_model = torch.autograd.grad(model_loss, model_params, retain_graph=True)
    want_inference = torch.autograd.grad(inference_loss, inference_params)

    torch.manual_seed(4)  # the same noise, a fresh graph
    particles = net.particles(x, K, context)
    net.zero_grad(set_to_none=True)
    routed_loss(particles, estimator(particles.log_w)).backward()
    for params, wants in [(model_params, want_model), (inference_params, want_inference)]:
        for p, want in zip(params, wants, strict=True):
            torch.testing.assert_close(p.grad, want, rtol=1e-10, atol=1e-12)


def test_dreg_rws_inference_gradient_is_zero_at_k1():
    net = make_net()
    x, _ = batch()
    particles = net.particles(x, 1)
    routed_loss(particles, ESTIMATORS["dreg_rws"]().double()(particles.log_w)).backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p.grad)) for p in net.inference_parameters())
    assert any(p.grad.abs().max() > 0 for p in net.model_parameters())


def test_antithetic_mirrors_the_noise():
    net = make_net()
    x, _ = batch()
    torch.manual_seed(5)
    z = net.particles(x, 6, antithetic=True).z_for_p.detach()
    mean1, _ = net.encoder_z1(x - net.train_mean)
    z1 = z[..., :3]  # z1 mirrored around its mean; z2 is not (its mean depends on z1)
    torch.testing.assert_close(z1[:3] + z1[3:], 2 * mean1.detach().expand(3, -1, -1))
    assert not torch.allclose(z[:3, :, 3:] + z[3:, :, 3:], torch.zeros_like(z[:3, :, 3:]))
    with pytest.raises(ValueError, match="even K"):
        net.particles(x, 5, antithetic=True)


def test_log_weights_are_the_particles_log_weights_and_log_likelihood_bounds():
    net = make_net()
    x, _ = batch()
    torch.manual_seed(6)
    log_w = net.log_weights(x, K, chunk_size=K)
    torch.manual_seed(6)  # the same noise through particles()
    torch.testing.assert_close(log_w, net.particles(x, K).log_w, rtol=0, atol=1e-12)
    chunked = net.log_weights(x, 300, chunk_size=7)  # 42 full chunks and one of 6
    assert chunked.shape == (300, B) and torch.isfinite(chunked).all()
    ll = net.log_likelihood(x, 2000, chunk_size=500)
    bounds = torch.stack([net.log_likelihood(x, 4) for _ in range(50)]).mean(0)
    assert ll.shape == (B,) and (ll - bounds).mean() > 0


def test_one_line_errors():
    net = make_net(context_dim=4)
    x, context = batch(4)
    with pytest.raises(ValueError, match=r"\[K, B, noise_dim\] = \[K, 5, 5\]"):
        net.propose(x, context, torch.zeros(K, B, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="needs a context of size 4"):
        net.particles(x, K)
    with pytest.raises(ValueError, match="two stochastic layers"):
        TwoLayerVAE(DATA_DIM, latent_dims=(3, 2, 1))


def test_float32_particles_are_finite():
    net = make_net(dtype=torch.float32)
    x, _ = batch()
    particles = net.particles(x.float(), K)
    assert particles.log_p.dtype == torch.float32 and torch.isfinite(particles.log_w).all()


# -- the config ----------------------------------------------------------------------------------
def test_two_layer_config_has_the_vae_keys_and_builds_the_model(tmp_path):
    vae = yaml.safe_load((CONF_DIR / "model" / "vae.yaml").read_text())
    two_layer = yaml.safe_load((CONF_DIR / "model" / "two_layer.yaml").read_text())
    assert list(two_layer) == list(vae)
    assert {k: v for k, v in two_layer.items() if k != "net"} == {
        k: v for k, v in vae.items() if k != "net"
    }
    assert two_layer["net"] == {
        "_target_": "dreg.hierarchical.TwoLayerVAE",
        "latent_dims": [100, 50],
        "hidden_dims": [[200, 200], [100, 100]],
        "activation": "tanh",
    }
    cfg = compose_config(["model=two_layer"], tmp_path)
    net = instantiate(cfg.model.net, data_dim=784, train_mean=torch.full((784,), 0.3))
    assert isinstance(net, TwoLayerVAE) and net.latent_dims == (100, 50)
    assert cfg.model._target_ == "dreg.lightning_module.DReGModule"


def test_every_estimator_runs_at_its_minimum_k():
    net = make_net()
    x, _ = batch()
    for name in NAMES:
        particles = net.particles(x, MIN_SAMPLES.get(name, 1))
        loss = routed_loss(particles, ESTIMATORS[name]().double()(particles.log_w))
        assert torch.isfinite(loss)
