"""Objects from the config: the datamodule, the LightningModule, the loggers and the trainer.

Everything here is built with ``hydra.utils.instantiate`` from the composed config, so the
config groups are the API. Training (:mod:`dreg.run`) and the diagnostic modes
(:mod:`dreg.diagnostics`) both build through these functions.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Timer

from dreg.checkpointing import SafeCheckpointIO
from dreg.lightning_module import DReGModule


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, DReGModule]:
    """The datamodule and the LightningModule described by ``cfg`` (data prepared)."""
    datamodule = instantiate(cfg.dataset)
    datamodule.prepare_data()
    net = instantiate(cfg.model.net, **datamodule.model_kwargs())
    estimator = instantiate(cfg.estimator)
    module = instantiate(cfg.model, net=net, estimator=estimator)
    return datamodule, module


def build_loggers(cfg: DictConfig) -> list:
    """The loggers of the ``logger`` group (``logger=none`` gives none)."""
    return [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]


def build_trainer(cfg: DictConfig, output_dir: Path) -> pl.Trainer:
    """The Lightning trainer of ``cfg.trainer`` with the configured loggers and callbacks."""
    # ModelCheckpoint warns whenever its folder holds files. dreg.records refuses a used run
    # folder unless resume=true, and a resumed run's folder holds its checkpoints by design.
    warnings.filterwarnings("ignore", r"Checkpoint directory .* exists and is not empty")
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    # Training wall time over every segment of a run (checkpoints carry it): train_seconds.
    callbacks.append(Timer(duration=None, interval="step", verbose=False))
    return instantiate(
        cfg.trainer,
        logger=build_loggers(cfg) or False,
        callbacks=callbacks,
        default_root_dir=output_dir,
        plugins=[SafeCheckpointIO()],
    )


def train_seconds(trainer: pl.Trainer) -> float:
    """Wall time spent in training over every segment of the run (resumes included)."""
    timer = next(c for c in trainer.callbacks if isinstance(c, Timer))
    return timer.time_elapsed("train")
