"""From estimator coefficients to parameter gradients, with one forward and one backward.

The model pass produces :class:`Particles`; an estimator turns ``particles.log_w`` into
:class:`~dreg.estimators.base.GradientWeights` ``(m, a, s)``. Each parameter group must get
its own gradient::

    model (theta)      sum_k m_k d/dtheta log p(x, z_k)
    inference (phi)    sum_k a_k [d/dz log p(x, z_k) - d/dz log q(z_k; stop phi)] dz_k/dphi
                     + sum_k s_k [-d/dphi log q(stop z_k; phi)]

:func:`routed_loss` builds one scalar whose single ``backward()`` gives exactly that. The
decoder sees log p with coefficient m_k. The same backward would send m_k * d log p/dz down
the reparameterization path, so a gradient hook on ``z_for_p`` (the copy of z that feeds
log p) rescales that path per sample by a_k / m_k. A second ``backward()`` per forward would
double the cost and breaks DDP ("marked as ready twice", pytorch#105723).

:func:`surrogate_losses` gives the two losses separately (one autograd graph each); tests use
them as the reference that the routed gradients must equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dreg.estimators.base import GradientWeights


@dataclass
class Particles:
    """One model pass over a batch with K samples per data point.

    :ivar log_p: ``[K, B]`` log p(x, z_k) (or log p(x, z_k | c)), computed from ``z_for_p``.
    :ivar log_q_stopped: ``[K, B]`` log q(z_k; stop(mu), stop(sigma)): z keeps its path.
    :ivar log_q_stop_z: ``[K, B]`` log q(stop(z_k); mu, sigma): the direct (score) term;
        ``None`` when the estimator has no score term (``Estimator.uses_score`` false: its
        score coefficients are zero by construction), so that its graph is never built.
    :ivar z_for_p: ``[K, B, *event]`` the alias of z that feeds log p; the routing hook sits
        here. Models build Particles with :func:`dreg.library.make_particles`.
    :ivar routed: set by :func:`routed_loss` when it registers its hook on ``z_for_p``; a
        second hook would rescale the path gradient twice, so a second call is refused.
    """

    log_p: Tensor
    log_q_stopped: Tensor
    log_q_stop_z: Tensor | None
    z_for_p: Tensor
    routed: bool = field(default=False, init=False, repr=False, compare=False)

    @property
    def log_w(self) -> Tensor:
        """``[K, B]`` detached log-weights log p(x, z_k) - log q(z_k | x)."""
        return (self.log_p - self.log_q_stopped).detach()

    @property
    def num_samples(self) -> int:
        return self.log_p.shape[0]


def _objective_surrogates(p: Particles, w: GradientWeights) -> tuple[Tensor, Tensor]:
    """Per-data-point surrogates ``[B]`` whose gradients are the model / inference gradients."""
    model_term = (w.model * p.log_p).sum(0)
    inference = w.path * (p.log_p - p.log_q_stopped)
    if p.log_q_stop_z is not None:
        inference = inference - w.score * p.log_q_stop_z
    return model_term, inference.sum(0)


def surrogate_losses(particles: Particles, weights: GradientWeights) -> tuple[Tensor, Tensor]:
    """``(model_loss, inference_loss)``: differentiate each on its own parameter group only.

    The reference semantics of an estimator (used by tests and diagnostics). Both losses are
    batch means of negated surrogates, so gradients point downhill for the optimizer.
    """
    model_term, inference_term = _objective_surrogates(particles, weights)
    return -model_term.mean(), -inference_term.mean()


def routed_loss(particles: Particles, weights: GradientWeights, train_model: bool = True) -> Tensor:
    """One scalar whose single backward gives each parameter group its own gradient.

    Decoder/prior parameters receive ``grad(model_loss)``, encoder parameters
    ``grad(inference_loss)`` of :func:`surrogate_losses`. Registers a gradient hook on
    ``particles.z_for_p``: call once per forward pass (a second call raises ``ValueError``:
    hooks accumulate, so the path gradient would be rescaled by (a_k / m_k)^2).

    :param train_model: ``False`` when the decoder is frozen: then only the inference
        gradient matters and the model coefficients are replaced by ones.

    Without a score term (``particles.log_q_stop_z`` is ``None``: the estimator's score
    coefficients are zero by construction) the loss has no such term, and its graph is not
    built. The path rescaling is a tensor hook on ``z_for_p``; the same function runs
    eagerly, in a captured CUDA graph and under ``torch.compile`` (Dynamo traces the hook
    into the compiled backward), so the routing has this one definition.
    """
    path = weights.path
    if train_model:
        # Keep m_k away from exact zero so the ratio a_k / m_k is finite. The decoder then
        # sees at most sqrt(tiny) ~ 1e-19 (float32) extra weight on a sample whose weight
        # underflowed, far below float resolution of the summed gradient.
        floor = torch.finfo(weights.model.dtype).tiny ** 0.5
        model = torch.where(weights.model.abs() < floor, floor, weights.model)
    else:
        if not torch.compiler.is_compiling():  # a walk of the graph: eager only
            check_model_frozen(particles)  # the ones would silently train a live decoder
        model = torch.ones_like(path)
    if particles.z_for_p.requires_grad:
        if particles.routed:
            raise ValueError(
                "routed_loss was already called on these Particles: its gradient hook on "
                "z_for_p would rescale the path gradient a second time; build new Particles "
                "(another model pass) for each routed loss, or use surrogate_losses to compare "
                "several estimators on one pass"
            )
        particles.routed = True
        # [K, B, 1, ...]: one factor per sample, broadcast over z's event dims (any number).
        event_dims = (1,) * (particles.z_for_p.dim() - path.dim())
        ratio = (path / model).reshape(*path.shape, *event_dims)
        particles.z_for_p.register_hook(lambda grad: grad * ratio)
    log_q_terms = path * particles.log_q_stopped
    if particles.log_q_stop_z is not None:
        log_q_terms = log_q_terms + weights.score * particles.log_q_stop_z
    # The mean over the batch as sum / B: mean()'s own arithmetic, in fewer operators.
    loss = -((model * particles.log_p).sum(0) - log_q_terms.sum(0)).sum() / path.shape[1]
    if weights.aux_loss is not None:
        loss = loss + weights.aux_loss
    return loss


def leaves_reached(root: Tensor, stop_at: Sequence[Tensor]) -> list[Tensor]:
    """Tensors that require grad which ``root`` depends on other than through ``stop_at``.

    A walk of ``root``'s autograd graph that does not enter the nodes producing ``stop_at``,
    collecting the leaves it meets (``AccumulateGrad`` nodes: parameters, leaf inputs).
    """
    if root.grad_fn is None:
        return [root] if root.requires_grad else []
    stops = {t.grad_fn for t in stop_at if t.grad_fn is not None}
    todo, seen, leaves = [root.grad_fn], set(), []
    while todo:
        node = todo.pop()
        if node is None or node in seen or node in stops:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.append(variable)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def tensor_shapes(tensors: Sequence[Tensor], limit: int = 4) -> str:
    """``[3, 4], [4], ...``: the shapes of the first ``limit`` tensors, for messages."""
    listed = ", ".join(str(list(t.shape)) for t in tensors[:limit])
    return listed + (", ..." if len(tensors) > limit else "")


def check_model_frozen(particles: Particles) -> None:
    """With ``train_model=False`` the model coefficients are replaced by ones, so a parameter
    of log p that still requires grad would get sum_k d/dtheta log p(x, z_k): no estimator's
    gradient, silently. Refuse it: log p may reach tensors requiring grad only through z."""
    if reached := leaves_reached(particles.log_p, [particles.z_for_p]):
        raise ValueError(
            f"train_model=False, but log_joint depends on {len(reached)} tensor(s) that require "
            f"grad other than through z ({tensor_shapes(reached)}): they would get sum_k "
            "d/dtheta log p, no estimator's gradient; freeze them with requires_grad_(False), "
            "or pass train_model=True"
        )
