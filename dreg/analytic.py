"""A latent-variable model where every quantity is known in closed form: the ground truth that
the estimator tests and the estimator-variance benchmark measure against.

    p(z) = N(0, I),  p(x | z) = N(z + theta, I),  q(z | x_b) = N(mu_b, diag(sigma_b^2))

with a learnable decoder shift ``theta`` [D] (the model parameters) and free per-data-point
``mu``, ``log_sigma`` [B, D] (the inference parameters). Exactly:

    log p(x) = log N(x; theta, 2 I),   p(z | x) = N((x - theta) / 2, I / 2).

:meth:`GaussianModel.draw` builds :class:`~dreg.estimators.Particles` the same way
``dreg.model.VAE.particles`` does (``z_for_p`` alias, ``log_q_stopped`` with detached
parameters, ``log_q_stop_z`` with detached z), so tests exercise the real routing code. It
draws N independent replicas at once: each replica has its own copy of the parameters as
leaf tensors, so one autograd call returns N independent gradient estimates.

Per-particle gradients, written by hand (z_k = mu + sigma eps_k, all elementwise)::

    d/dtheta log p(x, z_k)        = x - z_k - theta
    d/dz (log p - log q)(z_k)     = x - theta - 2 z_k + eps_k / sigma        (q stopped)
    path:  d/dmu = that,  d/dlog_sigma = that * sigma eps_k
    score: d/dmu log q(stop z_k) = eps_k / sigma,  d/dlog_sigma log q(stop z_k) = eps_k^2 - 1
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from dreg.estimators import GradientWeights, Particles, routed_loss, surrogate_losses

LOG_2PI = math.log(2 * math.pi)
DTYPE = torch.float64


def normal_log_prob(z: Tensor, mean: Tensor, std: Tensor | float) -> Tensor:
    """log N(z; mean, std^2) summed over the last dim."""
    std = torch.as_tensor(std, dtype=z.dtype)
    return (-0.5 * ((z - mean) / std) ** 2 - std.log() - 0.5 * LOG_2PI).sum(-1)


@dataclass
class Draw:
    """N independent K-sample draws; gradients are per replica ``[N, P]`` ascent directions of
    the sum over the batch of each estimator's objective surrogate."""

    particles: Particles
    model_params: list[Tensor]  # [theta [N, 1, D]]
    inference_params: list[Tensor]  # [mu [N, B, D], log_sigma [N, B, D]]
    eps: Tensor  # [K, N, B, D]
    z: Tensor  # [K, N, B, D] (detached)

    @property
    def num_draws(self) -> int:
        return self.eps.shape[1]

    @property
    def scale(self) -> float:
        """surrogate losses average over N * B data points; undo it and the sign."""
        return -float(self.eps.shape[1] * self.eps.shape[2])

    def _flat(self, grads: tuple[Tensor, ...]) -> Tensor:
        return torch.cat([g.reshape(self.num_draws, -1) for g in grads], dim=1) * self.scale

    def gradients(self, weights: GradientWeights) -> tuple[Tensor, Tensor]:
        """``(model [N, D], inference [N, 2 B D])`` from :func:`surrogate_losses` (reference)."""
        model_loss, inference_loss = surrogate_losses(self.particles, weights)
        model = torch.autograd.grad(model_loss, self.model_params, retain_graph=True)
        inference = torch.autograd.grad(inference_loss, self.inference_params, retain_graph=True)
        return self._flat(model), self._flat(inference)

    def routed_gradients(self, weights: GradientWeights) -> tuple[Tensor, Tensor]:
        """The same two gradients from one backward of :func:`routed_loss` (call once)."""
        params = self.model_params + self.inference_params
        for p in params:
            p.grad = None
        routed_loss(self.particles, weights).backward()
        return self._flat(tuple(p.grad for p in self.model_params)), self._flat(
            tuple(p.grad for p in self.inference_params)
        )


class GaussianModel:
    """The analytic model for a fixed batch ``x`` [B, D] (float64).

    :param x: observations ``[B, D]``.
    :param mu: mean of q ``[B, D]``.
    :param log_sigma: log standard deviation of q ``[B, D]``.
    :param theta: decoder shift ``[D]``.
    """

    def __init__(self, x: Tensor, mu: Tensor, log_sigma: Tensor, theta: Tensor) -> None:
        self.x, self.mu, self.log_sigma, self.theta = (
            torch.as_tensor(t, dtype=DTYPE) for t in (x, mu, log_sigma, theta)
        )

    @classmethod
    def default(cls, mu_offset: float = 0.6, sigma: float = 1.0) -> GaussianModel:
        """Three data points in D = 2, q off the posterior by ``mu_offset`` and ``sigma``."""
        x = torch.tensor([[1.0, -0.5], [0.3, 2.0], [-1.2, 0.4]], dtype=DTYPE)
        theta = torch.tensor([0.2, -0.1], dtype=DTYPE)
        offsets = mu_offset * torch.tensor([[1.0, -0.5], [-0.7, 0.3], [0.4, 1.0]], dtype=DTYPE)
        mu = (x - theta) / 2 + offsets
        return cls(x, mu, torch.full_like(x, math.log(sigma)), theta)

    # -- closed forms -------------------------------------------------------------------------
    def posterior(self) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation of p(z | x), each ``[B, D]``."""
        mean = (self.x - self.theta) / 2
        return mean, torch.full_like(mean, math.sqrt(0.5))

    def at_posterior(self) -> GaussianModel:
        """The same model with q set to the exact posterior."""
        mean, std = self.posterior()
        return GaussianModel(self.x, mean, std.log(), self.theta)

    def log_marginal(self) -> Tensor:
        """Exact log p(x_b) ``[B]``."""
        return normal_log_prob(self.x, self.theta, math.sqrt(2.0))

    def log_joint(self, z: Tensor, theta: Tensor) -> Tensor:
        """log p(x, z) for z ``[..., B, D]``: returns ``[..., B]``."""
        return normal_log_prob(z, 0.0, 1.0) + normal_log_prob(self.x, z + theta, 1.0)

    # -- Monte Carlo --------------------------------------------------------------------------
    def noise(
        self, num_samples: int, num_draws: int, generator: torch.Generator, antithetic: bool
    ) -> Tensor:
        """``[K, N, B, D]`` standard normal noise; antithetic: (eps, -eps) halves as in VAE."""
        batch, dim = self.x.shape
        if antithetic:
            half = torch.randn(
                (num_samples // 2, num_draws, batch, dim), generator=generator, dtype=DTYPE
            )
            return torch.cat([half, -half], dim=0)
        shape = (num_samples, num_draws, batch, dim)
        return torch.randn(shape, generator=generator, dtype=DTYPE)

    def draw(
        self,
        num_samples: int,
        num_draws: int = 1,
        seed: int = 0,
        antithetic: bool = False,
        log_p_offset: Tensor | None = None,
    ) -> Draw:
        """N independent draws of K samples for the whole batch.

        :param log_p_offset: ``[K, 1]`` constants added to log p(x, z_k) (e.g. -1e4, -inf) to
            produce extreme log-weights while every gradient path stays intact.
        """
        generator = torch.Generator().manual_seed(seed)
        eps = self.noise(num_samples, num_draws, generator, antithetic)  # [K, N, B, D]
        batch, dim = self.x.shape

        def leaf(t: Tensor, shape: tuple[int, ...]) -> Tensor:
            return t.detach().expand(shape).clone().requires_grad_(True)

        theta = leaf(self.theta, (num_draws, 1, dim))  # [N, 1, D]
        mu = leaf(self.mu, (num_draws, batch, dim))  # [N, B, D]
        log_sigma = leaf(self.log_sigma, (num_draws, batch, dim))  # [N, B, D]
        sigma = log_sigma.exp()
        z = mu + sigma * eps  # [K, N, B, D]
        flat_z = z.reshape(num_samples, num_draws * batch, dim)  # [K, N*B, D]
        z_for_p = flat_z.view_as(flat_z)  # the alias that feeds log p, as in VAE.particles
        log_p = self.log_joint(z_for_p.view_as(z), theta)  # [K, N, B]
        log_q_stopped = normal_log_prob(z, mu.detach(), sigma.detach())
        log_q_stop_z = normal_log_prob(z.detach(), mu, sigma)
        if log_p_offset is not None:
            log_p = log_p + log_p_offset.to(DTYPE).view(-1, 1, 1)

        def flat(t: Tensor) -> Tensor:  # [K, N, B, ...] -> [K, N * B, ...]
            return t.reshape(num_samples, num_draws * batch, *t.shape[3:])

        particles = Particles(
            log_p=flat(log_p),
            log_q_stopped=flat(log_q_stopped),
            log_q_stop_z=flat(log_q_stop_z),
            z_for_p=z_for_p,
        )
        return Draw(particles, [theta], [mu, log_sigma], eps, z.detach())

    def hand_gradients(self, draw: Draw, m: Tensor, a: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """Per-particle formulas of the module docstring, weighted by coefficients ``[K, N*B]``:
        ``(model [N, D], inference [N, 2 B D])``, the layout of :meth:`Draw.gradients`."""
        num_samples, num_draws, batch, dim = draw.eps.shape
        m, a, s = (c.reshape(num_samples, num_draws, batch, 1) for c in (m, a, s))
        eps, z = draw.eps, draw.z
        sigma = self.log_sigma.exp()
        d_theta = self.x - z - self.theta  # [K, N, B, D]
        d_z = self.x - self.theta - 2 * z + eps / sigma  # [K, N, B, D]
        model = (m * d_theta).sum((0, 2))  # [N, D]
        mu = (a * d_z - s * eps / sigma).sum(0)  # [N, B, D]
        log_sigma = (a * d_z * sigma * eps - s * (eps**2 - 1)).sum(0)  # [N, B, D]
        inference = torch.cat([mu.reshape(num_draws, -1), log_sigma.reshape(num_draws, -1)], 1)
        return model, inference

    def log_weights(self, draw: Draw) -> Tensor:
        """``[K, N*B]`` log-weights recomputed by hand (independent of the Particles code)."""
        sigma = self.log_sigma.exp()
        log_w = self.log_joint(draw.z, self.theta) - normal_log_prob(draw.z, self.mu, sigma)
        return log_w.reshape(draw.eps.shape[0], -1)


def snr(samples: Tensor) -> float:
    """The paper's aggregate SNR sqrt(sum_i mean_i^2 / sum_i var_i) of gradient samples
    ``[N, D]``, with the squared mean debiased by var/N so that a zero-mean gradient does not
    read as SNR ~ 1/sqrt(N)."""
    n = samples.shape[0]
    var = samples.var(0)
    mean_sq = (samples.mean(0).square() - var / n).clamp_min(0)
    return float((mean_sq.sum() / var.sum()).sqrt())
