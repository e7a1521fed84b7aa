"""What ``python train.py`` does: claim the run folder, check the config, run the mode.

:func:`main` is the same for every mode (train, evaluate, bias_check, diagnose) and keeps the
run folder's ``status.json``; :func:`train` is the train mode: build, fit (or resume), test,
record; :func:`evaluate` tests one checkpoint. ``resume=true`` without a run folder continues
the latest interrupted run of the experiment (:func:`continue_interrupted_run`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, read_write
from pytorch_lightning.utilities.exceptions import SIGTERMException

from dreg.build import build, build_trainer, train_seconds
from dreg.checkpointing import load_checkpoint, load_net_weights
from dreg.config import validate
from dreg.errors import (
    CheckpointError,
    ConfigError,
    NonFiniteError,
    PreemptedError,
    ResumeMismatchError,
    RunError,
)
from dreg.files import storage_error, write_json
from dreg.loggers import continue_loggers, finish_wandb, summarize_wandb
from dreg.pack import current_pack
from dreg.records import (
    RunFolder,
    check_resume_compatible,
    experiment_config,
    experiment_differences,
    is_main_process,
    latest_interrupted_run,
)

log = logging.getLogger(__name__)


def main(cfg: DictConfig) -> float | None:
    """Entry point called by ``train.py``: claim the run folder, validate, run the mode.

    Records the outcome in ``status.json`` (running, completed, preempted, failed with the
    error) and returns the optimized metric, for Hydra sweepers. Expected errors are
    :class:`dreg.errors.RunError` with one-line messages; ``train.py`` prints them.
    """
    main_process = is_main_process()
    if main_process and cfg.get("resume"):
        continue_interrupted_run(cfg)
    folder = RunFolder(cfg.paths.output_dir)
    if main_process:
        folder.claim(resume=bool(cfg.get("resume")))  # RunFolderError: nothing written
    try:
        metrics = run_mode(cfg, folder if main_process else None)
    finally:
        folder.release()
    name = cfg.get("optimized_metric")
    in_sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if in_sweep and name and metrics and name not in metrics:  # a sweeper reads it
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
        # A full disk outside a checkpoint save (logs, images) is one line with its code too.
        full = storage_error(err, cfg.paths.output_dir) if isinstance(err, OSError) else None
        if folder is not None:
            record_failure(folder, full or err, before)
        if full is not None:
            raise full from err
        raise
    if metrics.get("status") == "preempted":
        raise PreemptedError(
            f"preempted at step {metrics['global_step']}: saved checkpoints/last.ckpt; "
            f"continue with the same command and resume=true: {resume_command(cfg)}"
        )
    if folder is not None and folder.status.get("status") != "completed":
        folder.write_status("completed")
    return metrics


# Errors that refuse to start a resume, before anything of the run changed.
REFUSALS = (ConfigError, CheckpointError, ResumeMismatchError)


def record_failure(folder: RunFolder, err: Exception, before: dict[str, Any]) -> None:
    """``status.json`` after ``err``: ``failed`` with its exit code, or as it was ``before``
    when a resume was refused."""
    if isinstance(err, REFUSALS) and before.get("status") in ("completed", "preempted"):
        folder.write_status(**before)  # a refused resume leaves the run's record as it was
    else:
        code = err.exit_code if isinstance(err, RunError) else 1
        folder.write_status("failed", error=one_line(err), exit_code=code)


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
    # The last step's, not the last row's (the logger writes every log_every_n_steps).
    train_metrics.update({k: float(v) for k, v in module.last_train_metrics.items()})
    elapsed = train_seconds(trainer)
    best = best_checkpoint(trainer, output_dir)
    metrics = {
        "status": "completed",
        **train_metrics,
        **run_test(trainer, module, datamodule, best),
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
    summarize_wandb(trainer.loggers, metrics, best)  # W&B dashboards: the run summary
    finish_wandb(trainer.loggers)
    return metrics


def best_checkpoint(trainer: pl.Trainer, output_dir: Path) -> Path | None:
    """This run's best checkpoint on validation, the one it tests; ``None``: the final weights.

    Only a file of this run folder counts. A run started from another run's checkpoint
    (``ckpt_path``) inherits that run's best path through Lightning's state; testing it would
    test weights this run never had, from a file that may have moved since.
    """
    checkpoint = trainer.checkpoint_callback
    best = Path(checkpoint.best_model_path) if checkpoint and checkpoint.best_model_path else None
    if best is None or not best.resolve().is_relative_to(output_dir.resolve()):
        return None
    return best


def run_test(
    trainer: pl.Trainer, module: pl.LightningModule, datamodule: Any, checkpoint: Path | None
) -> dict[str, float]:
    """The test metrics of ``checkpoint`` (``None``: the module's weights as they are).

    Non-finite weights give NaN test numbers: a failure (exit 6), never a completed run.
    """
    results = trainer.test(module, datamodule=datamodule, ckpt_path=checkpoint)[0]
    metrics = {k: float(v) for k, v in results.items() if k != "step"}
    broken = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if broken:
        raise NonFiniteError(
            f"test {', '.join(broken)} non-finite for {checkpoint or 'the final weights'}: the "
            "weights hold NaN or inf; evaluate an earlier checkpoint of the run"
        )
    return metrics


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """``mode=evaluate``: test exactly ``ckpt_path`` (the test split, log-likelihood with
    ``model.eval_num_samples``), in a run folder of its own; ``metrics.json`` names it."""
    if not cfg.get("ckpt_path"):
        raise ConfigError(
            "mode=evaluate: needs the checkpoint to evaluate; add "
            "ckpt_path=<run dir>/checkpoints/<name>.ckpt"
        )
    output_dir = Path(cfg.paths.output_dir)
    checkpoint = Path(cfg.ckpt_path).resolve()
    saved = load_checkpoint(checkpoint)
    trained_by = saved.get("dreg", {}).get("experiment")
    if trained_by and (changed := experiment_differences(trained_by, cfg)):
        log.warning("%s was trained under other settings: %s", checkpoint, "; ".join(changed))
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, module = build(cfg)
    load_net_weights(module.net, checkpoint)
    trainer = build_trainer(cfg, output_dir)
    commit = git_commit()
    for logger in trainer.loggers:
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "git_commit": commit})
    metrics = {
        "status": "completed",
        **run_test(trainer, module, datamodule, None),
        "global_step": int(saved["global_step"]),  # of the evaluated weights
        "git_commit": commit,
        "tested_checkpoint": str(checkpoint),
    }
    if trainer.is_global_zero:
        write_json(output_dir / "metrics.json", metrics)
        log.info("test metrics: %s", json.dumps(metrics))
    finish_wandb(trainer.loggers)
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
    progress, not restart from where it began. Otherwise ``ckpt_path`` (full resume). A
    ``last.ckpt`` that cannot be read gives way to ``ckpt_path`` (the way out its error names,
    e.g. the run's best checkpoint).
    """
    last = output_dir / "checkpoints" / "last.ckpt"
    given = Path(cfg.ckpt_path) if cfg.get("ckpt_path") else None
    if cfg.get("resume") and last.exists():
        return last if readable_last(last, given) else given
    if cfg.get("resume") and given is None:
        log.warning("resume=true but %s does not exist: starting from scratch", last)
    return given


def readable_last(last: Path, given: Path | None) -> bool:
    """Whether ``last.ckpt`` can be resumed; if not, and no ``ckpt_path`` says what to continue
    instead, a :class:`CheckpointError` that names the run's other checkpoints."""
    try:
        load_checkpoint(last)
        return True
    except CheckpointError as err:
        if given is None:
            others = sorted(last.parent.glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
            instead = others[-1] if others else "<another checkpoint of this run>"
            raise CheckpointError(
                f"{err}; to continue this run from another of its checkpoints: resume=true "
                f"ckpt_path={instead}"
            ) from err
        log.warning("%s cannot be read (%s): resuming from ckpt_path=%s", last, err, given)
        return False


# -- resume=true: the run it continues, and the command that continues it --------------------
def continue_interrupted_run(cfg: DictConfig) -> None:
    """``resume=true`` without ``hydra.run.dir``: continue the latest interrupted run of this
    experiment (:func:`dreg.records.latest_interrupted_run`) in its own folder.

    Hydra gives every single run a new folder (``outputs/runs/<time>``) before any of our code
    runs, so "the same command with resume=true" would otherwise start over there from step
    0. This job moves to the interrupted run's folder: Hydra's output folder (which
    ``paths.output_dir`` and the DDP ranks' ``hydra.run.dir`` follow), its ``.hydra`` files and
    its log; the new, empty folder is removed.
    """
    trains = OmegaConf.select(cfg, "mode.run._target_") == "dreg.run.train"
    if not (trains and HydraConfig.initialized()):
        return  # the other modes have nothing to continue
    hydra = HydraConfig.get()
    named = any(o.startswith("hydra.run.dir=") for o in hydra.overrides.hydra)
    if hydra.mode != RunMode.RUN or named:
        return
    fresh = Path(hydra.runtime.output_dir)
    if RunFolder(fresh).has_records():
        return
    found = latest_interrupted_run(fresh.parent, cfg)
    if found is None:
        log.warning(
            "resume=true: no interrupted run of this experiment in %s; starting a new run",
            fresh.parent,
        )
        return
    with read_write(hydra):
        hydra.run.dir = hydra.runtime.output_dir = str(found.resolve())
    move_hydra_files(fresh, found)
    log.info("resume=true: continuing the interrupted run in %s", found)


def move_hydra_files(fresh: Path, found: Path) -> None:
    """Move what Hydra wrote into ``fresh`` (``.hydra/``, the job's log) into ``found``."""
    (found / ".hydra").mkdir(exist_ok=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        if (fresh / ".hydra" / name).exists():
            shutil.copy2(fresh / ".hydra" / name, found / ".hydra" / name)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == fresh:
            handler.close()  # reopened, appending, at the next record
            moved = found / Path(handler.baseFilename).name
            with moved.open("a") as log_file:
                log_file.write(Path(handler.baseFilename).read_text())
            handler.baseFilename = str(moved)
    if {p.name for p in fresh.iterdir()} <= {".hydra", *(p.name for p in fresh.glob("*.log"))}:
        shutil.rmtree(fresh)


def resume_command(cfg: DictConfig) -> str:
    """The command that continues this run: the one that ran, with ``resume=true`` and the
    folder named (``hydra.run.dir``, or a sweep's ``hydra.sweep.dir``)."""
    args = [a for a in sys.argv[1:] if not a.lstrip("+").startswith("resume=")]
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        key, folder = "hydra.sweep.dir", Path(HydraConfig.get().sweep.dir)
    else:
        key, folder = "hydra.run.dir", Path(cfg.paths.output_dir)
    if not any(a.startswith(f"{key}=") for a in args):
        args.append(f"{key}={folder.resolve()}")
    return shlex.join(["python", sys.argv[0], *args, "resume=true"])


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
