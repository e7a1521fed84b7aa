"""DReGModule: the VAE trained with a swappable gradient estimator, and its evaluation.

Training goes through :mod:`dreg.step`, the one home of the training step (forward,
estimator, routed backward, non-finite policy, optimizer step), and :mod:`dreg.cohort`, the
one home of the run of steps around it: alone (a pack of one) or with the other jobs of a
pack (:mod:`dreg.pack`). The module is the job that both ask for
(:class:`dreg.cohort.TrainingJob`). Each Lightning training call performs a run of
``model.steps_per_call`` optimizer steps (:mod:`dreg.grouped_step` keeps validation, logging
and checkpoints on their step counts). What is logged is always the estimator's true bound,
never a surrogate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer import call
from torch import Tensor

from dreg.cohort import Cohorts, Request, RunResult
from dreg.datamodules.binarized import Batch, BatchGroup
from dreg.errors import NonFiniteError
from dreg.estimators import Estimator
from dreg.estimators.ops import iwae_bound
from dreg.grouped_step import (
    align_cadence,
    carry_step_count,
    count_optimizer_step,
    fallback_reason,
    group_boundaries,
    has_gradient_hooks,
    needs_lightning_backward,
    set_step_count,
)
from dreg.model import VAE
from dreg.pack import current_pack
from dreg.seeds import NOISE_STREAM, derived_seed, reseed_rank

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
    :param compile: what ``torch.compile`` compiles: ``False`` nothing; ``"mlps"`` the encoder
        and decoder MLPs in place (state-dict keys unchanged, so checkpoints move between
        compiled and eager runs); ``"step"`` the whole training step of the run of steps
        (:meth:`dreg.step.Replicas.compiled`: forward, estimator, routed backward, flags,
        clipping, optimizer update; alone and a pack's stacked step). On CPU the first step
        pays ~30-60 s of compilation.
    :param nonfinite: what a non-finite loss or gradient does: ``raise`` (stop, naming the
        step and batch; parameters and checkpoints keep their last good values) or ``skip``
        (undo the update, count it in ``train/skipped_steps``; a skipped update still counts
        as a step towards ``trainer.max_steps``, as Lightning's own loop counts it).
    :param steps_per_call: optimizer steps per Lightning training call (:mod:`dreg.grouped_step`):
        the framework's per-call cost is paid once per N steps; results are bitwise those of
        one step per call on CPU. Falls back to 1, with one log line, where it cannot apply.
    :param cuda_graph: on CUDA, replay the whole optimizer step as one captured CUDA graph
        (:mod:`dreg.captured_step`; Adam becomes ``capturable=True``). Ignored on CPU.
    :param clip_grad_norm: clip each step's whole gradient (model, inference and estimator
        parameters together) to this 2-norm, as ``torch.nn.utils.clip_grad_norm_``; ``None``
        (default) does not clip. (Lightning's ``trainer.gradient_clip_val`` does not reach a
        manually optimized step, so the config check refuses it and names this option.)
    :param max_skipped_fraction: under ``nonfinite=skip``, the run fails (exit 6) once more
        than this fraction of its ``trainer.max_steps`` (without a step budget: of the steps
        taken, checked at the end) were skipped: a run that dropped most of its updates did
        not train, and must not be recorded as completed.
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
        compile: bool | str = False,
        nonfinite: str = "raise",
        steps_per_call: int = 50,
        cuda_graph: bool = False,
        clip_grad_norm: float | None = None,
        max_skipped_fraction: float = 0.1,
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
        # The last training call's batch means (what metrics.json records).
        self.last_train_metrics: dict[str, Tensor] = {}
        self._stepped = True  # the last training call took a step (see align_cadence)
        self.steps_per_call, self.cuda_graph = steps_per_call, cuda_graph
        self.clip_grad_norm, self.max_skipped_fraction = clip_grad_norm, max_skipped_fraction
        if antithetic and estimator.needs_independent_samples:
            raise ValueError(
                f"antithetic=True: estimator '{estimator.name}' is unbiased only for "
                "independent samples; use antithetic=False or iwae/vae/stl/rws/jvi"
            )
        # Every step is taken under manual optimization, by dreg.step.
        self.automatic_optimization = False
        # The training noise generator (setup), its checkpointed state.
        self.noise: torch.Generator | None = None
        self._noise_state: torch.Tensor | None = None
        self.step_inputs: tuple | None = None  # (x, context, eps) of the step being taken
        # A run alone takes its steps as a pack of one (dreg.cohort); a pack has its own.
        self._cohorts = Cohorts()
        # Decided in setup("fit") from the trainer: the captured step.
        self._captured_wanted = False
        self._cadence: tuple[int, int] | None = None  # (val_check_interval, log_every_n_steps)
        self._saved_triggers: tuple | None = None
        if compile not in (False, None, "false", "mlps", "step"):
            raise ValueError(f"compile={compile!r}: must be False, 'mlps' or 'step'")
        self.compile_mode = "step" if compile == "step" else None
        if compile == "mlps":
            # A net lists its own networks (TwoLayerVAE.mlps); the one-layer VAE's are these two.
            mlps = net.mlps() if hasattr(net, "mlps") else (net.encoder, net.decoder)
            for mlp in mlps:
                mlp.compile()
        if not train_model:
            for p in self.net.model_parameters():
                p.requires_grad_(False)

    # -- training: runs of steps through dreg.cohort (alone) or dreg.pack (with other jobs) ----
    def training_step(self, group: BatchGroup, batch_idx: int) -> None:
        """``len(group)`` optimizer steps (fewer when a stop signal arrives)."""
        pack = current_pack()
        if pack is not None:
            result = pack.train(self, group)
        else:  # a pack of one: the same run of steps
            request = Request(self, group)
            self._cohorts.run([request])
            result = request.result
        self._finish_run(group, result)

    # -- what the run of steps asks of a job (dreg.cohort.TrainingJob) -----------------------
    def training_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizers().optimizer

    def observes_gradients(self) -> bool:
        return has_gradient_hooks(self.trainer)

    def lone_backward(self) -> Callable[[Tensor], None]:
        return self.manual_backward if needs_lightning_backward(self.trainer) else Tensor.backward

    def wants_captured_step(self) -> bool:
        return self._captured_wanted

    def compiles_step(self) -> bool:
        return self.compile_mode == "step"

    def count_step(self) -> None:
        count_optimizer_step(self.trainer)

    def step_settings(self) -> dict:
        """What every replica of a pack must share (besides the net's shapes)."""
        return {
            "num_samples": self.num_samples,
            "antithetic": self.antithetic,
            "train_model": self.train_model,
            "clip_norm": self.clip_grad_norm,
        }

    def split(self, bits: Tensor) -> tuple[Tensor, Tensor | None]:
        batch = self.trainer.datamodule.split_context(bits)
        return batch.x, batch.context

    def before_update(self, step_inputs: tuple) -> None:
        """Lightning's ``on_before_optimizer_step`` hooks (grad_stats, estimator_compare),
        with this job's gradients in ``p.grad`` and its step's ``(x, context, eps)`` in
        ``step_inputs``."""
        self.step_inputs = step_inputs
        optimizer = self.optimizers().optimizer
        call._call_callback_hooks(self.trainer, "on_before_optimizer_step", optimizer)
        call._call_lightning_module_hook(self.trainer, "on_before_optimizer_step", optimizer)

    def stop_requested(self) -> bool:
        """A stop signal arrived, or the run has taken its last step."""
        max_steps = self.trainer.max_steps
        return self.trainer.received_sigterm or (max_steps > 0 and self.global_step >= max_steps)

    def _finish_run(self, group: BatchGroup, result: RunResult) -> None:
        """After a run of steps: give back untrained batches, apply the non-finite policy,
        log what one step per call would log at the run's last step."""
        self._stepped = result.steps > 0
        if result.steps < len(group):
            group.return_unused(len(group) - result.steps)
        if result.first_bad >= 0 and self.nonfinite == "raise":
            step = self.global_step - result.steps + result.first_bad
            set_step_count(self.trainer, step)  # the bad update was not applied
            batch = group.first_batch + result.first_bad
            where = f"step {step} (epoch {self.current_epoch}, batch {batch})"
            raise NonFiniteError(
                f"non-finite loss or gradient at {where}; parameters and checkpoints keep their "
                "last good values; set model.nonfinite=skip to drop such updates instead"
            )
        if not result.steps:
            return
        self.skipped_steps += result.skipped
        if result.skipped:
            self._check_skipped(self.trainer.max_steps)
        size = group.rows.shape[1]
        if result.skipped:
            self.log("train/skipped_steps", float(self.skipped_steps), batch_size=size)
        objective, bound = result.objective.clone(), result.iwae_bound.clone()
        self.last_train_metrics = {"train/objective": objective, "train/iwae_bound": bound}
        # Lightning's self.log costs ~0.3 ms a call (3% of a tiny model's step at 16 steps a
        # call): the row is logged for the logger's rows only (on_train_batch_end logs it when
        # a callback stops the run between them); in between only a progress bar reads it.
        if self._at_log_row():
            self._log_train_row(size)
        elif (bar := self.trainer.progress_bar_callback) is not None and bar.is_enabled:
            self.log("train/objective", objective, prog_bar=True, batch_size=size)

    def _at_log_row(self) -> bool:
        """The logger writes a row after this call (``trainer.log_every_n_steps``)."""
        return self.global_step % self._cadence[1] == 0

    def _log_train_row(self, size: int) -> None:
        """Log the last call's training metrics for the row Lightning writes after the call.
        Rows are labelled with the optimizer steps done, as checkpoints and validation."""
        self.log("train/objective", self.last_train_metrics["train/objective"], prog_bar=True,
                 batch_size=size)  # fmt: skip
        self.log("train/iwae_bound", self.last_train_metrics["train/iwae_bound"], batch_size=size)
        self.log("step", float(self.global_step), batch_size=size)

    def _check_skipped(self, budget: int) -> None:
        """Fail once the skipped updates pass ``max_skipped_fraction`` of ``budget`` steps
        (with a step budget as soon as the run can no longer end under the bound)."""
        if budget <= 0 or self.skipped_steps <= self.max_skipped_fraction * budget:
            return
        raise NonFiniteError(
            f"model.nonfinite=skip dropped {self.skipped_steps} updates by step "
            f"{self.global_step}, more than model.max_skipped_fraction="
            f"{self.max_skipped_fraction} of {budget} steps: the model did not train; lower "
            "model.optimizer.lr or set model.clip_grad_norm (or raise the bound)"
        )

    def on_train_batch_end(self, outputs, batch: BatchGroup, batch_idx: int) -> None:
        align_cadence(self.trainer, self.global_step, *self._cadence, self._stepped)
        if not self._stepped or self._at_log_row():
            return  # this call's row, if any, is logged
        if self.trainer.should_stop:
            # A callback (max_time, say) stopped the run: Lightning writes a row after this
            # call, which must carry this call's values (it repeats the last ones logged).
            self._log_train_row(batch.rows.shape[1])
        elif self.global_step == self.trainer.max_steps:
            # The last call, between the logger's rows: no row would hold the run's end.
            row = {k: float(v) for k, v in self.last_train_metrics.items()}
            for logger in self.loggers:
                logger.log_metrics(row, step=self.global_step)

    def _setup_grouping(self) -> None:
        trainer = self.trainer
        on_cuda = trainer.strategy.root_device.type == "cuda"
        if self.cuda_graph and not on_cuda:
            log.info(
                "model.cuda_graph=true ignored: training runs on %s, not CUDA",
                trainer.strategy.root_device.type,
            )
        steps = self.steps_per_call
        reason = fallback_reason(trainer)
        if reason is not None and steps > 1:
            log.info("model.steps_per_call=%d: one step per call instead (%s)", steps, reason)
            steps = 1
        self._captured_wanted = self.cuda_graph and on_cuda and reason is None
        if self._captured_wanted and has_gradient_hooks(trainer):
            log.info("model.cuda_graph=true: eager steps instead (a callback reads every "
                     "step's gradients, which a replayed graph cannot show it)")  # fmt: skip
            self._captured_wanted = False
        log_every = int(trainer.log_every_n_steps)
        self._cadence = (int(trainer.val_check_interval), log_every)
        trainer.datamodule.group_batches(steps, group_boundaries(trainer, log_every))

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        self._cohorts = Cohorts()  # a new fit: new optimizers, new noise stream
        self._setup_grouping()
        # Every rank was seeded alike, so every rank built the same initial model. The
        # training noise (binarization, latent samples) comes from this job's own generator,
        # seeded from (seed, rank): each DDP rank draws its own, and a job draws the same
        # numbers alone or in a pack. Checkpoints carry its state.
        seed = derived_seed(torch.initial_seed(), self.global_rank, NOISE_STREAM)
        self.noise = torch.Generator(self.trainer.strategy.root_device).manual_seed(seed)
        if self._noise_state is not None:
            self.noise.set_state(self._noise_state)
        if self.trainer.world_size > 1 and self.global_rank > 0:
            reseed_rank(self.global_rank)

    # -- what checkpoints carry besides the weights ----------------------------------------
    def on_train_start(self) -> None:
        # A resumed checkpoint's param groups carry the implementation flags of the run that
        # wrote it (a compiled run's unfused Adam, say): this run's own apply.
        for group in self.training_optimizer().param_groups:
            group.update(self._path_flags())
        pack = current_pack()
        if pack is not None:
            pack.attach(self.trainer)
        carry_step_count(self.trainer)
        trainer = self.trainer
        self._saved_triggers = (trainer.val_check_batch, trainer.log_every_n_steps)
        align_cadence(trainer, self.global_step, *self._cadence)

    def on_train_end(self) -> None:
        if self.trainer.max_steps <= 0:  # no step budget: the steps taken
            self._check_skipped(self.global_step)
        if self._saved_triggers is not None:
            self.trainer.val_check_batch, self.trainer.log_every_n_steps = self._saved_triggers
            self._saved_triggers = None

    # -- what checkpoints carry besides the weights ----------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        noise = self.noise.get_state() if self.noise is not None else None
        checkpoint["dreg"] = {"experiment": self.experiment, "noise": noise}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._noise_state = checkpoint.get("dreg", {}).get("noise")
        if self._noise_state is not None and self.noise is not None:
            self.noise.set_state(self._noise_state)

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

    # -- optimization ------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = [{"params": self.net.inference_parameters(), "name": "inference"}]
        if self.train_model:
            groups.insert(0, {"params": self.net.model_parameters(), "name": "model"})
        extra = [p for p in self.estimator.parameters() if p.requires_grad]
        if extra:
            groups.append({"params": extra, "name": "estimator"})
        return self.make_optimizer(groups)

    def make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        """The configured optimizer over ``groups`` (a pack's stacked tensors use it too)."""
        return self.optimizer_factory(groups, **self._path_flags())

    def _path_flags(self) -> dict:
        """The optimizer's implementation flags: as configured, and what the path needs.
        (``model.compile=step`` turns ``fused`` off itself: :meth:`dreg.step.Replicas.compiled`.)"""
        keywords = getattr(self.optimizer_factory, "keywords", {})
        flags = {key: keywords[key] for key in ("fused", "foreach") if key in keywords}
        if self._captured_wanted:
            # Adam's step count and bias correction on the device, so a graph can record it.
            flags["capturable"] = True
        return flags
