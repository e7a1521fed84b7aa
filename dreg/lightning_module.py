"""DReGModule: the VAE trained with a swappable gradient estimator.

One training step = one encoder pass, one decoder pass, one backward. The estimator turns the
log-weights into per-sample coefficients and :func:`routed_loss` turns those into a scalar
whose single backward gives the decoder its model gradient and the encoder its inference
gradient. What is logged is always the estimator's true bound, never a surrogate.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from dreg.datamodules.binarized import Batch
from dreg.errors import NonFiniteError
from dreg.estimators import Estimator, GradientWeights, Particles, routed_loss
from dreg.estimators.ops import iwae_bound
from dreg.model import VAE
from dreg.seeds import derived_seed


class DReGModule(pl.LightningModule):
    """Lightning wrapper: training with an estimator, evaluation of bounds and log-likelihood.

    :param net: the latent-variable model.
    :param estimator: the gradient estimator.
    :param num_samples: K, the importance samples per data point in training.
    :param optimizer: a partial optimizer, called with two parameter groups
        (``model`` then ``inference``).
    :param eval_num_samples: S of the log-likelihood estimate log (1/S sum_s w_s) (5000).
    :param eval_chunk_size: samples drawn at once during evaluation (bounds memory).
    :param antithetic: mirror half of the training noise (eps, -eps).
    :param train_model: ``False`` freezes the decoder and prior (inference-network-only runs).
    :param compile: ``torch.compile`` the encoder and decoder MLPs in place (state-dict keys
        unchanged, so checkpoints move between compiled and eager runs). Worth it on GPUs, where
        a step is launch-bound; on CPU the first step pays ~30-60 s of compilation.
    :param nonfinite: what a non-finite loss or gradient does: ``raise`` (stop, naming the
        step, batch and term; parameters and checkpoints keep their last good values) or
        ``skip`` (drop the update, count it in ``train/skipped_steps``; skipped updates do
        not count towards ``trainer.max_steps``).
    """

    def __init__(
        self,
        net: VAE,
        estimator: Estimator,
        optimizer: Callable[..., torch.optim.Optimizer],
        num_samples: int = 64,
        eval_num_samples: int = 5000,
        eval_chunk_size: int = 500,
        antithetic: bool = False,
        train_model: bool = True,
        compile: bool = False,
        nonfinite: str = "raise",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "estimator", "optimizer"])
        self.net, self.estimator, self.optimizer_factory = net, estimator, optimizer
        self.num_samples = num_samples
        self.eval_num_samples, self.eval_chunk_size = eval_num_samples, eval_chunk_size
        self.antithetic, self.train_model = antithetic, train_model
        self.nonfinite, self.skipped_steps = nonfinite, 0
        # The experiment definition (dreg.records.experiment_config), set by dreg.run and saved
        # in every checkpoint so that a resume can be checked against it.
        self.experiment: dict | None = None
        self._seconds_before, self._segment = 0.0, [None, None]
        self._final_row: dict[str, Tensor] | None = None
        if compile:
            for mlp in (self.net.encoder, self.net.decoder):
                mlp.compile()
        if not train_model:
            for p in self.net.model_parameters():
                p.requires_grad_(False)

    # -- training ----------------------------------------------------------------------------
    def estimate(self, batch: Batch) -> tuple[Particles, GradientWeights]:
        """One model pass and the estimator's coefficients for it."""
        particles = self.net.particles(batch.x, self.num_samples, batch.context, self.antithetic)
        return particles, self.estimator(particles.log_w)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        particles, weights = self.estimate(batch)
        loss = routed_loss(particles, weights, train_model=self.train_model)
        # Tensors, not floats: Lightning reads them only at its logging interval (no sync).
        objective = weights.objective.mean()
        self.log("train/objective", objective, prog_bar=True)
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            # Differs from the objective for vae and jvi; only on steps that reach the logger.
            self.log("train/iwae_bound", iwae_bound(particles.log_w).mean())
            # Label the row with the optimizer steps done after this one, as checkpoints and
            # validation rows are labelled (Lightning would use the steps done before it).
            self.log("step", float(self.global_step + 1))
        elif self.global_step + 1 == self.trainer.max_steps:
            # A run shorter than log_every_n_steps would otherwise log no training curve.
            self._final_row = {
                "train/objective": objective.detach(),
                "train/iwae_bound": iwae_bound(particles.log_w).mean(),
            }
        return loss

    def on_train_batch_end(self, outputs, batch: Batch, batch_idx: int) -> None:
        if self._final_row is not None and self.global_step == self.trainer.max_steps:
            row = {k: float(v) for k, v in self._final_row.items()}
            for logger in self.loggers:
                logger.log_metrics(row, step=self.global_step)
            self._final_row = None

    def setup(self, stage: str) -> None:
        # Every rank was seeded alike, so every rank built the same initial model. From here
        # each rank draws its own noise (latent samples, binarization): rank 0 keeps the run's
        # stream, rank r > 0 switches to one derived from (seed, r). Resume restores each
        # rank's stream (dreg.checkpointing.PreemptionCheckpoint saves them all).
        if stage == "fit" and self.trainer.world_size > 1 and self.global_rank > 0:
            seed = derived_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)), self.global_rank)
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)

    # -- what checkpoints carry besides the weights ----------------------------------------
    def on_train_start(self) -> None:
        self._segment = [time.perf_counter(), None]

    def on_train_end(self) -> None:
        self._segment[1] = time.perf_counter()

    def train_seconds(self) -> float:
        """Wall time spent in training over every segment of the run (resumes included)."""
        start, end = self._segment
        if start is None:
            return self._seconds_before
        return self._seconds_before + (end or time.perf_counter()) - start

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["dreg"] = {"experiment": self.experiment, "train_seconds": self.train_seconds()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._seconds_before = checkpoint.get("dreg", {}).get("train_seconds", 0.0)

    # -- evaluation --------------------------------------------------------------------------
    def _evaluate(self, batch: Batch, stage: str) -> None:
        log_w = self.net.log_weights(
            batch.x,
            max(self.eval_num_samples, self.num_samples),
            batch.context,
            self.eval_chunk_size,
        )  # [S, B]; the first K samples give the training-K bound
        bound = iwae_bound(log_w[: self.num_samples])
        log_likelihood = iwae_bound(log_w[: self.eval_num_samples])
        size = batch.x.shape[0]
        # sync_dist: under DDP the epoch value is the mean over every rank's images.
        self.log(f"{stage}/bound", bound.mean(), batch_size=size, sync_dist=True)
        self.log("step", float(self.global_step), batch_size=size)  # the training step reached
        self.log(
            f"{stage}/log_likelihood",
            log_likelihood.mean(),
            batch_size=size,
            sync_dist=True,
            prog_bar=True,
        )

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    # -- numerical faults --------------------------------------------------------------------
    def _nonfinite_terms(self, loss: Tensor) -> list[str]:
        """Names of the non-finite terms of this step.

        The common case costs one fused norm per group and one host sync: a non-finite entry
        makes its group's norm non-finite, so the per-term names are only computed then.
        """
        groups = {
            "loss": [loss.detach()],
            "model gradient": [p.grad for p in self.net.model_parameters() if p.grad is not None],
            "inference gradient": [
                p.grad for p in self.net.inference_parameters() if p.grad is not None
            ],
        }
        norms = [
            torch.nn.utils.get_total_norm(t) if t else loss.new_zeros(()) for t in groups.values()
        ]
        flags = torch.isfinite(torch.stack(norms)).tolist()
        return [name for name, ok in zip(groups, flags, strict=True) if not ok]

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None):
        loss = optimizer_closure()  # training_step + backward
        bad = self._nonfinite_terms(loss)
        if not bad:
            optimizer.step()
            return
        where = f"step {self.global_step} (epoch {epoch}, batch {batch_idx})"
        if self.nonfinite == "raise":
            raise NonFiniteError(
                f"non-finite {', '.join(bad)} at {where}; parameters and checkpoints keep their "
                "last good values; set model.nonfinite=skip to drop such updates instead"
            )
        self.skipped_steps += 1
        optimizer.zero_grad(set_to_none=True)
        self.log("train/skipped_steps", float(self.skipped_steps))

    # -- optimization ------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = [{"params": self.net.inference_parameters(), "name": "inference"}]
        if self.train_model:
            groups.insert(0, {"params": self.net.model_parameters(), "name": "model"})
        extra = [p for p in self.estimator.parameters() if p.requires_grad]
        if extra:
            groups.append({"params": extra, "name": "estimator"})
        return self.optimizer_factory(groups)
