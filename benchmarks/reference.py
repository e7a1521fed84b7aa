"""The plain-PyTorch reference: the same model and estimator, no framework.

What a researcher would write by hand in a notebook: data as one tensor on the device, a
random batch by indexing, on-device binarization, one forward, one backward, Adam. The
benchmark compares the real Lightning training path against this loop.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from dreg.estimators import Estimator, routed_loss
from dreg.model import VAE


class ReferenceLoop:
    """A minimal training loop over ``train`` ``[N, D]`` grey levels in [0, 1]."""

    def __init__(
        self,
        net: VAE,
        estimator: Estimator,
        train: Tensor,
        num_samples: int,
        batch_size: int = 32,
        lr: float = 3e-4,
    ) -> None:
        self.net, self.estimator, self.train = net, estimator, train
        self.num_samples, self.batch_size = num_samples, batch_size
        self.optimizer = torch.optim.Adam(net.parameters(), lr=lr)

    def step(self) -> Tensor:
        index = torch.randint(0, self.train.shape[0], (self.batch_size,), device=self.train.device)
        x = torch.bernoulli(self.train[index])  # [B, D], dynamic binarization
        particles = self.net.particles(x, self.num_samples)  # K
        loss = routed_loss(particles, self.estimator(particles.log_w))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    def seconds_per_step(self, steps: int, warmup: int = 3) -> float:
        for _ in range(warmup):
            self.step()
        synchronize(self.train.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        synchronize(self.train.device)
        return (time.perf_counter() - start) / steps


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
