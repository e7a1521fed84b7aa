"""The two parameter groups of the VAE and their flattened gradients.

``model`` = decoder and prior (theta), ``inference`` = encoder (phi). The diagnostics and the
gradient-statistics callbacks read an estimator's gradient per group from
``torch.autograd.grad`` of the two surrogate losses of
:func:`dreg.estimators.surrogate_losses`, each on its own group: ``.grad`` is never touched, so
nothing interferes with training or with DDP's reducer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from dreg.estimators import GradientWeights, Particles, surrogate_losses
from dreg.model import VAE

GROUPS = ("model", "inference")


def group_parameters(net: VAE, group: str) -> tuple[list[str], list[nn.Parameter]]:
    """Names and parameters of ``group`` (``model``: decoder+prior, ``inference``: encoder)."""
    params = net.model_parameters() if group == "model" else net.inference_parameters()
    names = {id(p): n for n, p in net.named_parameters()}
    return [names[id(p)] for p in params], params


def tensor_slices(params: Sequence[Tensor]) -> list[slice]:
    """Where each tensor sits in the flattened concatenation of ``params``."""
    bounds = np.cumsum([0] + [p.numel() for p in params])
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def flat_gradient(loss: Tensor, params: Sequence[Tensor], retain_graph: bool = True) -> Tensor:
    """``[D]`` gradient of ``loss`` wrt ``params``, flattened; zeros where a tensor is unused."""
    grads = torch.autograd.grad(loss, list(params), retain_graph=retain_graph, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
    return torch.cat([g.flatten() for g in grads])


def group_gradients(
    particles: Particles,
    weights: GradientWeights,
    params: dict[str, Sequence[Tensor]],
) -> dict[str, Tensor]:
    """The estimator's flattened gradient of each group in ``params`` (model / inference)."""
    losses = dict(zip(GROUPS, surrogate_losses(particles, weights), strict=True))
    return {group: flat_gradient(losses[group], ps) for group, ps in params.items()}
