"""Two stochastic layers (Burda et al. 2016) with the generalized DReG proposal densities.

    generative  p(z2[ | c]) p(z1 | z2[, c]) p(x | z1[, c])    z2 ~ N(0, I) without context
    inference   q(z1 | x[, c]) q(z2 | z1[, c])

x -> 200-200 (tanh) -> z1 (100) -> 100-100 -> z2 (50); p(z1 | z2) is a Gaussian MLP (100-100),
p(x | z1) a Bernoulli MLP (200-200). Initialisation and conventions are those of
:class:`dreg.model.VAE`: Xavier weights, zero biases, encoder input centred by the training
mean, scales softplus(raw + 0.25), the decoder's output bias at the logit of the clipped
training mean. With ``context_dim > 0`` every network also sees the centred context c and the
top prior becomes a Gaussian MLP of c.

DReG estimators need log q(z; stop(phi)) with z on its reparameterization path. For
q(z1 | x) q(z2 | z1) the common implementation detaches the *tensors* mu2(z1), sigma2(z1),
which also cuts z1 out of log q(z2 | z1): it drops the d log q(z2 | z1) / d z1 terms, unbiased
at K = 1 and biased for K > 1. Bauer & Mnih (2021) stop the *parameters* instead::

    log_q_stopped = log q(z1; stop phi) + log q(z2 | z1; stop phi)        z1, z2 live
    log_q_stop_z  = log q(stop z1; phi) + log q(stop z2 | stop z1; phi)

so q(z2 | z1) is evaluated three times: to sample z2, with its parameters detached
(``torch.func.functional_call``) for the path term, and at stop(z1) for the score term.
z = cat([z1, z2], -1) is one tensor, so :class:`~dreg.estimators.Particles` and the routing of
every estimator work unchanged (:func:`dreg.library.particles_from_draws`).

References:
    Burda, Grosse & Salakhutdinov (2016), Importance Weighted Autoencoders, ICLR.
    Bauer & Mnih (2021), Generalized Doubly Reparameterized Gradient Estimators, ICML.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from dreg.estimators.surrogates import Particles
from dreg.library import antithetic_noise, particles_from_draws, standard_normal_noise
from dreg.model import CentredData, GaussianMLP, gaussian_log_prob, mlp

_LOG_2PI = math.log(2 * math.pi)


def _stopped_call(net: nn.Module, inputs: Tensor) -> tuple[Tensor, Tensor]:
    """``net(inputs)`` with the parameters of ``net`` detached and ``inputs`` live."""
    detached = {name: p.detach() for name, p in net.named_parameters()}
    return functional_call(net, detached, (inputs,))


class TwoLayerVAE(CentredData):
    """q(z1 | x) q(z2 | z1) Gaussian, p(z2) p(z1 | z2) Gaussian, p(x | z1) Bernoulli.

    :param data_dim: number of (binary) pixels in x.
    :param latent_dims: (D1, D2), sizes of z1 and z2 ((100, 50) in Burda et al.).
    :param hidden_dims: hidden sizes of the networks next to each stochastic layer:
        ``hidden_dims[0]`` for q(z1 | x) and p(x | z1), ``hidden_dims[1]`` for q(z2 | z1),
        p(z1 | z2) and the conditional prior p(z2 | c).
    :param train_mean: ``[data_dim]`` training-set pixel mean: centres the encoder input and
        initialises the decoder's output bias.
    :param context_dim: size of the context c (0: unconditional model, prior N(0, I)).
    :param context_mean: ``[context_dim]`` training mean of c, to centre it.
    """

    def __init__(
        self,
        data_dim: int,
        latent_dims: Sequence[int] = (100, 50),
        hidden_dims: Sequence[Sequence[int]] = ((200, 200), (100, 100)),
        activation: str = "tanh",
        train_mean: Tensor | None = None,
        context_dim: int = 0,
        context_mean: Tensor | None = None,
    ) -> None:
        super().__init__(data_dim, train_mean, context_dim, context_mean)
        if len(latent_dims) != 2 or len(hidden_dims) != 2:
            raise ValueError(
                f"TwoLayerVAE has two stochastic layers: latent_dims={list(latent_dims)} and "
                f"hidden_dims={[list(h) for h in hidden_dims]} must each have two entries"
            )
        dim1, dim2 = (int(d) for d in latent_dims)
        hidden1, hidden2 = (list(h) for h in hidden_dims)
        self.latent_dims = (dim1, dim2)
        self.noise_dim = dim1 + dim2  # one standard-normal draw per latent coordinate

        c = context_dim
        # inference network, phi
        self.encoder_z1 = GaussianMLP(data_dim + c, hidden1, dim1, activation)  # q(z1 | x)
        self.encoder_z2 = GaussianMLP(dim1 + c, hidden2, dim2, activation)  # q(z2 | z1)
        # generative model, theta
        self.prior = GaussianMLP(c, hidden2, dim2, activation) if c else None  # p(z2 | c)
        self.decoder_z1 = GaussianMLP(dim2 + c, hidden2, dim1, activation)  # p(z1 | z2)
        self.decoder_x = mlp(dim1 + c, hidden1, data_dim, activation)  # p(x | z1)
        self.init_output_bias(self.decoder_x)

    # -- parameter groups ---------------------------------------------------------------------
    def model_parameters(self) -> list[nn.Parameter]:
        """theta: p(z1 | z2), p(x | z1) and the conditional prior p(z2 | c) if any."""
        params = [*self.decoder_z1.parameters(), *self.decoder_x.parameters()]
        return params + (list(self.prior.parameters()) if self.prior is not None else [])

    def inference_parameters(self) -> list[nn.Parameter]:
        """phi: q(z1 | x) and q(z2 | z1)."""
        return [*self.encoder_z1.parameters(), *self.encoder_z2.parameters()]

    def mlps(self) -> list[nn.Sequential]:
        """Every network of the model, each compiled on its own by ``model.compile=mlps``
        (``Module.compile`` works in place: state-dict keys stay those of the eager model).

        The Gaussian layers' inner ``Sequential`` networks, not the :class:`GaussianMLP`
        wrappers: q(z2 | z1) and p(z1 | z2) take latents on their reparameterization path,
        and tracing a wrapper called with such a non-leaf input makes torch 2.13's Dynamo read
        its ``.grad`` (a UserWarning, an error under the test suite's filters). The wrappers'
        chunk and softplus stay eager."""
        gaussians = [self.encoder_z1, self.encoder_z2, self.decoder_z1]
        gaussians += [self.prior] if self.prior is not None else []
        return [g.net for g in gaussians] + [self.decoder_x]

    def layer_parameters(self) -> dict[str, list[nn.Parameter]]:
        """The inference parameters per stochastic layer: ``layer1`` = q(z1 | x), ``layer2`` =
        q(z2 | z1). The naive (tensor-detach) DReG is wrong in layer 1's gradient only: the
        dropped terms reach phi through z1."""
        return {
            "layer1": list(self.encoder_z1.parameters()),
            "layer2": list(self.encoder_z2.parameters()),
        }

    # -- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _with_context(inputs: Tensor, c: Tensor | None) -> Tensor:
        """``[..., B, D]`` inputs, with the context ``[B, C]`` appended (expanded over K)."""
        if c is None:
            return inputs
        return torch.cat([inputs, c.expand(*inputs.shape[:-1], -1)], dim=-1)

    def _q1(self, x: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor]:
        """Mean and scale of q(z1 | x[, c]), each ``[B, D1]``."""
        return self.encoder_z1(self._with_context(x - self.train_mean, c))

    def _split_noise(self, eps: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        expected = (x.shape[0], self.noise_dim)
        if eps.dim() != 3 or tuple(eps.shape[1:]) != expected:
            raise ValueError(
                f"eps has shape {list(eps.shape)}; this model needs [K, B, noise_dim] = "
                f"[K, {expected[0]}, {expected[1]}] standard-normal draws (z1's, then z2's)"
            )
        return eps.split(list(self.latent_dims), dim=-1)

    # -- proposal and joint -------------------------------------------------------------------
    def propose(
        self, x: Tensor, context: Tensor | None, eps: Tensor, score: bool = True
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Reparameterized z and the two proposal densities generalized DReG needs.

        z1 = mu1(x) + sigma1(x) eps1,  z2 = mu2(z1) + sigma2(z1) eps2 (Bauer & Mnih 2021)::

            log_q_stopped = log q(z1; stop phi) + log q(z2 | z1; stop phi)     z1, z2 live
            log_q_stop_z  = log q(stop z1; phi) + log q(stop z2 | stop z1; phi)

        :param eps: ``[K, B, noise_dim]`` standard-normal draws, z1's first.
        :param score: ``False``: the estimators have no score term (DReG, STL), so
            log q(stop z; phi) and its second pass through q(z2 | z1) are not built (``None``).
        :returns: ``(z [K, B, D1 + D2], log_q_stopped [K, B], log_q_stop_z [K, B] or None)``.
        """
        eps1, eps2 = self._split_noise(eps, x)
        c = self.centred_context(context)
        mean1, scale1 = self._q1(x, c)  # [B, D1]
        z1 = mean1 + scale1 * eps1  # [K, B, D1]
        mean2, scale2 = self.encoder_z2(self._with_context(z1, c))  # [K, B, D2], z1 live
        z2 = mean2 + scale2 * eps2
        # Path term: q's parameters stopped, z1 live inside q(z2 | z1). Detaching the tensors
        # mean2, scale2 instead would drop d log q(z2 | z1) / d z1 (biased for K > 1).
        # x carries no gradient, so detaching q(z1 | x)'s tensors stops its parameters.
        stopped1 = gaussian_log_prob(z1, mean1.detach(), scale1.detach())
        stopped2 = gaussian_log_prob(z2, *_stopped_call(self.encoder_z2, self._with_context(z1, c)))
        z = torch.cat([z1, z2], dim=-1)
        if not score:
            return z, stopped1 + stopped2, None
        # Score term: z1 and z2 fixed, the parameters live.
        z1_fixed, z2_fixed = z1.detach(), z2.detach()
        score1 = gaussian_log_prob(z1_fixed, mean1, scale1)
        score2 = gaussian_log_prob(z2_fixed, *self.encoder_z2(self._with_context(z1_fixed, c)))
        return z, stopped1 + stopped2, score1 + score2

    def log_joint(self, x: Tensor, z: Tensor, context: Tensor | None = None) -> Tensor:
        """log p(x, z1, z2[ | c]) for z = cat([z1, z2], -1) ``[K, B, D1 + D2]``: ``[K, B]``."""
        z1, z2 = z.split(list(self.latent_dims), dim=-1)
        c = self.centred_context(context)
        if c is None:
            log_prior = (-0.5 * z2**2 - 0.5 * _LOG_2PI).sum(-1)  # [K, B]
        else:
            log_prior = gaussian_log_prob(z2, *self.prior(c))
        log_z1 = gaussian_log_prob(z1, *self.decoder_z1(self._with_context(z2, c)))
        logits = self.decoder_x(self._with_context(z1, c))  # [K, B, Dx]
        # Bernoulli log-likelihood x l - log(1 + e^l), the negated binary cross-entropy with
        # logits (the expression dreg.model.VAE uses: two passes over [K, B, Dx]).
        log_lik = (logits * x).sum(-1) - F.softplus(logits).sum(-1)  # [K, B]
        return log_prior + log_z1 + log_lik

    def particles(
        self,
        x: Tensor,
        num_samples: int,
        context: Tensor | None = None,
        antithetic: bool = False,
        noise: Tensor | None = None,
    ) -> Particles:
        """One proposal pass and one generative pass with K samples per data point.

        :param antithetic: mirror half of the noise (eps, -eps). Each z_k is still distributed
            as q (z2 is not mirrored itself: it depends on z1), so ``vae``/``iwae`` stay
            unbiased; DReG estimators are refused with it by the config check.
        :param noise: the standard-normal draws ``[K, B, noise_dim]`` to use (the replay of a
            training step by ``callbacks.estimator_compare``), instead of fresh ones.
        """
        if noise is not None:
            eps = noise
        else:
            weight = self.decoder_x[-1].weight  # the model's dtype and device
            sampler = antithetic_noise if antithetic else standard_normal_noise
            shape = torch.Size((num_samples, x.shape[0], self.noise_dim))
            eps = sampler(shape, weight.dtype, weight.device)
        z, log_q_stopped, log_q_stop_z = self.propose(x, context, eps)
        return particles_from_draws(
            z, log_q_stopped, log_q_stop_z, lambda z_for_p: self.log_joint(x, z_for_p, context)
        )

    # -- pictures (dreg.callbacks.images) ------------------------------------------------------
    @torch.no_grad()
    def sample_pixels(self, eps: Tensor, context: Tensor | None = None) -> Tensor:
        """Bernoulli means sigmoid(logits) ``[N, Dx]`` of x for ancestral samples of the prior:
        z2 ~ p(z2[ | c]), z1 ~ p(z1 | z2[, c]), from the standard-normal draws ``eps``
        ``[N, noise_dim]`` (z1's first, as in :meth:`propose`) and contexts ``[N, C]``."""
        eps1, eps2 = eps.split(list(self.latent_dims), dim=-1)
        c = self.centred_context(context)
        if c is None:
            z2 = eps2
        else:
            prior_mean, prior_scale = self.prior(c)
            z2 = prior_mean + prior_scale * eps2
        mean1, scale1 = self.decoder_z1(self._with_context(z2, c))
        z1 = mean1 + scale1 * eps1
        return torch.sigmoid(self.decoder_x(self._with_context(z1, c)))

    @torch.no_grad()
    def reconstruct_pixels(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Bernoulli means ``[B, Dx]`` of p(x | z1[, c]) at the mean of q(z1 | x[, c]): the
        one-layer model's reconstruction (decoded posterior mean) for the layer next to x."""
        c = self.centred_context(context)
        mean1, _ = self._q1(x, c)
        return torch.sigmoid(self.decoder_x(self._with_context(mean1, c)))

    @torch.no_grad()
    def log_weights(
        self, x: Tensor, num_samples: int, context: Tensor | None = None, chunk_size: int = 500
    ) -> Tensor:
        """``[S, B]`` log-weights log p(x, z1, z2) - log q(z1, z2 | x), S = num_samples, drawn
        ``chunk_size`` samples at a time so memory is bounded by the chunk."""
        c = self.centred_context(context)
        mean1, scale1 = self._q1(x, c)
        chunks = []
        for start in range(0, num_samples, chunk_size):
            k = min(chunk_size, num_samples - start)
            eps = torch.randn((k, x.shape[0], self.noise_dim), device=x.device, dtype=mean1.dtype)
            eps1, eps2 = eps.split(list(self.latent_dims), dim=-1)
            z1 = mean1 + scale1 * eps1
            mean2, scale2 = self.encoder_z2(self._with_context(z1, c))
            z2 = mean2 + scale2 * eps2
            log_q = gaussian_log_prob(z1, mean1, scale1) + gaussian_log_prob(z2, mean2, scale2)
            z = torch.cat([z1, z2], dim=-1)
            chunks.append(self.log_joint(x, z, context) - log_q)
        return torch.cat(chunks, dim=0)

    @torch.no_grad()
    def log_likelihood(
        self, x: Tensor, num_samples: int, context: Tensor | None = None, chunk_size: int = 500
    ) -> Tensor:
        """Importance-sampled estimate log (1/S sum_s w_s) of log p(x[ | c]), ``[B]``."""
        log_w = self.log_weights(x, num_samples, context, chunk_size)  # [S, B]
        return torch.logsumexp(log_w, dim=0) - math.log(num_samples)
