"""Two latent-variable models that are not dreg's VAE, and reference gradients written from the
estimators' definitions (independent of ``dreg.library`` and ``dreg.estimators``).

* :class:`LinearGaussian`: p(z) = N(mu0, diag(s0^2)) (a *learned* prior), p(x | z) =
  N(W vec(z) + b, sigma^2 I), q(z | x) = N(A x + c, diag(softplus(A' x + c')^2)). The latent
  may have any shape: ``()`` (a ``Normal`` proposal with event shape ()), ``(D,)`` or
  ``(H, W)`` (``Independent(Normal, 1 or 2)``).
* :class:`MLPModel`: p(z) = N(0, I), p(x | z) = N(MLP(z), sigma^2 I); q(z | x) a full-covariance
  ``MultivariateNormal`` (scale_tril from an MLP) or a ``LowRankMultivariateNormal``.

Each model exposes the reparameterization z = g(eps; phi) and log q(z; params) by hand, so the
reference never calls the code under test.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import (
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
)

from tests.estimators.cases import (
    GROUPS,
    loo_weight_powers,
    naive_bound,
    naive_group_weights,
    naive_inference_bound,
    naive_iwae_bound,
    naive_jackknife_bound,
)

DTYPE = torch.float64
LOG_2PI = math.log(2 * math.pi)


def diag_normal_log_density(z: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    """Elementwise log N(z; loc, scale^2) (no sum)."""
    return -0.5 * ((z - loc) / scale) ** 2 - torch.log(scale) - 0.5 * LOG_2PI


class ModelMixin:
    """What both models share: the proposal as a distribution or as its parameters."""

    def proposal_params(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.split(self.encode(x))

    def proposal(self, x: Tensor):
        return self.distribution(self.proposal_params(x))


class LinearGaussian(ModelMixin, nn.Module):
    """Linear-Gaussian latent model with a learned prior and an affine Gaussian encoder."""

    def __init__(self, data_dim: int = 3, latent_shape: tuple[int, ...] = (2,), seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.data_dim, self.latent_shape = data_dim, latent_shape
        latent_dim = math.prod(latent_shape)

        def param(*shape: int, scale: float = 0.5) -> nn.Parameter:
            return nn.Parameter(scale * torch.randn(shape, generator=gen, dtype=DTYPE))

        # theta: prior and decoder
        self.prior_loc, self.prior_log_scale = param(latent_dim), param(latent_dim, scale=0.2)
        self.weight, self.bias = param(data_dim, latent_dim), param(data_dim)
        self.log_noise = param(1, scale=0.2)
        # phi: encoder
        self.enc_loc_weight, self.enc_loc_bias = param(latent_dim, data_dim), param(latent_dim)
        self.enc_scale_weight, self.enc_scale_bias = param(latent_dim, data_dim), param(latent_dim)

    def model_parameters(self) -> list[nn.Parameter]:
        return [self.prior_loc, self.prior_log_scale, self.weight, self.bias, self.log_noise]

    def inference_parameters(self) -> list[nn.Parameter]:
        return [self.enc_loc_weight, self.enc_loc_bias, self.enc_scale_weight, self.enc_scale_bias]

    def encode(self, x: Tensor) -> Tensor:
        """``[B, 2 Dz]`` raw encoder outputs (per-data-point: the unbiasedness test's leaves)."""
        loc = x @ self.enc_loc_weight.T + self.enc_loc_bias
        return torch.cat([loc, x @ self.enc_scale_weight.T + self.enc_scale_bias], dim=-1)

    def split(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        """(loc, scale), each ``[B, *latent_shape]``."""
        shape = (raw.shape[0], *self.latent_shape)
        loc, pre_scale = raw.chunk(2, dim=-1)
        return loc.reshape(shape), (F.softplus(pre_scale) + 0.3).reshape(shape)

    def distribution(self, params: tuple[Tensor, Tensor]):
        if not self.latent_shape:
            return Normal(*params)
        return Independent(Normal(*params), len(self.latent_shape))

    def reparameterize(self, params: tuple[Tensor, Tensor], eps: Tensor) -> Tensor:
        loc, scale = params
        return loc + scale * eps

    def log_q(self, params: tuple[Tensor, Tensor], z: Tensor) -> Tensor:
        loc, scale = params
        k, b = z.shape[:2]
        return diag_normal_log_density(z, loc, scale).reshape(k, b, -1).sum(-1)

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """``[K, B, *latent_shape] -> [K, B]``."""
        flat_z = z.reshape(*z.shape[:2], -1)  # [K, B, Dz]
        prior = diag_normal_log_density(flat_z, self.prior_loc, self.prior_log_scale.exp())
        mean = flat_z @ self.weight.T + self.bias  # [K, B, Dx]
        lik = diag_normal_log_density(x, mean, self.log_noise.exp())
        return prior.sum(-1) + lik.sum(-1)


def lower_triangular(raw: Tensor) -> Tensor:
    """``[..., D, D]`` -> lower-triangular with a positive diagonal (softplus + 0.3)."""
    diag = F.softplus(raw.diagonal(dim1=-2, dim2=-1)) + 0.3
    return raw.tril(-1) + torch.diag_embed(diag)


class MLPModel(ModelMixin, nn.Module):
    """MLP decoder with a standard-normal prior; full-covariance or low-rank Gaussian encoder.

    :param proposal_kind: ``"mvn"`` (MultivariateNormal with scale_tril) or ``"lowrank"``.
    """

    def __init__(
        self,
        data_dim: int = 4,
        latent_dim: int = 3,
        hidden: int = 5,
        rank: int = 2,
        proposal_kind: str = "mvn",
        seed: int = 0,
    ):
        super().__init__()
        torch.manual_seed(seed)
        self.data_dim = data_dim
        self.latent_dim, self.rank, self.proposal_kind = latent_dim, rank, proposal_kind
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.Tanh(), nn.Linear(hidden, data_dim)
        ).to(DTYPE)
        self.log_noise = nn.Parameter(torch.tensor([-0.3], dtype=DTYPE))
        scale_outputs = latent_dim * latent_dim if proposal_kind == "mvn" else latent_dim * rank
        out = latent_dim + scale_outputs + (latent_dim if proposal_kind == "lowrank" else 0)
        self.encoder = nn.Sequential(
            nn.Linear(data_dim, hidden), nn.Tanh(), nn.Linear(hidden, out)
        ).to(DTYPE)

    def model_parameters(self) -> list[nn.Parameter]:
        return [*self.decoder.parameters(), self.log_noise]

    def inference_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def split(self, out: Tensor) -> tuple[Tensor, ...]:
        """mvn: (loc, scale_tril); lowrank: (loc, cov_factor, cov_diag)."""
        d, r = self.latent_dim, self.rank
        loc = out[:, :d]
        if self.proposal_kind == "mvn":
            return loc, lower_triangular(out[:, d:].reshape(-1, d, d))
        factor = out[:, d : d + d * r].reshape(-1, d, r)
        return loc, factor, F.softplus(out[:, d + d * r :]) + 0.3

    def distribution(self, params: tuple[Tensor, ...]):
        if self.proposal_kind == "mvn":
            return MultivariateNormal(params[0], scale_tril=params[1])
        return LowRankMultivariateNormal(*params)

    def reparameterize(self, params: tuple[Tensor, ...], eps: Tensor) -> Tensor:
        if self.proposal_kind == "mvn":
            loc, tril = params
            return loc + torch.einsum("bij,kbj->kbi", tril, eps)
        loc, factor, diag = params
        eps_w, eps_d = eps[..., : self.rank], eps[..., self.rank :]
        return loc + torch.einsum("bij,kbj->kbi", factor, eps_w) + diag.sqrt() * eps_d

    def log_q(self, params: tuple[Tensor, ...], z: Tensor) -> Tensor:
        """Gaussian log-density from the explicit covariance (Cholesky of the dense matrix)."""
        if self.proposal_kind == "mvn":
            loc, tril = params
        else:
            loc, factor, diag = params
            cov = factor @ factor.transpose(-1, -2) + torch.diag_embed(diag)
            tril = torch.linalg.cholesky(cov)
        diff = (z - loc).unsqueeze(-1)  # [K, B, D, 1]
        tril = tril.expand(*diff.shape[:2], -1, -1)  # [K, B, D, D]
        white = torch.linalg.solve_triangular(tril, diff, upper=False)
        log_det = tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # [K, B]
        return -0.5 * white.squeeze(-1).square().sum(-1) - log_det - 0.5 * self.latent_dim * LOG_2PI

    def noise_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.latent_dim + (self.rank if self.proposal_kind == "lowrank" else 0))

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        prior = -0.5 * z.square() - 0.5 * LOG_2PI  # N(0, I)
        lik = diag_normal_log_density(x, self.decoder(z), self.log_noise.exp())
        return prior.sum(-1) + lik.sum(-1)


def noise_shape(model: nn.Module, batch: int) -> tuple[int, ...]:
    if isinstance(model, MLPModel):
        return model.noise_shape(batch)
    return (batch, *model.latent_shape)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "linear_diag": lambda: LinearGaussian(latent_shape=(2,)),
    "linear_scalar": lambda: LinearGaussian(latent_shape=()),
    "linear_event2d": lambda: LinearGaussian(latent_shape=(2, 2)),
    "mlp_mvn": lambda: MLPModel(proposal_kind="mvn"),
    "mlp_lowrank": lambda: MLPModel(proposal_kind="lowrank"),
}


# -- reference gradients from the estimators' definitions ------------------------------------
def loo_weight_squares(log_w: Tensor) -> Tensor:
    """``[K, B]``: entry j is sum_{k != j} (w_j / sum_{i != k} w_i)^2, by explicit loops."""
    return loo_weight_powers(log_w, 2)


def inference_surrogate(
    name: str,
    log_w_full: Tensor,
    log_w_path: Tensor,
    log_q_score: Tensor,
    alpha: float = 0.9,
    cv: dict[str, float] | None = None,
) -> Tensor:
    """A scalar whose phi-gradient is the estimator's inference gradient (summed over B).

    :param log_w_full: log p(x, z(phi)) - log q(z(phi); phi): every path.
    :param log_w_path: log p(x, z(phi)) - log q(z(phi); stop(phi)): the reparameterization path.
    :param log_q_score: log q(stop(z); phi): the score term.
    """
    lw = log_w_full.detach()
    w = torch.softmax(lw, 0)
    k = lw.shape[0]
    if name == "vae":
        return log_w_full.mean(0).sum()
    if name == "iwae":
        return naive_iwae_bound(log_w_full).sum()
    if name == "jvi":
        return naive_jackknife_bound(log_w_full).sum()
    if name in ("miwae", "ciwae", "piwae"):  # the objective itself, every path (PIWAE: MIWAE)
        return naive_inference_bound(name, log_w_full).sum()
    if name == "stl":  # d logmeanexp of the stopped log-weights = sum_k w~_k d(stopped log w_k)
        return naive_iwae_bound(log_w_path).sum()
    if name == "rws":  # wake-phi: maximize sum_k w~_k log q(stop z_k)
        return (w * log_q_score).sum()
    if name == "dreg_cv":
        al, be, ga, de = (cv[n] for n in ("alpha", "beta", "gamma", "delta"))
        loo = torch.stack([torch.logsumexp(torch.cat([lw[:i], lw[i + 1 :]]), 0) for i in range(k)])
        signal = naive_iwae_bound(lw) - (1 - ga) * loo
        return (
            al * (signal * log_q_score).sum()
            + (1 - al) * (w * log_w_path).sum()
            + (1 - be) * (((1 - de) / k - w) * log_q_score).sum()
            + be * ((w**2 - w) * log_w_path).sum()
        )
    path = {
        "dreg_iwae": lambda: w**2,
        "dreg_iwae_norm": lambda: w**2 / (w**2).sum(0),
        "dreg_rws": lambda: w - w**2,
        "dreg_rws_norm": lambda: (w - w**2) / (w - w**2).sum(0),
        "dreg_alpha": lambda: (1 - alpha) * w**2 + alpha * (w - w**2),
        "dreg_jvi": lambda: k * w**2 - (k - 1) / k * loo_weight_squares(lw),
        "dreg_miwae": lambda: naive_group_weights(lw) ** 2 / GROUPS,  # DReG within each group
        "dreg_piwae": lambda: naive_group_weights(lw) ** 2 / GROUPS,
    }[name]()
    return (path * log_w_path).sum()


def reference_gradients(
    name: str, model: nn.Module, x: Tensor, eps: Tensor, cv: dict[str, float] | None = None
) -> tuple[list[Tensor], list[Tensor]]:
    """``(model grads, inference grads)`` of the *objective* summed over the batch, each
    parameter group differentiated on its own (two autograd passes)."""
    params = model.proposal_params(x)
    z = model.reparameterize(params, eps)
    stopped = tuple(p.detach() for p in params)
    # Model gradient: d/dtheta of the bound, z held fixed (z does not depend on theta).
    log_w_theta = model.log_joint(x, z.detach()) - model.log_q(stopped, z.detach())
    model_bound = naive_bound(name, log_w_theta).sum()
    model_grads = torch.autograd.grad(model_bound, model.model_parameters())
    log_p = model.log_joint(x, z)
    surrogate = inference_surrogate(
        name,
        log_w_full=log_p - model.log_q(params, z),
        log_w_path=log_p - model.log_q(stopped, z),
        log_q_score=model.log_q(params, z.detach()),
        cv=cv,
    )
    inference_grads = torch.autograd.grad(surrogate, model.inference_parameters())
    return list(model_grads), list(inference_grads)
