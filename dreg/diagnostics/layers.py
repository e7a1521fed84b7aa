"""The inference gradient per stochastic layer, for nets with ``layer_parameters()``.

A net with several stochastic layers (:class:`dreg.hierarchical.TwoLayerVAE`) names the
inference parameters of each layer (``layer1`` = q(z1 | x), ``layer2`` = q(z2 | z1)). The
diagnostics keep their statistics on the flattened gradient of the whole inference group and
read each layer's coordinates out of it, under the group name ``inference_<layer>``
(``grad/inference_layer1/snr``). Per layer, because an estimator can be right in one layer and
wrong in another: DReG with the proposal's *tensors* detached drops d log q(z2 | z1) / d z1,
which reaches phi through z1 only, so only layer 1's gradient is biased (Bauer & Mnih 2021).
A one-layer net has no ``layer_parameters`` and gets no per-layer statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dreg.gradients import tensor_slices


def layer_indices(
    net: nn.Module, params: Sequence[Tensor], device: torch.device | str = "cpu"
) -> dict[str, Tensor]:
    """``{"inference_<layer>": coordinates}``: where each stochastic layer's inference
    parameters sit in the flattened concatenation of ``params`` (the inference group, as
    :func:`dreg.gradients.group_parameters` orders it). Empty for a net without layers."""
    if not hasattr(net, "layer_parameters"):
        return {}
    where = {id(p): sl for p, sl in zip(params, tensor_slices(params), strict=True)}
    indices = {}
    for layer, layer_params in net.layer_parameters().items():
        missing = [p.shape for p in layer_params if id(p) not in where]
        if missing:
            raise ValueError(
                f"net.layer_parameters()['{layer}'] has tensors of shapes {missing} that are not "
                "inference parameters; a layer must list parameters of inference_parameters()"
            )
        ranges = [torch.arange(where[id(p)].start, where[id(p)].stop) for p in layer_params]
        indices[f"inference_{layer}"] = torch.cat(ranges).to(device)
    return indices
