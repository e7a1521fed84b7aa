"""DReG for a model that is not dreg's VAE: a linear-Gaussian latent-variable model.

    p(z) = N(mu0, diag(s0^2))            learned prior        } theta: model gradient
    p(x | z) = N(W z + b, sigma^2 I)     learned decoder      }
    q(z | x) = N(A x + c, diag(s(x)^2))  affine encoder         phi: inference gradient

One optimizer, one backward per step: the IWAE model gradient reaches theta and the DReG
inference gradient reaches phi. The model's exact log p(x) is known in closed form, so the
logged bound can be checked against it. Run: ``python examples/library_example.py``.
"""

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal

from dreg import monte_carlo_objective


class LinearGaussianModel(nn.Module):
    """p(z) p(x | z), every parameter learned."""

    def __init__(self, data_dim: int, latent_dim: int):
        super().__init__()
        self.prior_loc = nn.Parameter(torch.zeros(latent_dim))
        self.prior_log_scale = nn.Parameter(torch.zeros(latent_dim))
        self.decoder = nn.Linear(latent_dim, data_dim)
        self.log_noise = nn.Parameter(torch.zeros(()))

    def log_joint(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x, z) for z [K, B, Dz] and x [B, Dx]: returns [K, B]."""
        prior = Independent(Normal(self.prior_loc, self.prior_log_scale.exp()), 1)
        likelihood = Independent(Normal(self.decoder(z), self.log_noise.exp()), 1)
        return prior.log_prob(z) + likelihood.log_prob(x)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) = log N(x; W mu0 + b, W diag(s0^2) W^T + sigma^2 I): [B]."""
        weight = self.decoder.weight
        cov = weight @ torch.diag((2 * self.prior_log_scale).exp()) @ weight.T
        cov = cov + (2 * self.log_noise).exp() * torch.eye(weight.shape[0])
        return MultivariateNormal(self.decoder(self.prior_loc), cov).log_prob(x)


class Encoder(nn.Module):
    """x -> q(z | x), a diagonal Gaussian with batch shape [B] and event shape [Dz]."""

    def __init__(self, data_dim: int, latent_dim: int):
        super().__init__()
        self.net = nn.Linear(data_dim, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> Independent:
        loc, raw_scale = self.net(x).chunk(2, dim=-1)
        return Independent(Normal(loc, F.softplus(raw_scale) + 1e-4), 1)


def make_data(num_points: int = 1000, data_dim: int = 5, latent_dim: int = 2, seed: int = 0):
    """Samples of x from a random ground-truth linear-Gaussian model."""
    gen = torch.Generator().manual_seed(seed)
    z = 1.0 + 1.5 * torch.randn(num_points, latent_dim, generator=gen)
    weight = torch.randn(data_dim, latent_dim, generator=gen)
    return z @ weight.T + 0.3 * torch.randn(num_points, data_dim, generator=gen)


def train(steps: int = 500, num_samples: int = 16, estimator: str = "dreg_iwae", seed: int = 0):
    """Adam on minibatches of 100; prints the bound next to the exact log-likelihood."""
    torch.manual_seed(seed)
    data = make_data(seed=seed)
    model, encoder = LinearGaussianModel(5, 2), Encoder(5, 2)
    optimizer = torch.optim.Adam([*model.parameters(), *encoder.parameters()], lr=3e-2)
    for step in range(steps):
        x = data[torch.randint(len(data), (100,))]
        log_joint = partial(model.log_joint, x)  # z [K, B, Dz] -> log p(x, z) [K, B]
        result = monte_carlo_objective(encoder(x), log_joint, num_samples, estimator)
        optimizer.zero_grad()
        result.loss.backward()  # once: theta gets the IWAE gradient, phi the DReG gradient
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            bound = result.objective.mean().item()  # the IWAE bound, not the surrogate loss
            exact = model.log_marginal(x).mean().item()
            print(f"step {step:4d}  IWAE bound {bound:8.3f}  exact log p(x) {exact:8.3f}")
    return model, encoder, data


if __name__ == "__main__":
    train()
