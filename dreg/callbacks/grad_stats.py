"""Variance and SNR of the training gradient along the trajectory (EMA moments).

After Lightning's backward (and, under DDP, the gradient all-reduce), ``p.grad`` holds the
gradient the optimizer is about to apply: the estimator's gradient of the *global* batch.
Before each optimizer step this callback folds the flattened model gradient (decoder+prior)
and inference gradient (encoder) into exponential moving averages of g and g^2 (decay 0.99,
as in Tucker et al. 2019) and logs, every ``log_every_n_steps`` steps::

    grad/{model,inference}/variance   mean over coordinates of EMA(g^2) - EMA(g)^2
    grad/{model,inference}/snr        mean EMA(g)^2 / mean variance

and with ``per_tensor: true`` the same per parameter tensor
(``grad/inference/encoder.net.0.weight/snr``). A net with several stochastic layers
(``net.layer_parameters()``, :class:`dreg.hierarchical.TwoLayerVAE`) also gets the inference
statistics restricted to each layer's parameters (:mod:`dreg.diagnostics.layers`)::

    grad/inference_layer1/{variance,snr}    q(z1 | x)
    grad/inference_layer2/{variance,snr}    q(z2 | z1)

read from the same moving averages (coordinates of the inference group), so they need no
state of their own. Because p.grad is already identical on every
rank, no further communication is needed; only rank 0's loggers write.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.optim import Optimizer

from dreg.diagnostics.layers import layer_indices
from dreg.diagnostics.moments import EMAMoments
from dreg.gradients import GROUPS, group_parameters, tensor_slices


class GradientStatistics(pl.Callback):
    """EMA variance and SNR of the applied model and inference gradients.

    :param decay: EMA decay d (weight of the past), 0.99 by default.
    :param log_every_n_steps: log interval in optimizer steps.
    :param per_tensor: also log the statistics of every parameter tensor.
    """

    def __init__(
        self, decay: float = 0.99, log_every_n_steps: int = 100, per_tensor: bool = False
    ) -> None:
        super().__init__()
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.decay, self.log_every_n_steps, self.per_tensor = decay, log_every_n_steps, per_tensor
        self.ema = {group: EMAMoments(decay) for group in GROUPS}
        self.last_metrics: dict[str, float] = {}

    # Saved in checkpoints, so a resumed run continues the same moving averages.
    def state_dict(self) -> dict:
        return {group: ema.state_dict() for group, ema in self.ema.items()}

    def load_state_dict(self, state: dict) -> None:
        for group, ema_state in state.items():
            self.ema[group].load_state_dict(ema_state)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        step = trainer.global_step + 1  # the step this update completes (Lightning's log step)
        due = step % self.log_every_n_steps == 0
        metrics: dict[str, float] = {}
        for group in GROUPS:
            names, params = group_parameters(pl_module.net, group)
            if all(p.grad is None for p in params):
                continue  # a frozen group (train_model=false)
            flat = torch.cat([
                (torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in params
            ])  # fmt: skip
            ema = self.ema[group]
            ema.update(flat)
            if not due:
                continue
            summary = ema.summary()
            metrics[f"grad/{group}/variance"] = summary.variance
            metrics[f"grad/{group}/snr"] = summary.snr
            if self.per_tensor:
                for name, index in zip(names, tensor_slices(params), strict=True):
                    summary = ema.summary(index)
                    metrics[f"grad/{group}/{name}/variance"] = summary.variance
                    metrics[f"grad/{group}/{name}/snr"] = summary.snr
            if group == "inference":
                for layer, index in layer_indices(pl_module.net, params, flat.device).items():
                    summary = ema.summary(index)
                    metrics[f"grad/{layer}/variance"] = summary.variance
                    metrics[f"grad/{layer}/snr"] = summary.snr
        if metrics:
            self.last_metrics = metrics
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)  # rank-zero-only in every PL logger
