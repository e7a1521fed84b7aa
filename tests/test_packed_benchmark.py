"""The packed benchmark: its independent loop trains each replica as if alone, with dreg's
DReG-IWAE gradients, and one measurement of each contender runs."""

from __future__ import annotations

import pytest
import torch

from benchmarks.packed import measure
from benchmarks.packed_loop import PackedLoop, grey_levels
from dreg.estimators import estimator_by_name, routed_loss
from dreg.model import VAE
from tests.conftest import requires_mnist


def float64_loop(m: int, data: torch.Tensor, seed: int = 0) -> PackedLoop:
    return PackedLoop(m, batch_size=5, k=8, data=data, dtype=torch.float64, seed=seed)


def test_each_replica_of_a_pack_gets_its_solo_gradient():
    data = grey_levels(64)
    pack = float64_loop(2, data)
    x, eps = pack.batch()
    loss, bounds = pack.loss(x, eps)
    loss.backward()
    for m in range(2):
        alone = float64_loop(1, data, seed=1)
        with torch.no_grad():
            for mine, packed in zip(alone.parameters(), pack.parameters(), strict=True):
                mine.copy_(packed[m : m + 1])
        loss, bound = alone.loss(x[m : m + 1], eps[m : m + 1])
        loss.backward()
        torch.testing.assert_close(bound, bounds[m : m + 1], rtol=0, atol=1e-10)
        for mine, packed in zip(alone.parameters(), pack.parameters(), strict=True):
            torch.testing.assert_close(mine.grad[0], packed.grad[m], rtol=0, atol=1e-10)


def test_the_packed_loop_gradients_equal_dregs():
    """The same weights, batch and noise through dreg's VAE and routed DReG-IWAE loss."""
    loop = float64_loop(1, grey_levels(64))
    x, eps = loop.batch()
    net = VAE(784, train_mean=loop.train_mean[0].float()).double()
    layers = [mod for mod in (*net.encoder.net, *net.decoder) if isinstance(mod, torch.nn.Linear)]
    with torch.no_grad():
        for layer, (weight, bias) in zip(layers, loop.encoder + loop.decoder, strict=True):
            layer.weight.copy_(weight[0].T)
            layer.bias.copy_(bias[0])
        net.train_mean.copy_(loop.train_mean[0])

    torch.manual_seed(3)
    noise = torch.randn(eps.shape[1:], dtype=torch.float64)
    torch.manual_seed(3)  # dreg draws the same noise (torch.randn, [K, B, latent])
    particles = net.particles(x[0], 8)
    weights = estimator_by_name("dreg_iwae")(particles.log_w)
    routed_loss(particles, weights).backward()
    loss, bound = loop.loss(x, noise.unsqueeze(0))
    loss.backward()

    torch.testing.assert_close(bound[0], weights.objective.mean(), rtol=1e-10, atol=0)
    for layer, (weight, bias) in zip(layers, loop.encoder + loop.decoder, strict=True):
        torch.testing.assert_close(weight.grad[0].T, layer.weight.grad, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(bias.grad[0], layer.bias.grad, rtol=1e-8, atol=1e-10)


def test_the_packed_loop_trains():
    loop = PackedLoop(3, k=4, hidden=(16,), latent=4, data=grey_levels(64))
    before = [t.detach().clone() for t in loop.parameters()]
    bounds = loop.step()
    assert bounds.shape == (3,) and torch.isfinite(bounds).all()
    assert all(not torch.equal(a, b) for a, b in zip(before, loop.parameters(), strict=True))


@requires_mnist
@pytest.mark.slow  # three real processes
@pytest.mark.parametrize("contender", ["solo", "pack", "loop"])
def test_one_measurement_of_each_contender(contender):
    """``python -m benchmarks.packed`` in miniature: a pack of 2 tiny jobs, 3 steps each."""
    setting = {"latent": 2, "hidden": [4], "k": 2, "m": 2, "steps": 3}
    row = measure(contender, setting, 3, "cpu", threads=1)
    assert row["model_steps"] == (3 if contender == "solo" else 6)
    assert row["rate"] > 0 and row["seconds"] > 0
