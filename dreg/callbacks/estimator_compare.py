"""Other estimators' inference gradients on the training batch and samples (``var_calc``).

Tucker et al. (2019) compare estimators along *one* trajectory: at every step, the gradients
that IWAE, STL and DReG would give on the same batch and the same latent samples as the
training step, none of them applied. This callback replays the training step's forward
pass: before the optimizer step it calls ``net.particles`` again with the step's binarized
batch and latent noise (``step_inputs``, kept by the module). Each listed
estimator's inference gradient then comes from ``torch.autograd.grad`` of its surrogate
(``.grad`` and DDP's reducer are untouched), is averaged over ranks (the global-batch
gradient, like the p.grad that :class:`~dreg.callbacks.GradientStatistics` sees) and folded
into EMA moments. Logged every ``log_every_n_steps`` steps::

    grad/compare/<name>/inference/variance, grad/compare/<name>/inference/snr
    grad/compare/<name>/inference_layer1/snr ...   per stochastic layer, for nets that have
                                                   layers (dreg.diagnostics.layers)
    grad/compare/replay_rel_error   |replayed training-estimator gradient - p.grad| / |p.grad|

``replay_rel_error`` (float round-off, ~1e-6) certifies that the replay saw the training
step's samples and that the cross-rank average matches DDP's.
Cost per step: one forward and one backward per listed estimator, plus one for the check.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.optim import Optimizer

from dreg.diagnostics.layers import layer_indices
from dreg.diagnostics.moments import EMAMoments
from dreg.estimators import Estimator, estimator_by_name, surrogate_losses
from dreg.gradients import flat_gradient, group_parameters


class EstimatorComparison(pl.Callback):
    """EMA variance and SNR of the inference gradients of ``estimators`` along the trajectory.

    :param estimators: names of ``conf/estimator/*.yaml`` to compare (e.g. iwae, stl, dreg_iwae).
    :param decay: EMA decay d, 0.99 by default.
    :param log_every_n_steps: log interval in optimizer steps.
    """

    def __init__(
        self, estimators: Sequence[str], decay: float = 0.99, log_every_n_steps: int = 100
    ) -> None:
        super().__init__()
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.names, self.decay, self.log_every_n_steps = list(estimators), decay, log_every_n_steps
        self.ema = {name: EMAMoments(decay) for name in self.names}
        self.estimators: list[Estimator] = []
        self.last_metrics: dict[str, float] = {}

    def state_dict(self) -> dict:
        # Saved in checkpoints, so a resumed run continues the same moving averages.
        return {name: ema.state_dict() for name, ema in self.ema.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, ema_state in state.items():
            if name in self.ema:
                self.ema[name].load_state_dict(ema_state)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.estimators = [estimator_by_name(name) for name in self.names]
        for estimator in self.estimators:  # fail at set-up, not at the first logged step
            estimator.validate_num_samples(pl_module.num_samples)

    @staticmethod
    def _replay_particles(pl_module: pl.LightningModule):
        """The step's particles again: its binarized batch and its latent noise
        (``pl_module.step_inputs``, set by :mod:`dreg.step` before this hook)."""
        x, context, eps = pl_module.step_inputs
        return pl_module.net.particles(x, pl_module.num_samples, context, noise=eps)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        _, params = group_parameters(pl_module.net, "inference")
        particles = self._replay_particles(pl_module)
        grads = []
        for estimator in [pl_module.estimator, *self.estimators]:
            estimator.to(pl_module.device)
            inference_loss = surrogate_losses(particles, estimator(particles.log_w))[1]
            grads.append(flat_gradient(inference_loss, params))
        # [1 + E, D]: average over ranks, giving the global-batch gradients (as DDP does).
        grads = trainer.strategy.reduce(torch.stack(grads), reduce_op="mean")
        for name, grad in zip(self.names, grads[1:], strict=True):
            self.ema[name].update(grad)

        step = trainer.global_step + 1
        if step % self.log_every_n_steps:
            return
        metrics = {"grad/compare/replay_rel_error": self._replay_error(grads[0], params)}
        layers = layer_indices(pl_module.net, params, grads.device)
        for name in self.names:
            for group, index in {"inference": None, **layers}.items():
                summary = self.ema[name].summary(index)
                metrics[f"grad/compare/{name}/{group}/variance"] = summary.variance
                metrics[f"grad/compare/{name}/{group}/snr"] = summary.snr
        self.last_metrics = metrics
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    @staticmethod
    def _replay_error(replayed: Tensor, params: Sequence[Tensor]) -> float:
        applied = torch.cat([
            (torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in params
        ])  # fmt: skip
        return ((replayed - applied).norm() / applied.norm().clamp_min(1e-30)).item()
