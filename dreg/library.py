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

:func:`make_particles` is where :class:`~dreg.estimators.Particles` are built (``dreg.model.VAE``
uses it too; :func:`make_hierarchical_particles` for hierarchical proposals,
:func:`particles_from_draws` for a model that computes both log q's itself). It is where
hand-written code goes wrong: three versions of the samples must carry three different
gradients::

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
scope: discrete latents (no reparameterization).

Hierarchical proposals q(z_1 | x) q(z_2 | z_1) ... (:class:`HierarchicalProposal`,
:func:`make_hierarchical_particles`) get the generalized estimator of Bauer & Mnih (2021):
log q(z; stop(phi)) stops the proposal's *parameters* while z_1 stays live inside
q(z_2 | z_1), which needs each conditional layer evaluated again with detached parameters.
Detaching the *tensors* mu_2(z_1), sigma_2(z_1) instead (the common implementation) drops the
d log q(z_2 | z_1) / d z_1 terms: unbiased at K = 1, biased for K > 1. With that log q the
estimators and the routing need no change.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor, nn
from torch.distributions import (
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
)
from torch.func import functional_call

from dreg.estimators import Estimator, GradientWeights, estimator_by_name
from dreg.estimators.surrogates import Particles, leaves_reached, routed_loss, tensor_shapes

_LOG_2PI = math.log(2 * math.pi)

#: ``(shape, dtype, device) -> Tensor`` of standard-normal noise; dim 0 of ``shape`` is K.
NoiseSampler = Callable[[torch.Size, torch.dtype, torch.device], Tensor]
#: ``z [K, B, *event] -> log p(x, z) [K, B]``.
LogJoint = Callable[[Tensor], Tensor]
#: A layer of a hierarchical proposal: ``() -> q(z_1 | x)``, then ``z_prev -> q(z_i | z_prev)``.
Layer = Callable[..., Distribution]


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


# The marker of samplers whose K draws are not independent: monte_carlo_objective refuses them
# for DReG estimators, also through functools.partial and functools.wraps wrappers. A sampler
# of your own that pairs or repeats draws should set it too (``my_sampler.dependent_samples =
# True``); exact mirror pairs and repeats are also caught from the draws themselves.
antithetic_noise.dependent_samples = True


def _marked_dependent(sampler: Callable) -> bool:
    """Whether ``sampler``, or what it wraps (``partial.func``, ``__wrapped__``), is marked."""
    seen: set[int] = set()
    while sampler is not None and id(sampler) not in seen:
        if getattr(sampler, "dependent_samples", False):
            return True
        seen.add(id(sampler))
        sampler = getattr(sampler, "func", None) or getattr(sampler, "__wrapped__", None)
    return False


def _has_paired_draws(eps: object) -> bool:
    """Whether two of the K draws along dim 0 are exact mirrors (eps_j = -eps_k) or repeats.

    Independent continuous draws never are; antithetic samplers are by construction, whatever
    wraps them and whichever draws they pair. Candidate pairs come from the first few entries
    of each draw, then the whole draws are compared.
    """
    if not isinstance(eps, Tensor) or eps.dim() == 0 or eps.shape[0] < 2 or eps.numel() == 0:
        return False
    flat = eps.detach().reshape(eps.shape[0], -1)
    signature = flat[:, :8].abs()  # [K, <=8]: equal for a mirror pair and for a repeat
    same = (signature[:, None] == signature[None, :]).all(-1).triu(diagonal=1)
    first, second = same.nonzero(as_tuple=True)
    if first.numel() == 0:
        return False
    a, b = flat[first], flat[second]
    return bool(((a == b).all(-1) | (a == -b).all(-1)).any())


def _independent_noise(
    noise: Tensor | NoiseSampler | None, estimator: Estimator
) -> Tensor | NoiseSampler | None:
    """``noise``, refused or checked at each draw when ``estimator`` needs independent draws.

    Tensors are the caller's exact draws (a replay) and pass unchecked; the default sampler
    draws independently. A sampler is refused when it is marked (or wraps a marked one), and
    otherwise checked at every draw, since a lambda around :func:`antithetic_noise` carries no
    marker: mirrored or repeated draws raise.
    """
    if not estimator.needs_independent_samples or noise is None or isinstance(noise, Tensor):
        return noise
    needs = f"estimator '{estimator.name}' needs independent samples (the DReG identity)"
    fix = "use noise=None or a fully reparameterized estimator"
    if _marked_dependent(noise):
        raise ValueError(f"{needs}; antithetic noise biases it: {fix}")

    def checked(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        eps = noise(shape, dtype, device)
        if _has_paired_draws(eps):
            raise ValueError(
                f"{needs}; the noise sampler drew mirrored (antithetic) or repeated samples, "
                f"which bias it: {fix}"
            )
        return eps

    return checked


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
        hint = (
            "; a hierarchical proposal (a list of layers) goes to monte_carlo_objective or "
            "make_hierarchical_particles"
            if isinstance(proposal, list | tuple)
            else ""
        )
        raise TypeError(
            f"proposal must be a torch.distributions.Distribution, got "
            f"{type(proposal).__name__}{hint}"
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


def _check_num_samples(num_samples: object) -> None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r}: K must be an integer >= 1")


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


def _log_joint_on_alias(
    z: Tensor, log_joint: LogJoint, expected: tuple[int, ...], event: list[int]
) -> tuple[Tensor, Tensor]:
    """``(z_for_p, log_p)``: log p(x, z) computed from a distinct alias of z (where
    :func:`~dreg.estimators.routed_loss` hooks its rescaling), checked to be ``[K, B]``."""
    z_for_p = z.view_as(z)  # a distinct autograd node: the routing hook goes here
    log_p = log_joint(z_for_p)
    if not isinstance(log_p, Tensor) or tuple(log_p.shape) != tuple(expected):
        got = list(log_p.shape) if isinstance(log_p, Tensor) else type(log_p).__name__
        raise ValueError(
            f"log_joint returned {got} for z of shape {list(z.shape)}; it must return log p(x, z) "
            f"of shape [K, B] = {list(expected)}, summed over the event dims {event}"
        )
    return z_for_p, log_p


def _path_and_score_log_q(
    proposal: Distribution, rule: ProposalRule, z: Tensor
) -> tuple[Tensor, Tensor]:
    """``(log q(z; stop(phi)), log q(stop(z); phi))``, each ``[K, B]``, for a proposal whose
    inputs carry no gradient (stopping its tensors is then stopping its parameters)."""
    diagonal = _diagonal_normal(proposal)
    if diagonal is not None:
        # No distribution objects on the VAE's hot path: the densities straight from (loc, scale).
        loc, scale, event_ndims = diagonal
        log_q_stopped = diagonal_normal_log_prob(z, loc.detach(), scale.detach(), event_ndims)
        log_q_stop_z = diagonal_normal_log_prob(z.detach(), loc, scale, event_ndims)
        return log_q_stopped, log_q_stop_z
    return rule.stop(proposal).log_prob(z), proposal.log_prob(z.detach())


def _log_prob(proposal: Distribution, z: Tensor) -> Tensor:
    """log q(z), from (loc, scale) directly for diagonal Gaussians."""
    diagonal = _diagonal_normal(proposal)
    if diagonal is not None:
        return diagonal_normal_log_prob(z, *diagonal)
    return proposal.log_prob(z)


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
    _check_num_samples(num_samples)
    z = _draw(proposal, rule, num_samples, noise)  # [K, B, *event]
    expected = (num_samples, *proposal.batch_shape)
    z_for_p, log_p = _log_joint_on_alias(z, log_joint, expected, list(proposal.event_shape))
    log_q_stopped, log_q_stop_z = _path_and_score_log_q(proposal, rule, z)
    return Particles(
        log_p=log_p, log_q_stopped=log_q_stopped, log_q_stop_z=log_q_stop_z, z_for_p=z_for_p
    )


def particles_from_draws(
    z: Tensor, log_q_stopped: Tensor, log_q_stop_z: Tensor, log_joint: LogJoint
) -> Particles:
    """Particles from samples that a model drew itself, with its own two log q's.

    For proposals a model builds by hand (``dreg.hierarchical.TwoLayerVAE.propose`` stops its
    layers' parameters itself): what is left is the alias of z that feeds log p, where
    :func:`~dreg.estimators.routed_loss` hooks its rescaling, and the shape checks.

    :param z: ``[K, B, *event]`` reparameterized samples, still on their path to phi.
    :param log_q_stopped: ``[K, B]`` log q(z; stop(phi)) with z live (the path term).
    :param log_q_stop_z: ``[K, B]`` log q(stop(z); phi) (the score term).
    :param log_joint: ``z [K, B, *event] -> log p(x, z) [K, B]``.
    """
    if not isinstance(z, Tensor) or z.dim() < 2:
        got = list(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(f"z must be a tensor [K, B, *event] of samples, got {got}")
    expected = tuple(z.shape[:2])
    for name, value in (("log_q_stopped", log_q_stopped), ("log_q_stop_z", log_q_stop_z)):
        if not isinstance(value, Tensor) or tuple(value.shape) != expected:
            got = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{name} is {got}; it must be [K, B] = {list(expected)}, as z's")
    z_for_p, log_p = _log_joint_on_alias(z, log_joint, expected, list(z.shape[2:]))
    return Particles(
        log_p=log_p, log_q_stopped=log_q_stopped, log_q_stop_z=log_q_stop_z, z_for_p=z_for_p
    )


# -- hierarchical proposals (generalized DReG) ----------------------------------------------------
class _CallWithOwner(nn.Module):
    """``layer(z_prev)`` as the forward of a module whose one submodule is ``owner``: what
    ``functional_call`` needs to swap owner's parameters during a call of any callable."""

    def __init__(self, owner: nn.Module, layer: Layer) -> None:
        super().__init__()
        self.owner = owner
        self._layer = (layer,)  # a tuple: never registered as a second path to the parameters

    def forward(self, z_prev: Tensor) -> Distribution:
        return self._layer[0](z_prev)


class HierarchicalProposal:
    """q(z_1 | x) q(z_2 | z_1) ... q(z_L | z_{L-1}) as a chain of layer factories.

    Generalized DReG (Bauer & Mnih 2021) differentiates log w through the whole sampling path
    with the proposal's parameters phi stopped, z_1 included where it conditions z_2::

        log_q_stopped = log q(z_1; stop phi) + sum_i log q(z_i | z_{i-1}; stop phi)    z live
        log_q_stop_z  = log q(stop z_1; phi) + sum_i log q(stop z_i | stop z_{i-1}; phi)

    A conditional layer's parameters cannot be stopped by detaching its output tensors
    mu_i(z_{i-1}), sigma_i(z_{i-1}): that also cuts z_{i-1} out of log q(z_i | z_{i-1}) (the
    biased "naive" form). So each conditional layer is evaluated once more with its parameters
    detached (``torch.func.functional_call``) and z_{i-1} live. That fixes the contract:

    * ``layers[0]()`` returns q(z_1 | x), batch shape ``[B]`` (bind x in a closure,
      ``lambda: encoder(x)``). Nothing it depends on is latent, so detaching its tensors is
      exactly stopping its parameters: it may be any callable.
    * ``layers[i](z_prev)``, i >= 1, returns q(z_{i+1} | z_i) for z_prev = z_i
      ``[K, B, *event_i]``, with batch shape ``[K, B]`` (or ``[B]`` if it ignores z_prev).
    * Every parameter a conditional layer uses belongs to ``module`` (default: the layer
      itself, which must then be an ``nn.Module``) and is read inside the call, where it is
      swapped for a detached copy. A tensor computed outside the call (features of x from a
      shared trunk, say) cannot be stopped: the stopped densities are checked, and a layer that
      still reaches a tensor requiring grad other than through z raises ``ValueError``.
    * Layers are Gaussian with standard-normal noise: ``Normal``, ``Independent(Normal)``,
      ``MultivariateNormal``, ``LowRankMultivariateNormal``.

    :param layers: the L factories, in sampling order.
    :param module: the ``nn.Module`` owning every parameter of the conditional layers, when they
        are plain functions or closures; ``None`` when each conditional layer is an ``nn.Module``.
    """

    def __init__(self, layers: Sequence[Layer], module: nn.Module | None = None) -> None:
        if not isinstance(layers, list | tuple) or not layers:
            raise ValueError(
                "a hierarchical proposal needs a non-empty list of layers: "
                "[() -> q(z_1 | x), z_1 -> q(z_2 | z_1), ...]"
            )
        for index, layer in enumerate(layers, start=1):
            if not callable(layer):
                raise TypeError(
                    f"layer {index} is a {type(layer).__name__}, not a factory: each layer is a "
                    f"callable returning its distribution (() -> q(z_1 | x), then "
                    f"z_prev -> q(z_i | z_prev))"
                )
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(
                f"module must be the nn.Module that owns the layers' parameters, got "
                f"{type(module).__name__}"
            )
        for index, layer in enumerate(layers[1:], start=2):
            if module is None and not isinstance(layer, nn.Module):
                raise TypeError(
                    f"layer {index} is a {type(layer).__name__}, not an nn.Module: its "
                    f"parameters must be stopped, so make it an nn.Module or pass module=<the "
                    f"nn.Module that owns every parameter the layers use>"
                )
        self.layers = tuple(layers)
        self.module = module
        self._wrapped = [
            None if module is None or layer is module else _CallWithOwner(module, layer)
            for layer in self.layers
        ]

    def stopped(self, index: int, z_prev: Tensor) -> Distribution:
        """Conditional layer ``index`` (0-based, >= 1) at ``z_prev`` with its parameters
        detached: the distribution q(z_{index+1} | z_prev; stop(phi)), z_prev still live."""
        owner = self.module if self.module is not None else self.layers[index]
        detached = {name: p.detach() for name, p in owner.named_parameters()}
        wrapped = self._wrapped[index]
        if wrapped is None:
            return functional_call(owner, detached, (z_prev,))
        return functional_call(wrapped, {f"owner.{n}": t for n, t in detached.items()}, (z_prev,))


def _check_layer(
    q: object, index: int, num_samples: int, batch: int | None
) -> tuple[ProposalRule, int]:
    """``(rule, B)`` of layer ``index``'s distribution ``q``; one-line errors otherwise."""
    name = f"layer {index + 1} of the hierarchical proposal"
    if not isinstance(q, Distribution):
        raise TypeError(f"{name} returned a {type(q).__name__}, not a torch Distribution")
    try:
        rule = _rule(q)
    except TypeError:
        rule = None
    if rule is None or rule.noise_shape is None or not q.has_rsample:
        raise TypeError(
            f"{name} is a {type(q).__name__}: layers must be Gaussian with standard-normal "
            f"noise (Normal, Independent(Normal), MultivariateNormal, LowRankMultivariateNormal)"
        )
    shape = tuple(q.batch_shape)
    if batch is None:
        if len(shape) != 1:
            raise ValueError(
                f"{name} has batch shape {list(shape)}; it must be [B] (one q(z_1 | x_b) per "
                f"data point): wrap it in Independent to make the other dims part of the event"
            )
        return rule, shape[0]
    if shape not in ((num_samples, batch), (batch,)):
        raise ValueError(
            f"{name} has batch shape {list(shape)}; it must be [K, B] = {[num_samples, batch]} "
            f"(one q(z_{index + 1} | z_{index}) per sample) or [B] = {[batch]}"
        )
    return rule, batch


class _LayerNoise:
    """Each layer's standard-normal noise in turn, from the ``noise`` argument of
    :func:`make_hierarchical_particles`."""

    def __init__(self, noise: Tensor | NoiseSampler | None, num_samples: int) -> None:
        if isinstance(noise, Tensor) and (noise.dim() != 3 or noise.shape[0] != num_samples):
            raise ValueError(
                f"noise has shape {list(noise.shape)}; a hierarchical proposal takes "
                f"[K, B, N] with K={num_samples}: every layer's noise, flattened, concatenated "
                f"along the last dim"
            )
        self.noise, self.used = noise, 0

    def take(self, index: int, shape: torch.Size, like: Tensor) -> Tensor:
        """``shape`` = ``[K, B, *noise event]`` draws for layer ``index``."""
        if not isinstance(self.noise, Tensor):
            eps = (self.noise or standard_normal_noise)(shape, like.dtype, like.device)
            if not isinstance(eps, Tensor) or eps.shape != shape:
                got = list(eps.shape) if isinstance(eps, Tensor) else type(eps).__name__
                raise ValueError(
                    f"the noise sampler returned {got} for layer {index + 1}, which needs "
                    f"{list(shape)} standard-normal draws"
                )
            return eps
        size = math.prod(shape[2:])
        left = self.noise.shape[2] - self.used
        if self.noise.shape[:2] != shape[:2] or size > left:
            raise ValueError(
                f"noise has shape {list(self.noise.shape)}; layer {index + 1} needs [K, B] = "
                f"{list(shape[:2])} and {size} draws per sample after the {self.used} of the "
                f"layers before it: pass every layer's noise, flattened, concatenated along "
                f"the last dim"
            )
        eps = self.noise[..., self.used : self.used + size].reshape(shape)
        self.used += size
        return eps

    def finish(self) -> None:
        if isinstance(self.noise, Tensor) and self.used != self.noise.shape[2]:
            raise ValueError(
                f"noise has {self.noise.shape[2]} draws per sample; the layers use {self.used}"
            )


def make_hierarchical_particles(
    proposal: HierarchicalProposal | Sequence[Layer],
    log_joint: LogJoint,
    num_samples: int,
    noise: Tensor | NoiseSampler | None = None,
) -> Particles:
    """Particles of a hierarchical proposal, with the generalized DReG log-densities.

    z_1 ~ q(z_1 | x), z_i ~ q(z_i | z_{i-1}), each z_i = g_i(eps_i; z_{i-1}, phi); then
    ``log_q_stopped`` = sum_i log q(z_i | z_{i-1}; stop phi) with every z live, and
    ``log_q_stop_z`` = sum_i log q(stop z_i | stop z_{i-1}; phi) (Bauer & Mnih 2021; see
    :class:`HierarchicalProposal`). The estimators and routed_loss then need no change: the
    path coefficient a_k multiplies d/dphi [log p(x, z(phi)) - log q(z(phi); stop phi)].

    :param proposal: a :class:`HierarchicalProposal`, or its list of layers (then every
        conditional layer must be an ``nn.Module``).
    :param log_joint: ``z [K, B, D] -> log p(x, z) [K, B]`` with z = ``cat([z_1, z_2, ...], -1)``
        (each z_i flattened over its event dims), D = D_1 + D_2 + ...: split it with
        ``z.split([D_1, D_2, ...], -1)``.
    :param num_samples: K.
    :param noise: ``None`` (independent N(0, I)), a :data:`NoiseSampler` (called once per layer
        with shape ``[K, B, *noise shape of the layer]``), or a tensor ``[K, B, N]``: every
        layer's noise, flattened, concatenated along the last dim in layer order (N = D_1 + D_2
        + ... for diagonal and full-covariance layers).
    """
    if not isinstance(proposal, HierarchicalProposal):
        proposal = HierarchicalProposal(proposal)
    _check_num_samples(num_samples)
    draws = _LayerNoise(noise, num_samples)
    batch, z_prev, flat_z, stopped_terms, score_terms = None, None, [], [], []
    for index, layer in enumerate(proposal.layers):
        q = layer() if index == 0 else layer(z_prev)
        rule, batch = _check_layer(q, index, num_samples, batch)
        noise_event = rule.noise_shape(q)[len(q.batch_shape) :]
        eps = draws.take(index, torch.Size((num_samples, batch, *noise_event)), q.mean)
        z = rule.reparameterize(q, eps)  # [K, B, *event]
        if index == 0:
            stopped, score = _path_and_score_log_q(q, rule, z)
        else:
            stopped = _log_prob(proposal.stopped(index, z_prev), z)  # phi stopped, z_prev live
            if unstopped := leaves_reached(stopped, [z_prev, z]):
                raise ValueError(
                    f"layer {index + 1} of the hierarchical proposal still depends on "
                    f"{len(unstopped)} tensor(s) that require grad "
                    f"({tensor_shapes(unstopped)}) with "
                    f"its parameters stopped: pass module=<the nn.Module owning every parameter "
                    f"the layers use>, and compute the layer from them inside the call"
                )
            score = _log_prob(layer(z_prev.detach()), z.detach())  # phi live, z fixed
        stopped_terms.append(stopped)
        score_terms.append(score)
        flat_z.append(z.reshape(num_samples, batch, -1))
        z_prev = z
    draws.finish()
    z = torch.cat(flat_z, dim=-1) if len(flat_z) > 1 else flat_z[0]
    z_for_p, log_p = _log_joint_on_alias(z, log_joint, (num_samples, batch), [z.shape[-1]])
    return Particles(
        log_p=log_p,
        log_q_stopped=sum(stopped_terms[1:], stopped_terms[0]),
        log_q_stop_z=sum(score_terms[1:], score_terms[0]),
        z_for_p=z_for_p,
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
    proposal: Distribution | HierarchicalProposal | Sequence[Layer],
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

    :param proposal: q(z | x), reparameterizable, batch shape ``[B]`` (see :func:`make_particles`),
        or a hierarchical proposal q(z_1 | x) q(z_2 | z_1) ...: a :class:`HierarchicalProposal`
        or its list of layers (generalized DReG, see :func:`make_hierarchical_particles`).
    :param log_joint: ``z [K, B, *event] -> log p(x, z) [K, B]`` (hierarchical: z is
        ``cat([z_1, z_2, ...], -1)``).
    :param num_samples: K.
    :param estimator: a config name (``conf/estimator/*.yaml``: ``iwae``, ``dreg_iwae``,
        ``dreg_rws``, ...) or an :class:`~dreg.estimators.Estimator`. Estimators with learned
        parameters (``dreg_cv``) must be passed as an object whose parameters you optimize.
    :param noise: see :func:`make_particles`. A sampler of dependent draws (antithetic
        pairs, also wrapped in a ``partial`` or a lambda) is refused for DReG estimators.
    :param train_model: ``False`` when theta is frozen (only the inference gradient matters);
        every parameter of ``log_joint`` must then have ``requires_grad=False``.
    """
    estimator = _resolve_estimator(estimator)
    if isinstance(num_samples, int) and num_samples < estimator.min_samples:
        raise ValueError(
            f"estimator '{estimator.name}' needs num_samples >= {estimator.min_samples}, "
            f"got {num_samples}"
        )
    if isinstance(num_samples, int):
        estimator.validate_num_samples(num_samples)  # its own rules (e.g. MIWAE's groups)
    noise = _independent_noise(noise, estimator)
    if isinstance(proposal, HierarchicalProposal | list | tuple):
        particles = make_hierarchical_particles(proposal, log_joint, num_samples, noise)
    else:
        particles = make_particles(proposal, log_joint, num_samples, noise)
    weights = estimator(particles.log_w)
    loss = routed_loss(particles, weights, train_model=train_model)
    return ObjectiveResult(loss, weights.objective, particles, weights)
