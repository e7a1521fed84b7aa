"""The estimators as a PyTorch loss for any latent-variable model with a Gaussian proposal.

A user has a reparameterizable proposal q(z | x) (a ``torch.distributions`` object with batch
shape ``[B]``) and a function giving log p(x, z). :func:`monte_carlo_objective` turns them into
a loss whose **one** ``backward()`` gives every parameter its estimator's gradient, and the
estimator's bound to log::

    result = monte_carlo_objective(q, lambda z: log_joint(x, z), num_samples=64)
    result.loss.backward()             # theta: model gradient, phi: inference gradient
    log(result.objective.mean())       # e.g. the IWAE bound, never a surrogate

Which parameter is which needs no declaration: whatever log p depends on (decoder, learned
prior) gets the model gradient sum_k m_k d/dtheta log p(x, z_k); whatever q depends on (encoder)
gets the inference gradient (:mod:`dreg.estimators.surrogates`). Parameters reached by both
(a shared trunk) receive the sum of the two.

:func:`make_particles` is the one place where :class:`~dreg.estimators.Particles` are built
(``dreg.model.VAE`` uses it too). It is where hand-written code goes wrong: three versions of
the samples must carry three different gradients::

    z_k           = g(eps_k; phi)                     reparameterized draw, eps_k ~ N(0, I)
    log_p         = log p(x, z_k)                     through an alias of z (the routing hook)
    log_q_stopped = log q(z_k; stop(phi))             path term: z keeps its gradient
    log_q_stop_z  = log q(stop(z_k); phi)             score term: the parameters keep theirs

Stopping phi means rebuilding q from detached parameters, which needs a rule per distribution
type: ``Normal``, ``Independent`` (of a supported base), ``MultivariateNormal`` and
``LowRankMultivariateNormal`` (``torch.distributions``) are built in; :func:`register_proposal`
adds others. Diagonal Gaussians (``Normal``, ``Independent(Normal)``) skip building
distribution objects: their densities are computed from ``(loc, scale)`` directly.

What the estimators require: K independent reparameterized samples z_k = g(eps_k; phi) (the
DReG identity, Tucker et al. 2019 eq. 5, is an expectation over independent draws:
:func:`antithetic_noise` breaks it) and a proposal whose parameters can be stopped. Out of
scope: discrete latents (no reparameterization) and hierarchical / multi-level proposals
q(z_1) q(z_2 | z_1), whose doubly reparameterized gradient needs the generalized estimator of
Bauer & Mnih (2021).

A trap this API avoids: applying the DReG weights w~_k^2 to the model parameters as well gives
them sum_k w~_k^2 d/dtheta log p (what TFP's DREG does, measured on identical noise) instead of
the IWAE gradient sum_k w~_k d/dtheta log p. Here every estimator's model gradient is the
gradient of its stated bound (the IWAE bound for all DReG variants except ``dreg_jvi``).

References:
    Tucker, Lawson, Gu & Maddison (2019), Doubly Reparameterized Gradient Estimators for
    Monte Carlo Objectives, ICLR.
    Bauer & Mnih (2021), Generalized Doubly Reparameterized Gradient Estimators, ICML.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor
from torch.distributions import (
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
)

from dreg.estimators import Estimator, GradientWeights, estimator_by_name
from dreg.estimators.surrogates import Particles, routed_loss

_LOG_2PI = math.log(2 * math.pi)

#: ``(shape, dtype, device) -> Tensor`` of standard-normal noise; dim 0 of ``shape`` is K.
NoiseSampler = Callable[[torch.Size, torch.dtype, torch.device], Tensor]
#: ``z [K, B, *event] -> log p(x, z) [K, B]``.
LogJoint = Callable[[Tensor], Tensor]


# -- noise ----------------------------------------------------------------------------------------
def standard_normal_noise(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """K independent standard-normal draws (the default)."""
    return torch.randn(shape, dtype=dtype, device=device)


def antithetic_noise(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Mirrored pairs (eps, -eps): the first K/2 draws and their negatives, along dim 0.

    Each z_k is still distributed as q, so fully reparameterized estimators (``vae``, ``iwae``)
    stay unbiased; DReG estimators do not (their identity needs independent samples), so
    :func:`monte_carlo_objective` refuses the combination.
    """
    num_samples = shape[0]
    if num_samples % 2:
        raise ValueError(f"antithetic sampling needs an even K, got K={num_samples}")
    half = torch.randn((num_samples // 2, *shape[1:]), dtype=dtype, device=device)
    return torch.cat([half, -half], dim=0)


# -- proposal rules -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProposalRule:
    """How :func:`make_particles` handles one ``torch.distributions`` type.

    :ivar stop: ``q -> q'``, the same distribution rebuilt from detached parameters.
    :ivar noise_shape: ``q -> shape`` of the standard-normal noise of one draw (batch dims
        first); ``None`` when the type draws its own noise with ``rsample`` (then the ``noise``
        argument is refused).
    :ivar reparameterize: ``(q, eps [K, *noise_shape]) -> z [K, *batch_shape, *event_shape]``.
    """

    stop: Callable[[Distribution], Distribution]
    noise_shape: Callable[[Distribution], torch.Size] | None = None
    reparameterize: Callable[[Distribution, Tensor], Tensor] | None = None


def _low_rank_reparameterize(q: LowRankMultivariateNormal, eps: Tensor) -> Tensor:
    """z = loc + W eps_W + sqrt(D) eps_D, with eps = [eps_W (rank), eps_D (event)]."""
    eps_w, eps_d = eps.split([q.cov_factor.shape[-1], q.loc.shape[-1]], dim=-1)
    return q.loc + (q.cov_factor @ eps_w.unsqueeze(-1)).squeeze(-1) + q.cov_diag.sqrt() * eps_d


_RULES: dict[type[Distribution], ProposalRule] = {
    Normal: ProposalRule(
        stop=lambda q: Normal(q.loc.detach(), q.scale.detach(), validate_args=False),
        noise_shape=lambda q: q.loc.shape,
        reparameterize=lambda q, eps: q.loc + q.scale * eps,
    ),
    MultivariateNormal: ProposalRule(
        stop=lambda q: MultivariateNormal(
            q.loc.detach(), scale_tril=q.scale_tril.detach(), validate_args=False
        ),
        noise_shape=lambda q: q.loc.shape,
        reparameterize=lambda q, eps: q.loc + (q.scale_tril @ eps.unsqueeze(-1)).squeeze(-1),
    ),
    LowRankMultivariateNormal: ProposalRule(
        stop=lambda q: LowRankMultivariateNormal(
            q.loc.detach(), q.cov_factor.detach(), q.cov_diag.detach(), validate_args=False
        ),
        noise_shape=lambda q: torch.Size(
            (*q.loc.shape[:-1], q.cov_factor.shape[-1] + q.loc.shape[-1])
        ),
        reparameterize=_low_rank_reparameterize,
    ),
}


def register_proposal(dist_type: type[Distribution], stop: Callable[[Distribution], Distribution]):
    """Let :func:`make_particles` accept proposals of ``dist_type`` (exact type).

    :param stop: rebuilds a distribution of this type from its parameters detached, e.g.
        ``lambda q: Laplace(q.loc.detach(), q.scale.detach())``. Samples are drawn with
        ``q.rsample`` (so ``dist_type.has_rsample`` must be true) and the ``noise`` argument is
        not available for the type.
    """
    if not dist_type.has_rsample:
        raise TypeError(f"{dist_type.__name__} has no rsample: DReG needs reparameterized samples")
    _RULES[dist_type] = ProposalRule(stop=stop)


def _rule(proposal: Distribution) -> ProposalRule:
    """The rule for ``proposal``; ``Independent`` wraps the rule of its base distribution."""
    if type(proposal) is Independent:
        base = _rule(proposal.base_dist)
        ndims = proposal.reinterpreted_batch_ndims
        has_noise = base.noise_shape is not None
        return ProposalRule(
            stop=lambda q: Independent(base.stop(q.base_dist), ndims, validate_args=False),
            noise_shape=(lambda q: base.noise_shape(q.base_dist)) if has_noise else None,
            reparameterize=lambda q, eps: base.reparameterize(q.base_dist, eps),
        )
    rule = _RULES.get(type(proposal))
    if rule is None:
        name = type(proposal).__name__
        raise TypeError(
            f"no rule to stop the parameters of a {name} proposal: DReG needs has_rsample and a "
            f"way to rebuild q from detached parameters; register one with "
            f"dreg.library.register_proposal({name}, lambda q: {name}(<parameters>.detach()))"
        )
    return rule


def detach_parameters(proposal: Distribution) -> Distribution:
    """``proposal`` rebuilt from its parameters detached: log q(z; stop(phi)) as a distribution."""
    return _rule(proposal).stop(proposal)


def _diagonal_normal(proposal: Distribution) -> tuple[Tensor, Tensor, int] | None:
    """``(loc, scale, event_ndims)`` of a Normal, possibly wrapped in Independent; else None."""
    event_ndims = 0
    while type(proposal) is Independent:
        event_ndims += proposal.reinterpreted_batch_ndims
        proposal = proposal.base_dist
    if type(proposal) is Normal:
        return proposal.loc, proposal.scale, event_ndims
    return None


def diagonal_normal_log_prob(z: Tensor, loc: Tensor, scale: Tensor, event_ndims: int) -> Tensor:
    """log N(z; loc, diag(scale^2)) summed over the last ``event_ndims`` dims.

    The elementwise density -1/2 ((z - loc) / scale)^2 - log scale - 1/2 log 2 pi, the same
    expression (and float rounding) as ``dreg.model.gaussian_log_prob`` for ``event_ndims=1``.
    """
    density = -0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * _LOG_2PI
    if event_ndims == 0:
        return density
    return density.reshape(*density.shape[:-event_ndims], -1).sum(-1)


# -- particles ------------------------------------------------------------------------------------
def _check_proposal(proposal: object) -> ProposalRule:
    if not isinstance(proposal, Distribution):
        raise TypeError(
            f"proposal must be a torch.distributions.Distribution, got {type(proposal).__name__}"
        )
    if not proposal.has_rsample:
        raise TypeError(
            f"a {type(proposal).__name__} proposal cannot be reparameterized (has_rsample is "
            f"False): DReG estimators differentiate through z = g(eps; phi); use a "
            f"reparameterizable proposal such as Normal (discrete latents are out of scope)"
        )
    rule = _rule(proposal)
    extra_dims = len(proposal.batch_shape) - 1
    if extra_dims:
        fix = (
            f"wrap it in Independent(q, {extra_dims}) to make the other dims part of the event"
            if extra_dims > 0
            else "give its parameters a leading batch dim of size 1 for a single data point"
        )
        raise ValueError(
            f"proposal batch shape must be [B] (one q(z | x_b) per data point), got "
            f"{list(proposal.batch_shape)}; {fix}"
        )
    return rule


def _draw(proposal: Distribution, rule: ProposalRule, num_samples: int, noise) -> Tensor:
    """``[K, B, *event]`` reparameterized samples."""
    if rule.noise_shape is None:
        if noise is not None:
            raise ValueError(
                f"noise= needs a Gaussian proposal (Normal, Independent, MultivariateNormal, "
                f"LowRankMultivariateNormal); {type(proposal).__name__} draws its own noise"
            )
        return proposal.rsample((num_samples,))
    shape = torch.Size((num_samples, *rule.noise_shape(proposal)))
    if noise is None or callable(noise):
        like = proposal.mean
        eps = (noise or standard_normal_noise)(shape, like.dtype, like.device)
    else:
        eps = noise
    if eps.shape != shape:
        raise ValueError(
            f"noise has shape {list(eps.shape)}, this proposal needs [K, *noise shape] = "
            f"{list(shape)} of standard-normal draws"
        )
    return rule.reparameterize(proposal, eps)


def make_particles(
    proposal: Distribution,
    log_joint: LogJoint,
    num_samples: int,
    noise: Tensor | NoiseSampler | None = None,
) -> Particles:
    """K reparameterized samples per data point and the three log-densities the estimators need.

    :param proposal: q(z | x), reparameterizable, batch shape ``[B]``, any event shape.
    :param log_joint: ``z [K, B, *event] -> log p(x, z) [K, B]`` (sum over the event dims).
    :param num_samples: K.
    :param noise: standard-normal noise ``eps`` with z = g(eps; phi): a tensor of shape
        ``[K, *noise shape]`` (for a replay, or a test that needs the exact draw), a
        :data:`NoiseSampler` (e.g. :func:`antithetic_noise`), or ``None`` for
        :func:`standard_normal_noise`. The noise shape is ``[B, *event]``, except for
        ``LowRankMultivariateNormal``: ``[B, rank + D]`` (the factor's noise first).
    :returns: :class:`~dreg.estimators.Particles`; ``log_p`` is computed from ``z_for_p``, a
        distinct alias of z where :func:`~dreg.estimators.routed_loss` hooks its rescaling.
    """
    rule = _check_proposal(proposal)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r}: K must be an integer >= 1")
    z = _draw(proposal, rule, num_samples, noise)  # [K, B, *event]
    z_for_p = z.view_as(z)  # a distinct autograd node: the routing hook goes here
    log_p = log_joint(z_for_p)
    expected = (num_samples, *proposal.batch_shape)
    if not isinstance(log_p, Tensor) or tuple(log_p.shape) != expected:
        got = list(log_p.shape) if isinstance(log_p, Tensor) else type(log_p).__name__
        raise ValueError(
            f"log_joint returned {got} for z of shape {list(z.shape)}; it must return log p(x, z) "
            f"of shape [K, B] = {list(expected)}, summed over the event dims "
            f"{list(proposal.event_shape)}"
        )
    diagonal = _diagonal_normal(proposal)
    if diagonal is not None:
        # No distribution objects on the VAE's hot path: the densities straight from (loc, scale).
        loc, scale, event_ndims = diagonal
        log_q_stopped = diagonal_normal_log_prob(z, loc.detach(), scale.detach(), event_ndims)
        log_q_stop_z = diagonal_normal_log_prob(z.detach(), loc, scale, event_ndims)
    else:
        log_q_stopped = rule.stop(proposal).log_prob(z)
        log_q_stop_z = proposal.log_prob(z.detach())
    return Particles(
        log_p=log_p, log_q_stopped=log_q_stopped, log_q_stop_z=log_q_stop_z, z_for_p=z_for_p
    )


# -- the loss -------------------------------------------------------------------------------------
@dataclass
class ObjectiveResult:
    """What :func:`monte_carlo_objective` returns for one batch.

    :ivar loss: scalar to call ``backward()`` on, once. Its *value* is a surrogate with no
        meaning: log ``objective`` instead.
    :ivar objective: ``[B]`` the estimator's bound per data point (detached), e.g. the IWAE
        bound log 1/K sum_k w_k for the DReG-IWAE estimator.
    :ivar particles: the samples and log-densities (``particles.log_w`` = log w ``[K, B]``).
    :ivar weights: the estimator's coefficients on the three gradient paths.
    """

    loss: Tensor
    objective: Tensor
    particles: Particles
    weights: GradientWeights


@cache
def _stateless_estimator(name: str) -> Estimator:
    return estimator_by_name(name)


def _resolve_estimator(estimator: str | Estimator) -> Estimator:
    if isinstance(estimator, Estimator):
        return estimator
    if not isinstance(estimator, str):
        raise TypeError(
            f"estimator must be a name (e.g. 'dreg_iwae') or an Estimator, got "
            f"{type(estimator).__name__}"
        )
    resolved = _stateless_estimator(estimator)
    if any(p.requires_grad for p in resolved.parameters()):
        raise ValueError(
            f"estimator '{estimator}' learns its own parameters: build it once with "
            f"dreg.estimators.estimator_by_name('{estimator}'), give its parameters to your "
            f"optimizer and pass the object"
        )
    return resolved


def monte_carlo_objective(
    proposal: Distribution,
    log_joint: LogJoint,
    num_samples: int,
    estimator: str | Estimator = "dreg_iwae",
    *,
    noise: Tensor | NoiseSampler | None = None,
    train_model: bool = True,
) -> ObjectiveResult:
    """The loss of a Monte Carlo objective with the gradient estimator ``estimator``.

    One backward of ``result.loss`` gives the parameters of ``log_joint`` (theta) the
    estimator's model gradient sum_k m_k d/dtheta log p(x, z_k) and the parameters of
    ``proposal`` (phi) its inference gradient (for ``dreg_iwae``:
    sum_k w~_k^2 d/dz [log p(x, z_k) - log q(z_k; stop(phi))] dz_k/dphi), both averaged over
    the batch and negated for minimization.

    :param proposal: q(z | x), reparameterizable, batch shape ``[B]`` (see :func:`make_particles`).
    :param log_joint: ``z [K, B, *event] -> log p(x, z) [K, B]``.
    :param num_samples: K.
    :param estimator: a config name (``conf/estimator/*.yaml``: ``iwae``, ``dreg_iwae``,
        ``dreg_rws``, ...) or an :class:`~dreg.estimators.Estimator`. Estimators with learned
        parameters (``dreg_cv``) must be passed as an object whose parameters you optimize.
    :param noise: see :func:`make_particles`.
    :param train_model: ``False`` when theta is frozen (only the inference gradient matters).
    """
    estimator = _resolve_estimator(estimator)
    if isinstance(num_samples, int) and num_samples < estimator.min_samples:
        raise ValueError(
            f"estimator '{estimator.name}' needs num_samples >= {estimator.min_samples}, "
            f"got {num_samples}"
        )
    if noise is antithetic_noise and estimator.needs_independent_samples:
        raise ValueError(
            f"estimator '{estimator.name}' needs independent samples (the DReG identity); "
            f"antithetic noise biases it: use noise=None or a fully reparameterized estimator"
        )
    particles = make_particles(proposal, log_joint, num_samples, noise)
    weights = estimator(particles.log_w)
    loss = routed_loss(particles, weights, train_model=train_model)
    return ObjectiveResult(loss, weights.objective, particles, weights)
