"""DReGModule: the VAE trained with a swappable gradient estimator.

One training step = one encoder pass, one decoder pass, one backward. The estimator turns the
log-weights into per-sample coefficients and :func:`routed_loss` turns those into a scalar
whose single backward gives the decoder its model gradient and the encoder its inference
gradient. What is logged is always the estimator's true bound, never a surrogate.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from dreg.captured_step import CapturedStep
from dreg.datamodules.binarized import Batch, BatchGroup
from dreg.errors import NonFiniteError
from dreg.estimators import Estimator, GradientWeights, Particles, routed_loss
from dreg.estimators.ops import iwae_bound
from dreg.grouped_step import (
    align_cadence,
    carry_step_count,
    count_optimizer_step,
    fallback_reason,
    group_boundaries,
)
from dreg.model import VAE
from dreg.pack import StepRequest, current_pack, joint_step
from dreg.seeds import derived_seed

log = logging.getLogger(__name__)


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
    :param steps_per_call: optimizer steps per Lightning training call (:mod:`dreg.grouped_step`):
        the framework's per-call cost is paid once per N steps; results are bitwise those of
        one step per call on CPU. Falls back to 1, with one log line, where it cannot apply.
    :param cuda_graph: on CUDA, replay the whole optimizer step as one captured CUDA graph
        (:mod:`dreg.captured_step`; Adam becomes ``capturable=True``). Ignored on CPU.
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
        steps_per_call: int = 1,
        cuda_graph: bool = False,
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
        if isinstance(steps_per_call, bool) or not isinstance(steps_per_call, int):
            raise ValueError(f"model.steps_per_call={steps_per_call!r}: must be an integer >= 1")
        if steps_per_call < 1:
            raise ValueError(f"model.steps_per_call={steps_per_call}: must be an integer >= 1")
        self.steps_per_call, self.cuda_graph = steps_per_call, cuda_graph
        # Decided in setup("fit") from the trainer: grouped calls and the captured step.
        self._grouped, self._captured_wanted = False, False
        self._captured: CapturedStep | None = None
        self._cadence: tuple[int, int] | None = None  # (val_check_interval, log_every_n_steps)
        self._saved_triggers: tuple | None = None
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

    def training_step(self, batch: Batch | BatchGroup, batch_idx: int) -> Tensor | None:
        if isinstance(batch, BatchGroup):
            return self._train_group(batch)
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
        if self._grouped:
            align_cadence(self.trainer, self.global_step, *self._cadence)
        if self._final_row is not None and self.global_step == self.trainer.max_steps:
            row = {k: float(v) for k, v in self._final_row.items()}
            for logger in self.loggers:
                logger.log_metrics(row, step=self.global_step)
            self._final_row = None

    # -- several steps per call (dreg.grouped_step) -----------------------------------------
    def _stop_before(self) -> bool:
        """A stop signal arrived, or the run has taken its last step."""
        max_steps = self.trainer.max_steps
        return self.trainer.received_sigterm or (max_steps > 0 and self.global_step >= max_steps)

    def _train_group(self, group: BatchGroup) -> None:
        """``len(group)`` optimizer steps, each exactly as one step per call would take it."""
        if self._captured is not None:
            return self._train_group_captured(group)
        optimizer = self.optimizers()
        last = None
        skipped_before = self.skipped_steps
        for i in range(len(group)):
            if self._stop_before():
                group.return_unused(len(group) - i)
                break
            batch = group.binarized(i)
            # The order of Lightning's automatic loop: zero_grad, forward, backward, check, step.
            optimizer.zero_grad()
            particles, weights, loss = self._forward_backward(batch)
            bad = self._nonfinite_terms(loss)
            if bad:
                self._nonfinite(bad, group.first_batch + i)
                optimizer.zero_grad(set_to_none=True)
                count_optimizer_step(self.trainer)  # one step per call counts a skip as a step
            else:
                optimizer.step()
            last = (weights.objective.mean(), particles.log_w, batch.x.shape[0])
        if last is not None:
            self._log_group_end(*last, skipped=self.skipped_steps != skipped_before)
        return None

    def _forward_backward(self, batch: Batch) -> tuple[Particles, GradientWeights, Tensor]:
        """This step's forward and backward: alone, or jointly with the other jobs of its pack
        (:mod:`dreg.pack`; a normal run is a pack of one)."""
        request = StepRequest(self, batch)
        pack = current_pack()
        if pack is None:
            joint_step([request])
        else:
            pack.step(request)
        return request.particles, request.weights, request.loss

    def _train_group_captured(self, group: BatchGroup) -> None:
        captured = self._captured
        captured.start_group()
        first_step, done = self.global_step, 0
        for i in range(len(group)):
            if self._stop_before():
                group.return_unused(len(group) - i)
                break
            captured.replay(group.rows[i])
            count_optimizer_step(self.trainer)
            done += 1
        if not done:
            return None
        first_bad, skipped = captured.faults()  # the one host read of the group
        if first_bad >= 0 and self.nonfinite == "raise":
            self._nonfinite(
                ["loss or gradient"], group.first_batch + first_bad, first_step + first_bad
            )
        self.skipped_steps += skipped
        objective, bound = captured.objective.clone(), captured.iwae_bound.clone()
        self._log_group_end(
            objective, None, skipped=skipped > 0, bound=bound, size=group.rows.shape[1]
        )
        return None

    def _log_group_end(
        self,
        objective: Tensor,
        log_w: Tensor | None,
        size: int,
        skipped: bool,
        bound: Tensor | None = None,
    ) -> None:
        """Log what one step per call logs at the group's last step (groups end at log steps)."""
        self.log("train/objective", objective.detach(), prog_bar=True, batch_size=size)
        if skipped:
            self.log("train/skipped_steps", float(self.skipped_steps), batch_size=size)
        log_every = self._cadence[1]
        if self.global_step % log_every == 0:
            if bound is None:
                bound = iwae_bound(log_w).mean()
            self.log("train/iwae_bound", bound, batch_size=size)
            self.log("step", float(self.global_step), batch_size=size)
        elif self.global_step == self.trainer.max_steps:
            if bound is None:
                bound = iwae_bound(log_w).mean()
            self._final_row = {"train/objective": objective.detach(), "train/iwae_bound": bound}

    def _nonfinite(self, bad: list[str], batch_idx: int, step: int | None = None) -> None:
        """Raise (naming the step) or count a skipped update, as ``optimizer_step`` does."""
        step = self.global_step if step is None else step
        where = f"step {step} (epoch {self.current_epoch}, batch {batch_idx})"
        if self.nonfinite == "raise":
            raise NonFiniteError(
                f"non-finite {', '.join(bad)} at {where}; parameters and checkpoints keep their "
                "last good values; set model.nonfinite=skip to drop such updates instead"
            )
        self.skipped_steps += 1

    def _setup_grouping(self) -> None:
        trainer = self.trainer
        on_cuda = trainer.strategy.root_device.type == "cuda"
        if self.cuda_graph and not on_cuda:
            log.info(
                "model.cuda_graph=true ignored: training runs on %s, not CUDA",
                trainer.strategy.root_device.type,
            )
        wanted = self.steps_per_call > 1 or (self.cuda_graph and on_cuda)
        if not wanted:
            return
        reason = fallback_reason(trainer)
        if reason is not None:
            log.info(
                "model.steps_per_call=%d, cuda_graph=%s: one eager step per call instead (%s)",
                self.steps_per_call,
                self.cuda_graph,
                reason,
            )
            return
        self._grouped, self._captured_wanted = True, self.cuda_graph and on_cuda
        self.automatic_optimization = False
        log_every = int(trainer.log_every_n_steps)
        self._cadence = (int(trainer.val_check_interval), log_every)
        trainer.datamodule.group_batches(self.steps_per_call, group_boundaries(trainer, log_every))

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self._setup_grouping()
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
        pack = current_pack()
        if pack is not None:
            pack.attach(self.trainer)
        carry_step_count(self.trainer, manual=not self.automatic_optimization)
        if self._grouped:
            trainer = self.trainer
            self._saved_triggers = (trainer.val_check_batch, trainer.log_every_n_steps)
            align_cadence(trainer, self.global_step, *self._cadence)
            if self._captured_wanted:
                datamodule = trainer.datamodule
                self._captured = CapturedStep(
                    self,
                    self.optimizers().optimizer,
                    datamodule.splits["train"],
                    datamodule.split_context,
                    datamodule.batch_size,
                    skip_nonfinite=self.nonfinite == "skip",
                )

    def on_train_end(self) -> None:
        self._segment[1] = time.perf_counter()
        if self._saved_triggers is not None:
            self.trainer.val_check_batch, self.trainer.log_every_n_steps = self._saved_triggers
            self._saved_triggers = None

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
        self._nonfinite(bad, batch_idx)  # raises, or counts the skip
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
        if self._captured_wanted:
            # Adam's step count and bias correction on the device, so a graph can record it.
            return self.optimizer_factory(groups, capturable=True)
        return self.optimizer_factory(groups)
