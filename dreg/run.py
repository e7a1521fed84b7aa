"""What ``python train.py`` does: build every object from the config, train, test, record."""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger

from dreg.callbacks.preemption import Preempted
from dreg.checkpointing import AtomicCheckpointIO, load_checkpoint
from dreg.config import validate
from dreg.files import write_json
from dreg.lightning_module import DReGModule
from dreg.loggers import continue_loggers

log = logging.getLogger(__name__)


def git_commit() -> str:
    """The commit the code runs from (with ``-dirty`` for uncommitted changes), or ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, DReGModule]:
    """The datamodule and the LightningModule described by ``cfg``."""
    datamodule = instantiate(cfg.dataset)
    datamodule.prepare_data()
    net = instantiate(cfg.model.net, **datamodule.model_kwargs())
    estimator = instantiate(cfg.estimator)
    module = instantiate(cfg.model, net=net, estimator=estimator)
    return datamodule, module


def load_net_weights(net: torch.nn.Module, ckpt_path: str | Path) -> None:
    """Load only the VAE's weights (``net.*``) from a Lightning checkpoint.

    Starting inference-network-only training or a diagnostic from a checkpoint needs the
    weights, not Lightning's full state (optimizer, step counters, a possibly different
    estimator's learned state).
    """
    state = load_checkpoint(ckpt_path)["state_dict"]  # clear errors for missing/corrupt files
    net.load_state_dict({k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")})


def build_trainer(cfg: DictConfig, output_dir: Path) -> pl.Trainer:
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    return instantiate(
        cfg.trainer,
        logger=loggers or False,
        callbacks=callbacks,
        default_root_dir=output_dir,
        plugins=[AtomicCheckpointIO()],
    )


def checkpoint_to_resume(cfg: DictConfig, output_dir: Path) -> str | None:
    """``ckpt_path`` if given; with ``resume=true`` the run directory's ``last.ckpt``."""
    if cfg.get("ckpt_path"):
        return str(cfg.ckpt_path)
    if cfg.get("resume"):
        last = output_dir / "checkpoints" / "last.ckpt"
        if last.exists():
            return str(last)
        log.warning("resume=true but %s does not exist: starting from scratch", last)
    return None


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and test as configured; returns (and writes to ``metrics.json``) the results."""
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    datamodule, module = build(cfg)
    trainer = build_trainer(cfg, output_dir)
    commit = git_commit()
    for logger in trainer.loggers:
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "git_commit": commit})

    resume_from = checkpoint_to_resume(cfg, output_dir)
    if cfg.get("ckpt_path") and not module.train_model:
        # Inference-network-only training starts from the checkpoint's *weights* with a fresh
        # optimizer at step 0 (its full state holds the two-group optimizer). Only this run's
        # own last.ckpt (resume=true after a preemption) is resumed in full.
        load_net_weights(module.net, cfg.ckpt_path)
        last = output_dir / "checkpoints" / "last.ckpt"
        resume_from = str(last) if cfg.get("resume") and last.exists() else None
    if resume_from:  # every logger continues the run at the checkpoint's step
        continue_loggers(trainer.loggers, load_checkpoint(resume_from)["global_step"])
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
        preempted = False
    except Preempted:
        preempted = True
    train_seconds = time.perf_counter() - start
    # Read before testing: trainer.test() replaces the callback metrics.
    train_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    base = {
        "global_step": trainer.global_step,
        "train_seconds": train_seconds,
        "git_commit": commit,
    }
    if preempted:
        status = {"status": "preempted", **train_metrics, **base}
        if trainer.is_global_zero:
            write_json(output_dir / "status.json", status)
        return status

    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None else ""
    test_results = trainer.test(module, datamodule=datamodule, ckpt_path=best or None)[0]
    metrics = {
        "status": "completed",
        **train_metrics,
        **{k: float(v) for k, v in test_results.items()},
        **base,
        "tested_checkpoint": best or "final weights",
    }
    if trainer.is_global_zero:
        write_json(output_dir / "metrics.json", metrics)
        write_json(output_dir / "status.json", {"status": "completed"})
        log.info("test metrics: %s", json.dumps(metrics))
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            run_dir = Path(logger.experiment.dir).parent
            logger.experiment.finish()  # flush the summary; Lightning leaves the run open
            if logger._offline and trainer.is_global_zero:
                log.info("W&B run saved offline; upload it with: wandb sync %s", run_dir)
    return metrics


def main(cfg: DictConfig) -> float | None:
    """Entry point called by ``train.py``: validate, then run the configured mode.

    Returns the optimized metric, for Hydra sweepers.
    """
    validate(cfg)
    metrics = instantiate(cfg.mode.run)(cfg)
    return (metrics or {}).get(cfg.get("optimized_metric") or "", None)
