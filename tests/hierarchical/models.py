"""A two-layer linear-Gaussian model with its exact posterior, and reference particles written
independently of ``dreg.library`` (float64).

    p(z2) = N(0, I),  p(z1 | z2) = N(A z2 + a, diag(s1^2)),  p(x | z1) = N(C z1 + c, diag(sx^2))
    q(z1 | x) = N(W1 x + b1, L1 L1^T),  q(z2 | z1) = N(M z1 + m, L2 L2^T)

The exact posterior factorizes the same way: p(z1, z2 | x) = p(z1 | x) p(z2 | z1) (x is
independent of z2 given z1), both Gaussian with an affine mean, so :meth:`exact_layers` sets q
to it exactly. With diagonal A and C the posterior covariances are diagonal too, which lets the
same test run with ``Independent(Normal)`` layers (``covariance="diag"``) and with
``MultivariateNormal`` layers (``covariance="tril"``).

Layer parameters may carry a leading copy dim ``[N, ...]``: one set of parameters per data
point, so that one backward gives N independent per-copy gradient estimates.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn
from torch.distributions import Independent, MultivariateNormal, Normal

from dreg.estimators import Particles
from dreg.library import particles_from_draws

DTYPE = torch.float64
LOG_2PI = math.log(2 * math.pi)


def diag_log_density(value: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    """log N(value; loc, diag(scale^2)) summed over the last dim."""
    return (-0.5 * ((value - loc) / scale) ** 2 - scale.log() - 0.5 * LOG_2PI).sum(-1)


class AffineGaussian(nn.Module):
    """q(out | inp) = N(W inp + b, L L^T), ``diag``: Independent(Normal), L = diag(exp(r));
    ``tril``: MultivariateNormal, L lower-triangular with an exp diagonal."""

    def __init__(self, weight: Tensor, bias: Tensor, scale_tril: Tensor, covariance: str):
        super().__init__()
        self.covariance = covariance
        self.weight, self.bias = nn.Parameter(weight.clone()), nn.Parameter(bias.clone())
        log_diag = scale_tril.diagonal(dim1=-2, dim2=-1).log()
        if covariance == "diag":
            self.log_scale = nn.Parameter(log_diag.clone())
        else:
            self.raw_tril = nn.Parameter(scale_tril.tril(-1) + torch.diag_embed(log_diag))

    def loc(self, inputs: Tensor) -> Tensor:
        return (self.weight @ inputs.unsqueeze(-1)).squeeze(-1) + self.bias

    def tril(self) -> Tensor:
        if self.covariance == "diag":
            return torch.diag_embed(self.log_scale.exp())
        raw = self.raw_tril
        return raw.tril(-1) + torch.diag_embed(raw.diagonal(dim1=-2, dim2=-1).exp())

    def forward(self, inputs: Tensor):
        loc = self.loc(inputs)
        if self.covariance == "diag":
            return Independent(Normal(loc, self.log_scale.exp().expand_as(loc)), 1)
        return MultivariateNormal(loc, scale_tril=self.tril())

    # -- by hand, for the references --------------------------------------------------------
    def sample(self, inputs: Tensor, eps: Tensor) -> Tensor:
        return self.loc(inputs) + (self.tril() @ eps.unsqueeze(-1)).squeeze(-1)

    def log_density(self, inputs: Tensor, value: Tensor) -> Tensor:
        """log q(value | inputs) through the triangular solve (no torch.distributions)."""
        diff = (value - self.loc(inputs)).unsqueeze(-1)
        tril = self.tril().expand(*diff.shape[:-2], -1, -1)
        white = torch.linalg.solve_triangular(tril, diff, upper=False).squeeze(-1)
        log_det = tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return -0.5 * white.square().sum(-1) - log_det - 0.5 * value.shape[-1] * LOG_2PI


class LinearGaussianTwoLayer(nn.Module):
    """The generative model (theta) and its exact posterior layers."""

    def __init__(self, dims=(3, 2, 2), diagonal: bool = False, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.data_dim, self.dim1, self.dim2 = dims

        def param(*shape: int, scale: float = 0.7) -> nn.Parameter:
            return nn.Parameter(scale * torch.randn(shape, generator=gen, dtype=DTYPE))

        self.A, self.a = param(self.dim1, self.dim2), param(self.dim1)
        self.log_s1 = param(self.dim1, scale=0.3)
        self.C, self.c = param(self.data_dim, self.dim1), param(self.data_dim)
        self.log_sx = param(self.data_dim, scale=0.3)
        if diagonal:  # diagonal A and C: a diagonal posterior (needs equal dims)
            with torch.no_grad():
                self.A.copy_(torch.diag(torch.diagonal(self.A)) + torch.eye(self.dim1))
                self.C.copy_(torch.diag(torch.diagonal(self.C)) + torch.eye(self.dim1))

    def model_parameters(self) -> list[nn.Parameter]:
        return [self.A, self.a, self.log_s1, self.C, self.c, self.log_sx]

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x, z1, z2) for z = cat([z1, z2], -1) ``[K, B, D1 + D2]``: ``[K, B]``."""
        z1, z2 = z.split([self.dim1, self.dim2], dim=-1)
        prior = diag_log_density(z2, torch.zeros_like(z2), torch.ones_like(z2))
        middle = diag_log_density(z1, z2 @ self.A.T + self.a, self.log_s1.exp())
        return prior + middle + diag_log_density(x, z1 @ self.C.T + self.c, self.log_sx.exp())

    def log_marginal(self, x: Tensor) -> Tensor:
        """Exact log p(x) = log N(x; C a + c, C P1 C^T + diag(sx^2)), P1 = A A^T + diag(s1^2)."""
        prior1 = self.A @ self.A.T + torch.diag((2 * self.log_s1).exp())
        cov = self.C @ prior1 @ self.C.T + torch.diag((2 * self.log_sx).exp())
        return MultivariateNormal(self.C @ self.a + self.c, cov).log_prob(x)

    @torch.no_grad()
    def posterior(self) -> dict[str, Tensor]:
        """Exact q(z1 | x) = N(W1 x + b1, S1) and q(z2 | z1) = p(z2 | z1) = N(M z1 + m, S2)."""
        prior1 = self.A @ self.A.T + torch.diag((2 * self.log_s1).exp())
        prior1_inv, noise_x_inv = torch.linalg.inv(prior1), torch.diag((-2 * self.log_sx).exp())
        cov1 = torch.linalg.inv(prior1_inv + self.C.T @ noise_x_inv @ self.C)
        weight1 = cov1 @ self.C.T @ noise_x_inv
        bias1 = cov1 @ (prior1_inv @ self.a - self.C.T @ noise_x_inv @ self.c)
        noise_1_inv = torch.diag((-2 * self.log_s1).exp())
        cov2 = torch.linalg.inv(torch.eye(self.dim2, dtype=DTYPE) + self.A.T @ noise_1_inv @ self.A)
        weight2 = cov2 @ self.A.T @ noise_1_inv
        return {
            "weight1": weight1,
            "bias1": bias1,
            "tril1": torch.linalg.cholesky(cov1),
            "weight2": weight2,
            "bias2": -weight2 @ self.a,
            "tril2": torch.linalg.cholesky(cov2),
        }

    def exact_layers(
        self, covariance: str = "tril", copies: int = 0, perturb: float = 0.0, seed: int = 1
    ) -> tuple[AffineGaussian, AffineGaussian]:
        """The exact posterior layers (``perturb`` > 0 moves every parameter away from it);
        ``copies`` > 0 gives each parameter a leading dim of that many identical copies."""
        post = self.posterior()
        gen = torch.Generator().manual_seed(seed)

        def value(name: str) -> Tensor:
            tensor = post[name]
            if perturb:
                noise = perturb * torch.randn(tensor.shape, generator=gen, dtype=DTYPE)
                if name.startswith("tril"):  # the diagonal scaled by exp(noise): stays positive
                    diag = tensor.diagonal() * noise.diagonal().exp()
                    tensor = tensor.tril(-1) + noise.tril(-1) + torch.diag(diag)
                else:
                    tensor = tensor + noise
            return tensor.expand(copies, *tensor.shape).clone() if copies else tensor

        layer1 = AffineGaussian(value("weight1"), value("bias1"), value("tril1"), covariance)
        layer2 = AffineGaussian(value("weight2"), value("bias2"), value("tril2"), covariance)
        return layer1, layer2


# -- reference particles, written without dreg.library's hierarchical code ---------------------
def reference_particles(
    model: LinearGaussianTwoLayer,
    layer1: AffineGaussian,
    layer2: AffineGaussian,
    x: Tensor,
    eps: Tensor,
    stop: str = "parameters",
) -> Particles:
    """Particles of q(z1 | x) q(z2 | z1) with log q(z; stop phi) stopped in one of two ways.

    ``parameters`` (generalized DReG, Bauer & Mnih 2021): a frozen copy of each layer,
    evaluated at the live z1. ``tensors`` (the common, naive implementation): q(z2 | z1)'s
    mean and scale computed from z1 and then detached, which cuts z1 out of log q(z2 | z1).
    """
    eps1, eps2 = eps.split([model.dim1, model.dim2], dim=-1)
    z1 = layer1.sample(x, eps1)
    z2 = layer2.sample(z1, eps2)
    frozen1, frozen2 = (copy.deepcopy(layer).requires_grad_(False) for layer in (layer1, layer2))
    stopped1 = frozen1.log_density(x, z1)
    if stop == "parameters":
        stopped2 = frozen2.log_density(z1, z2)
    else:
        loc2, tril2 = layer2.loc(z1).detach(), layer2.tril().detach()
        diff = (z2 - loc2).unsqueeze(-1)
        tril2 = tril2.expand(*diff.shape[:-2], -1, -1)
        white = torch.linalg.solve_triangular(tril2, diff, upper=False).squeeze(-1)
        stopped2 = (
            -0.5 * white.square().sum(-1)
            - tril2.diagonal(dim1=-2, dim2=-1).log().sum(-1)
            - 0.5 * model.dim2 * LOG_2PI
        )
    z1_fixed, z2_fixed = z1.detach(), z2.detach()
    score = layer1.log_density(x, z1_fixed) + layer2.log_density(z1_fixed, z2_fixed)
    return particles_from_draws(
        torch.cat([z1, z2], dim=-1), stopped1 + stopped2, score, lambda z: model.log_joint(x, z)
    )


def full_log_q(layer1: AffineGaussian, layer2: AffineGaussian, x: Tensor, z: Tensor) -> Tensor:
    """log q(z1, z2 | x) with every path live (z and the parameters)."""
    z1, z2 = z.split([layer1.bias.shape[-1], layer2.bias.shape[-1]], dim=-1)
    return layer1.log_density(x, z1) + layer2.log_density(z1, z2)
