"""What ``python train.py`` does: claim the run folder, check the config, run the mode.

:func:`main` is the same for every mode (train, bias_check, diagnose) and keeps the run
folder's ``status.json``; :func:`train` is the train mode: build, fit (or resume), test, record.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException

from dreg.build import build, build_trainer, train_seconds
from dreg.checkpointing import load_checkpoint, load_net_weights
from dreg.config import validate
from dreg.errors import (
    CheckpointError,
    ConfigError,
    PreemptedError,
    ResumeMismatchError,
    RunError,
)
from dreg.files import write_json
from dreg.loggers import continue_loggers, summarize_wandb
from dreg.pack import current_pack
from dreg.records import RunFolder, check_resume_compatible, experiment_config, is_main_process

log = logging.getLogger(__name__)


def main(cfg: DictConfig) -> float | None:
    """Entry point called by ``train.py``: claim the run folder, validate, run the mode.

    Records the outcome in ``status.json`` (running, completed, preempted, failed with the
    error) and returns the optimized metric, for Hydra sweepers. Expected errors are
    :class:`dreg.errors.RunError` with one-line messages; ``train.py`` prints them.
    """
    folder = RunFolder(cfg.paths.output_dir)
    main_process = is_main_process()
    if main_process:
        folder.claim(resume=bool(cfg.get("resume")))  # RunFolderError: nothing written
    try:
        metrics = run_mode(cfg, folder if main_process else None)
    finally:
        folder.release()
    name = cfg.get("optimized_metric")
    if name and metrics and name not in metrics:
        log.warning(
            "optimized_metric=%s is not among this run's results %s; sweepers get None",
            name,
            sorted(k for k, v in metrics.items() if isinstance(v, float)),
        )
    return metrics.get(name or "", None)


def run_mode(cfg: DictConfig, folder: RunFolder | None) -> dict[str, Any]:
    """Validate and run the configured mode, keeping ``folder``'s status (main process only)."""
    before = folder.status if folder is not None else {}
    try:
        validate(cfg)
        if folder is not None:
            folder.write_status("running", pid=os.getpid(), git_commit=git_commit())
        metrics = instantiate(cfg.mode.run)(cfg) or {}
    except Exception as err:
        if folder is None:
            raise
        if isinstance(err, REFUSALS) and before.get("status") in ("completed", "preempted"):
            folder.write_status(**before)  # a refused resume leaves the run's record as it was
        else:
            code = err.exit_code if isinstance(err, RunError) else 1
            folder.write_status("failed", error=one_line(err), exit_code=code)
        raise
    if metrics.get("status") == "preempted":
        raise PreemptedError(
            f"preempted at step {metrics['global_step']}: saved checkpoints/last.ckpt; "
            "continue with the same command and resume=true"
        )
    if folder is not None and folder.status.get("status") != "completed":
        folder.write_status("completed")
    return metrics


# Errors that refuse to start a resume, before anything of the run changed.
REFUSALS = (ConfigError, CheckpointError, ResumeMismatchError)


def one_line(err: BaseException) -> str:
    """The error as one line: expected errors are their message, others ``Type: message``."""
    text = str(err).strip().replace("\n", " ")
    return text if isinstance(err, RunError) else f"{type(err).__name__}: {text}"


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and test as configured; returns (and writes to ``metrics.json``) the results."""
    output_dir = Path(cfg.paths.output_dir)
    finished = already_completed(cfg, output_dir)
    if finished is not None:
        return finished
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, module = build(cfg)
    module.experiment = experiment_config(cfg)
    trainer = build_trainer(cfg, output_dir)
    commit = git_commit()
    for logger in trainer.loggers:
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "git_commit": commit})

    resume_from = checkpoint_to_resume(cfg, output_dir)
    if cfg.get("ckpt_path") and not module.train_model and resume_from == Path(cfg.ckpt_path):
        # Inference-network-only training starts from the checkpoint's *weights* with a fresh
        # optimizer at step 0 (its full state holds the two-group optimizer). Only this run's
        # own last.ckpt (resume=true after a preemption) is resumed in full.
        load_net_weights(module.net, cfg.ckpt_path)
        resume_from = None
    if resume_from is not None:
        saved = load_checkpoint(resume_from)
        check_resume_compatible(saved.get("dreg", {}).get("experiment"), cfg, resume_from)
        continue_loggers(trainer.loggers, int(saved["global_step"]))
        del saved
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    except SIGTERMException:  # PreemptionCheckpoint saved last.ckpt
        status = {
            "status": "preempted",
            "global_step": trainer.global_step,
            "checkpoint": "checkpoints/last.ckpt",
            "train_seconds": train_seconds(trainer),
            "git_commit": commit,
        }
        if trainer.is_global_zero:
            write_json(output_dir / "status.json", status)
        return status
    # Read before testing: trainer.test() replaces the callback metrics.
    train_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k != "step"}
    elapsed = train_seconds(trainer)
    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None else ""
    test_results = trainer.test(module, datamodule=datamodule, ckpt_path=best or None)[0]
    metrics = {
        "status": "completed",
        **train_metrics,
        **{k: float(v) for k, v in test_results.items() if k != "step"},
        "global_step": trainer.global_step,
        # In a pack, the wall time of the pack's training, which its jobs share (pack_size).
        "train_seconds": elapsed,
        "pack_size": pack.size if (pack := current_pack()) is not None else 1,
        "git_commit": commit,
        "tested_checkpoint": relative(best, output_dir) if best else "final weights",
    }
    if trainer.is_global_zero:
        write_json(output_dir / "metrics.json", metrics)
        log.info("test metrics: %s", json.dumps(metrics))
    summarize_wandb(trainer.loggers, metrics, best or None)  # W&B dashboards: the run summary
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            run_dir = Path(logger.experiment.dir).parent
            logger.experiment.finish()  # flush the summary; Lightning leaves the run open
            if logger._offline and trainer.is_global_zero:
                log.info("W&B run saved offline; upload it with: wandb sync %s", run_dir)
    return metrics


def already_completed(cfg: DictConfig, output_dir: Path) -> dict[str, Any] | None:
    """With ``resume=true``, the recorded metrics of a run that already reached its end.

    Lets a whole sweep be re-run with ``resume=true``: finished jobs are kept as they are,
    preempted ones continue, the rest start. A larger ``trainer.max_steps`` extends a run.
    """
    metrics_file = output_dir / "metrics.json"
    if not (cfg.get("resume") and metrics_file.exists()):
        return None
    metrics = json.loads(metrics_file.read_text())
    steps, max_steps = int(metrics.get("global_step", 0)), cfg.trainer.get("max_steps", -1)
    if max_steps == -1 or steps < max_steps:
        return None
    log.info("%s already completed %d steps: nothing to do", output_dir, steps)
    return metrics


def checkpoint_to_resume(cfg: DictConfig, output_dir: Path) -> Path | None:
    """What ``trainer.fit`` continues from.

    With ``resume=true`` the run's own ``last.ckpt`` wins, even when ``ckpt_path`` started the
    run: a run started from another checkpoint and then preempted must continue its own
    progress, not restart from where it began. Otherwise ``ckpt_path`` (full resume).
    """
    last = output_dir / "checkpoints" / "last.ckpt"
    if cfg.get("resume") and last.exists():
        return last
    if cfg.get("resume") and not cfg.get("ckpt_path"):
        log.warning("resume=true but %s does not exist: starting from scratch", last)
    return Path(cfg.ckpt_path) if cfg.get("ckpt_path") else None


def relative(path: str | Path, root: Path) -> str:
    """``path`` relative to the run folder when inside it (run folders can be moved)."""
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


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
