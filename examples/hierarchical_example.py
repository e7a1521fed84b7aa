"""Generalized DReG (Bauer & Mnih 2021) for a hierarchical proposal q(z1 | x) q(z2 | z1).

    p(z2) = N(0, I)                          } theta: model gradient (IWAE)
    p(z1 | z2) = N(A z2 + a, diag(s1^2))     }
    p(x | z1) = N(C z1 + c, diag(sx^2))      }
    q(z1 | x) = N(affine(x), diag(.))        } phi: inference gradient (generalized DReG)
    q(z2 | z1) = N(affine(z1), diag(.))      }

Each layer of the proposal is a factory: the first takes no argument (x is bound with
``partial``), the next maps z1 to q(z2 | z1) and is an nn.Module, so that the library can
evaluate it again with its parameters detached and z1 live. One optimizer, one backward per
step. The model's exact log p(x) is known in closed form.
Run: ``python examples/hierarchical_example.py``.
"""

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal

from dreg.library import HierarchicalProposal, monte_carlo_objective


def diagonal_normal(loc: torch.Tensor, scale: torch.Tensor) -> Independent:
    return Independent(Normal(loc, scale), 1)


class TwoLayerLinearGaussian(nn.Module):
    """p(z2) p(z1 | z2) p(x | z1), every parameter learned."""

    def __init__(self, data_dim: int, dim1: int, dim2: int):
        super().__init__()
        self.dims = [dim1, dim2]
        self.middle = nn.Linear(dim2, dim1)  # A z2 + a
        self.log_s1 = nn.Parameter(torch.zeros(dim1))
        self.decoder = nn.Linear(dim1, data_dim)  # C z1 + c
        self.log_sx = nn.Parameter(torch.zeros(data_dim))

    def log_joint(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x, z1, z2) for z = cat([z1, z2], -1) [K, B, D1 + D2]: returns [K, B]."""
        z1, z2 = z.split(self.dims, dim=-1)
        prior = diagonal_normal(torch.zeros_like(z2), torch.ones_like(z2)).log_prob(z2)
        middle = diagonal_normal(self.middle(z2), self.log_s1.exp()).log_prob(z1)
        return prior + middle + diagonal_normal(self.decoder(z1), self.log_sx.exp()).log_prob(x)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) = log N(x; C a + c, C (A A^T + S1) C^T + Sx): [B]."""
        weight_a, weight_c = self.middle.weight, self.decoder.weight
        cov1 = weight_a @ weight_a.T + torch.diag((2 * self.log_s1).exp())
        cov = weight_c @ cov1 @ weight_c.T + torch.diag((2 * self.log_sx).exp())
        return MultivariateNormal(self.decoder(self.middle.bias), cov).log_prob(x)


class GaussianLayer(nn.Module):
    """inputs -> q(z | inputs), a diagonal Gaussian with an affine mean and log-scale."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Linear(in_dim, 2 * out_dim)

    def forward(self, inputs: torch.Tensor) -> Independent:
        loc, raw_scale = self.net(inputs).chunk(2, dim=-1)
        return diagonal_normal(loc, F.softplus(raw_scale) + 1e-4)


def make_data(num_points: int = 1000, seed: int = 0) -> torch.Tensor:
    """Samples of x [N, 5] from a random ground-truth two-layer linear-Gaussian model."""
    gen = torch.Generator().manual_seed(seed)
    z2 = torch.randn(num_points, 2, generator=gen)
    z1 = z2 @ torch.randn(2, 3, generator=gen) + 0.5 * torch.randn(num_points, 3, generator=gen)
    return z1 @ torch.randn(3, 5, generator=gen) + 0.3 * torch.randn(num_points, 5, generator=gen)


def train(steps: int = 500, num_samples: int = 16, estimator: str = "dreg_iwae", seed: int = 0):
    """Adam on minibatches of 100; prints the bound next to the exact log-likelihood."""
    torch.manual_seed(seed)
    data = make_data(seed=seed)
    model = TwoLayerLinearGaussian(5, 3, 2)
    q_z1, q_z2 = GaussianLayer(5, 3), GaussianLayer(3, 2)  # q(z1 | x), q(z2 | z1)
    params = [*model.parameters(), *q_z1.parameters(), *q_z2.parameters()]
    optimizer = torch.optim.Adam(params, lr=3e-2)
    for step in range(steps):
        x = data[torch.randint(len(data), (100,))]
        # Layer 1 binds x; layer 2 is a module: the library re-evaluates it with its
        # parameters detached and z1 live (log q(z2 | z1; stop phi)).
        proposal = HierarchicalProposal([partial(q_z1, x), q_z2])
        log_joint = partial(model.log_joint, x)  # z [K, B, 3 + 2] -> log p(x, z) [K, B]
        result = monte_carlo_objective(proposal, log_joint, num_samples, estimator)
        optimizer.zero_grad()
        result.loss.backward()  # once: theta gets the IWAE gradient, phi generalized DReG's
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            bound = result.objective.mean().item()  # the IWAE bound, not the surrogate loss
            exact = model.log_marginal(x).mean().item()
            print(f"step {step:4d}  IWAE bound {bound:8.3f}  exact log p(x) {exact:8.3f}")
    return model, (q_z1, q_z2), data


if __name__ == "__main__":
    train()
