"""The benchmark's independent ceiling computes what dreg computes (else it is no ceiling).

``benchmarks.plain_loop`` is written without dreg; here its gradients are compared with
dreg's VAE + routed loss on the same weights and the same noise, in float64.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.plain_loop import PlainVAE
from benchmarks.reference import ReferenceLoop
from dreg.estimators import estimator_by_name, routed_loss
from dreg.model import VAE


@pytest.mark.parametrize("estimator", ["iwae", "dreg_iwae", "dreg_jvi"])
def test_plain_loop_gradients_equal_dregs(estimator):
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((5, 784), 0.2, dtype=torch.float64))
    net = VAE(784, train_mean=torch.full((784,), 0.2)).double()
    plain = PlainVAE(net.train_mean.clone()).double()
    plain.encoder.load_state_dict(net.encoder.net.state_dict())
    plain.decoder.load_state_dict(net.decoder.state_dict())

    torch.manual_seed(1)
    particles = net.particles(x, 16)
    weights = estimator_by_name(estimator)(particles.log_w)
    routed_loss(particles, weights).backward()
    torch.manual_seed(1)
    loss, bound = plain.step_loss(x, 16, estimator)
    loss.backward()

    assert torch.allclose(bound, weights.objective.mean(), rtol=1e-10)
    pairs = [(net.encoder.net, plain.encoder), (net.decoder, plain.decoder)]
    for want_module, got_module in pairs:
        for (name, want), got in zip(
            want_module.named_parameters(), got_module.parameters(), strict=True
        ):
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-8, atol=1e-10, msg=name)


def test_the_reference_loop_trains_at_the_requested_k():
    """``benchmarks.reference`` (the real-path comparison of ``make bench``) runs a step."""
    torch.manual_seed(0)
    net = VAE(784, train_mean=torch.full((784,), 0.2))
    loop = ReferenceLoop(net, estimator_by_name("dreg_iwae"), torch.rand(64, 784), num_samples=8)
    before = [p.detach().clone() for p in net.parameters()]
    loss = loop.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
