"""The paper's latent-variable model: Gaussian encoder, Bernoulli decoder, optional context.

Architecture and initialisation follow the original code (Tucker et al. 2019, after Burda et
al. 2016): MLPs with tanh, Xavier-uniform weights, zero biases; the encoder input is centred by
the training mean; scales are ``softplus(raw + 0.25)``; the decoder's output bias starts at the
logit of the clipped training mean. With ``context_dim > 0`` (struct-MNIST) the prior becomes
p(z | c), a Gaussian MLP of the centred context, and the encoder and decoder also see c.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Independent, Normal

from dreg.estimators.surrogates import Particles
from dreg.library import antithetic_noise, make_particles

_LOG_2PI = math.log(2 * math.pi)
SCALE_OFFSET = 0.25  # softplus(raw + 0.25): the original's initial scale bias
BIAS_CLIP = 1e-3  # clip the pixel mean before the logit so blank pixels get a finite bias


def mlp(
    in_dim: int, hidden_dims: Sequence[int], out_dim: int, activation: str = "tanh"
) -> nn.Sequential:
    """Linear layers with ``activation`` between them; Xavier-uniform weights, zero biases."""
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    layers: list[nn.Module] = []
    dims = [in_dim, *hidden_dims]
    for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
        layers += [nn.Linear(d_in, d_out), act()]
    layers.append(nn.Linear(dims[-1], out_dim))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


def gaussian_log_prob(z: Tensor, mean: Tensor, scale: Tensor) -> Tensor:
    """log N(z; mean, diag(scale^2)) summed over the last dim: ``[..., D] -> [...]``."""
    return (-0.5 * ((z - mean) / scale) ** 2 - scale.log() - 0.5 * _LOG_2PI).sum(-1)


class GaussianMLP(nn.Module):
    """x -> (mean, scale) of a diagonal Gaussian, scale = softplus(raw + 0.25)."""

    def __init__(self, in_dim: int, hidden_dims: Sequence[int], out_dim: int, activation: str):
        super().__init__()
        self.net = mlp(in_dim, hidden_dims, 2 * out_dim, activation)

    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        mean, raw_scale = self.net(inputs).chunk(2, dim=-1)
        return mean, F.softplus(raw_scale + SCALE_OFFSET)


class CentredData(nn.Module):
    """What every dreg model does with the training statistics (Burda et al.'s conventions):
    ``train_mean`` and ``context_mean`` as buffers, the pixels centred at the encoder's input,
    the context centred wherever a network sees it, and a Bernoulli decoder's output bias
    at the logit of the clipped pixel mean.

    :param data_dim: number of (binary) pixels in x.
    :param train_mean: ``[data_dim]`` training-set pixel mean (default 0.5 everywhere).
    :param context_dim: size of the context c (0: unconditional model).
    :param context_mean: ``[context_dim]`` training mean of c (default 0).
    """

    def __init__(
        self,
        data_dim: int,
        train_mean: Tensor | None = None,
        context_dim: int = 0,
        context_mean: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.data_dim, self.context_dim = data_dim, context_dim
        if train_mean is None:
            train_mean = torch.full((data_dim,), 0.5)
        if context_mean is None:
            context_mean = torch.zeros(context_dim)
        self.register_buffer("train_mean", torch.as_tensor(train_mean, dtype=torch.float32))
        self.register_buffer("context_mean", torch.as_tensor(context_mean, dtype=torch.float32))

    def init_output_bias(self, decoder: nn.Sequential) -> None:
        """The decoder's last bias at logit(clipped pixel mean): p(x | z) starts at the data's
        marginal."""
        clipped = self.train_mean.clamp(BIAS_CLIP, 1 - BIAS_CLIP)
        with torch.no_grad():
            decoder[-1].bias.copy_(torch.logit(clipped))

    def centred_context(self, context: Tensor | None) -> Tensor | None:
        """``context - context_mean`` ``[B, C]`` (``None`` for an unconditional model)."""
        if self.context_dim == 0:
            return None
        if context is None or context.shape[-1] != self.context_dim:
            raise ValueError(f"this model needs a context of size {self.context_dim}")
        return context - self.context_mean


class VAE(CentredData):
    """q(z | x[, c]) Gaussian, p(z[ | c]) Gaussian, p(x | z[, c]) Bernoulli.

    :param data_dim: number of (binary) pixels in x.
    :param latent_dim: dimension of z (50 in the paper).
    :param hidden_dims: hidden sizes of every MLP ([200, 200] in the paper).
    :param train_mean: ``[data_dim]`` training-set pixel mean: centres the encoder input and
        initialises the decoder's output bias.
    :param context_dim: size of the context c (0: unconditional model, prior N(0, I)).
    :param context_mean: ``[context_dim]`` training mean of c, to centre it.
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int = 50,
        hidden_dims: Sequence[int] = (200, 200),
        activation: str = "tanh",
        train_mean: Tensor | None = None,
        context_dim: int = 0,
        context_mean: Tensor | None = None,
    ) -> None:
        super().__init__(data_dim, train_mean, context_dim, context_mean)
        self.latent_dim = latent_dim
        hidden_dims = list(hidden_dims)
        self.encoder = GaussianMLP(data_dim + context_dim, hidden_dims, latent_dim, activation)
        self.decoder = mlp(latent_dim + context_dim, hidden_dims, data_dim, activation)
        self.init_output_bias(self.decoder)
        self.prior = (
            GaussianMLP(context_dim, hidden_dims, latent_dim, activation) if context_dim else None
        )

    # -- parameter groups: each estimator defines the gradient each group gets ----------------
    def model_parameters(self) -> list[nn.Parameter]:
        """theta: decoder and (conditional) prior."""
        params = list(self.decoder.parameters())
        return params + (list(self.prior.parameters()) if self.prior is not None else [])

    def inference_parameters(self) -> list[nn.Parameter]:
        """phi: the encoder (inference network)."""
        return list(self.encoder.parameters())

    # -- densities ----------------------------------------------------------------------------
    def posterior_params(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mean and scale of q(z | x[, c]), each ``[B, Dz]``."""
        inputs = x - self.train_mean
        c = self.centred_context(context)
        if c is not None:
            inputs = torch.cat([inputs, c], dim=-1)
        return self.encoder(inputs)

    def log_joint(self, x: Tensor, z: Tensor, context: Tensor | None = None) -> Tensor:
        """log p(x, z[ | c]) for z ``[K, B, Dz]`` and x ``[B, Dx]``: returns ``[K, B]``."""
        c = self.centred_context(context)
        if c is None:
            log_prior = (-0.5 * z**2 - 0.5 * _LOG_2PI).sum(-1)  # [K, B]
            dec_in = z
        else:
            prior_mean, prior_scale = self.prior(c)  # [B, Dz]
            log_prior = gaussian_log_prob(z, prior_mean, prior_scale)
            dec_in = torch.cat([z, c.expand(z.shape[0], -1, -1)], dim=-1)  # [K, B, Dz + C]
        logits = self.decoder(dec_in)  # [K, B, Dx]
        # Bernoulli log-likelihood x*l - log(1 + e^l): the same value as the negated
        # binary_cross_entropy_with_logits, in two passes over [K, B, Dx] instead of its
        # seven under vmap (the decoder's output is the largest tensor of a step).
        log_lik = (logits * x).sum(-1) - F.softplus(logits).sum(-1)  # [K, B]
        return log_prior + log_lik

    @property
    def noise_dim(self) -> int:
        """Standard-normal draws per sample (z = mean + scale * eps)."""
        return self.latent_dim

    def propose(
        self, x: Tensor, context: Tensor | None, eps: Tensor, score: bool = True
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """z ``[K, B, Dz]`` = mean + scale * eps, log q(z; stop phi) (z keeps its path) and
        log q(stop z; phi), both ``[K, B]``: what :class:`dreg.step.Replicas` needs, with the
        same expressions as :func:`dreg.library.make_particles` for a diagonal Gaussian.

        :param score: ``False``: the estimators have no score term (DReG, STL), so log q(stop
            z; phi) is not built (``None``): its graph would only carry zero gradients.
        """
        mean, scale = self.posterior_params(x, context)  # [B, Dz] each
        z = mean + scale * eps
        # gaussian_log_prob: diagonal_normal_log_prob's expression for one event dim.
        log_q_stopped = gaussian_log_prob(z, mean.detach(), scale.detach())
        if not score:
            return z, log_q_stopped, None
        log_q_stop_z = gaussian_log_prob(z.detach(), mean, scale)
        return z, log_q_stopped, log_q_stop_z

    def particles(
        self,
        x: Tensor,
        num_samples: int,
        context: Tensor | None = None,
        antithetic: bool = False,
        noise: Tensor | None = None,
    ) -> Particles:
        """One encoder pass and one decoder pass with K reparameterized samples per point.

        Built by :func:`dreg.library.make_particles`, the one constructor of Particles.

        :param antithetic: mirror half of the noise (eps, -eps) around the posterior mean.
        :param noise: the standard-normal draws ``[K, B, Dz]`` to use (a replay of a step).
        """
        mean, scale = self.posterior_params(x, context)  # [B, Dz] each
        # validate_args=False: a NaN scale must reach the loss, where model.nonfinite decides
        # whether to raise or skip, not fail inside the constructor.
        proposal = Independent(Normal(mean, scale, validate_args=False), 1, validate_args=False)
        return make_particles(
            proposal,
            lambda z: self.log_joint(x, z, context),
            num_samples,
            noise=noise if noise is not None else (antithetic_noise if antithetic else None),
        )

    @torch.no_grad()
    def log_weights(
        self, x: Tensor, num_samples: int, context: Tensor | None = None, chunk_size: int = 500
    ) -> Tensor:
        """``[S, B]`` log-weights with S = num_samples, drawn ``chunk_size`` samples at a time so
        memory is bounded by the chunk (the decoder output is ``[chunk, B, Dx]``)."""
        mean, scale = self.posterior_params(x, context)
        chunks = []
        for start in range(0, num_samples, chunk_size):
            k = min(chunk_size, num_samples - start)
            z = mean + scale * torch.randn((k, *mean.shape), device=x.device, dtype=mean.dtype)
            chunks.append(self.log_joint(x, z, context) - gaussian_log_prob(z, mean, scale))
        return torch.cat(chunks, dim=0)

    @torch.no_grad()
    def log_likelihood(
        self, x: Tensor, num_samples: int, context: Tensor | None = None, chunk_size: int = 500
    ) -> Tensor:
        """Importance-sampled estimate log (1/S sum_s w_s) of log p(x[ | c]), ``[B]``."""
        log_w = self.log_weights(x, num_samples, context, chunk_size)  # [S, B]
        return torch.logsumexp(log_w, dim=0) - math.log(num_samples)
