"""The opt-in compiled path (``model.compile=true``) gives the eager path's numbers."""

from __future__ import annotations

import shutil

import pytest
import torch

from dreg.estimators import routed_loss
from dreg.estimators.iwae import DReGIWAE
from dreg.lightning_module import DReGModule
from dreg.model import VAE


def module(compile_: bool) -> DReGModule:
    torch.manual_seed(0)
    net = VAE(784, train_mean=torch.rand(784) * 0.3)
    return DReGModule(net, DReGIWAE(), torch.optim.Adam, num_samples=16, compile=compile_)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("cc") is None,
    reason="torch.compile on CPU needs a C compiler",
)
def test_compiled_step_matches_eager():
    eager, compiled = module(False), module(True)
    assert list(eager.state_dict()) == list(compiled.state_dict())  # checkpoints interchange
    x = torch.bernoulli(torch.rand(8, 784) * 0.3)
    grads = []
    for m in (eager, compiled):
        torch.manual_seed(1)
        particles = m.net.particles(x, 16)
        weights = m.estimator(particles.log_w)
        routed_loss(particles, weights).backward()
        grads.append([p.grad for p in m.net.parameters()])
        assert torch.isfinite(weights.objective).all()
    for got, want in zip(grads[1], grads[0], strict=True):
        # Inductor fuses and reorders float32 reductions: equal up to rounding, not bitwise.
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
