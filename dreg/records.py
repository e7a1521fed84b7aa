"""A run folder's records: who may write there, what state the run is in, what it was.

* **Guard.** A folder that holds another run's records (checkpoints, metrics, logs, or a
  status other than a failure before training) is refused without ``resume=true``: re-running
  into it would overwrite its metrics and logs while ``last.ckpt`` kept the old weights. Hydra
  rewrites ``.hydra/`` before any of our code runs, so a refused start puts back the copy of
  the accepted run's ``.hydra`` files kept in ``.hydra/accepted/``.
* **Lock.** An exclusive ``flock`` on ``<run dir>/.lock`` for the life of the process: a second
  live run in the same folder is refused (the kernel drops the lock when a process dies, even
  by SIGKILL, so a killed run never leaves a stale lock).
* **Status.** ``status.json`` is ``running``, ``completed``, ``preempted`` or ``failed`` (with
  the one-line error and exit code), written atomically.
* **Compatibility.** Checkpoints carry the config of the experiment that wrote them
  (:func:`experiment_config`); resuming under a different definition is refused with one line
  listing the differences (:func:`check_resume_compatible`), unless ``resume_allow_changes``.
* **The run to continue.** ``resume=true`` without a run folder continues the latest
  interrupted run of the same experiment among its sibling folders
  (:func:`latest_interrupted_run`).

Only the main process of a run claims its folder: the ranks that Lightning's DDP launcher
starts later carry ``LOCAL_RANK``/``NODE_RANK`` > 0 and write nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dreg.errors import ResumeMismatchError, RunFolderError
from dreg.files import write_json

# What a run that got past set-up leaves behind (Hydra's .hydra/ and *.log never count).
RECORDS = ("checkpoints", "metrics.json", "csv", "tensorboard", "wandb", "images")
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")


def is_main_process() -> bool:
    """False in the processes Lightning's DDP launcher starts for ranks > 0."""
    return all(int(os.environ.get(key, 0)) == 0 for key in ("LOCAL_RANK", "NODE_RANK"))


class RunFolder:
    """The output folder of one run (``paths.output_dir``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_file: Any = None

    @property
    def status(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def has_records(self) -> bool:
        """Whether another run already wrote results here."""
        if self.status.get("status") in ("running", "completed", "preempted"):
            return True
        return any(
            (self.path / name).exists() and not _empty_dir(self.path / name) for name in RECORDS
        )

    def claim(self, resume: bool) -> None:
        """Lock the folder for this process; refuse a used folder unless resuming."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.path / ".lock", "a+")  # noqa: SIM115 - held until exit
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip() or "unknown"
            self._lock_file.close()
            self._lock_file = None
            raise RunFolderError(
                f"run folder {self.path} is in use by a live run (pid {holder}); wait for it "
                "to finish or choose another folder (hydra.run.dir=...)"
            ) from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(str(os.getpid()))
        self._lock_file.flush()
        accepted = self.path / ".hydra" / "accepted"
        if self.has_records() and not resume:
            self._restore_hydra_files(accepted)
            self.release()
            state = self.status.get("status", "results")
            raise RunFolderError(
                f"run folder {self.path} already holds a run ({state}); continue it with "
                "resume=true, or start a new run in another folder (hydra.run.dir=... or a new "
                "hydra.sweep.dir)"
            )
        self._keep_hydra_files(accepted)

    def release(self) -> None:
        """Give up the lock (also done by the kernel when the process ends)."""
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def _keep_hydra_files(self, accepted: Path) -> None:
        source = self.path / ".hydra"
        if not source.is_dir():
            return
        accepted.mkdir(exist_ok=True)
        for name in HYDRA_FILES:
            if (source / name).exists():
                shutil.copy2(source / name, accepted / name)

    def _restore_hydra_files(self, accepted: Path) -> None:
        for name in HYDRA_FILES:
            if (accepted / name).exists():
                shutil.copy2(accepted / name, self.path / ".hydra" / name)

    def write_status(self, status: str, **fields: Any) -> None:
        write_json(self.path / "status.json", {"status": status, **fields})


def _empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


# -- resume compatibility -------------------------------------------------------------------
# The config groups that define an experiment; within them, the keys that cannot change what
# is trained (where data live, evaluation batch sizes and sample counts, compilation).
EXPERIMENT_GROUPS = ("dataset", "model", "estimator", "seed", "train_model")
# The one list of config keys (and key prefixes, ending in ".") that cannot change a run's
# numbers: where files go, how progress is shown and logged, resuming (exact), and how the
# same steps are executed. dreg.report groups runs without them; a resume may change them.
NO_EFFECT = (
    "paths.",
    "logger.",
    "hydra.",
    "resume",
    "ckpt_path",
    "optimized_metric",
    "dataset.data_dir",
    "dataset.prepared_path",
    "dataset.cache_dir",
    "dataset.download",
    "dataset.verify",
    "dataset.num_workers",
    "callbacks.progress_bar.",
    "callbacks.model_checkpoint.dirpath",
    "callbacks.preemption.",
    "callbacks.grad_stats.log_every_n_steps",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "model.compile",  # same numbers as eager
    "model.steps_per_call",  # bitwise the same training (dreg.grouped_step)
    "model.cuda_graph",  # the same step, replayed
    "model.optimizer.fused",  # the same update, to float round-off
    "model.optimizer.foreach",
)
# Keys that change what evaluation reports, or what a fault does, but not the training of a
# healthy run: a resume may change them; reports keep them apart.
EVALUATION_ONLY = (
    "dataset.eval_batch_size",
    "dataset.eval_subset",
    "model.eval_num_samples",
    "model.eval_chunk_size",
    "model.nonfinite",
)


def has_no_effect(key: str, extra: tuple[str, ...] = ()) -> bool:
    """Whether ``key`` is one of :data:`NO_EFFECT` (or ``extra``), as a key or under a prefix."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in NO_EFFECT + extra)


def experiment_config(cfg: DictConfig) -> dict[str, Any]:
    """The flattened, resolved keys of ``cfg`` that define the experiment."""
    flat: dict[str, Any] = {}
    for group in EXPERIMENT_GROUPS:
        if group not in cfg:
            continue
        value = cfg[group]
        if isinstance(value, DictConfig):
            _flatten(OmegaConf.to_container(value, resolve=True), group, flat)
        else:
            flat[group] = value
    return {k: v for k, v in flat.items() if not has_no_effect(k, EVALUATION_ONLY)}


def _flatten(tree: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(tree, dict):
        for key, value in tree.items():
            _flatten(value, f"{prefix}.{key}", out)
    else:
        out[prefix] = tree


def experiment_differences(saved: dict[str, Any], cfg: DictConfig) -> list[str]:
    """Every defining key whose value differs between ``saved`` and ``cfg``, as ``key: a -> b``."""
    now = experiment_config(cfg)
    return [
        f"{key}: {saved.get(key, '<absent>')} -> {now.get(key, '<absent>')}"
        for key in sorted(set(saved) | set(now))
        if saved.get(key) != now.get(key)
    ]


def check_resume_compatible(saved: dict[str, Any] | None, cfg: DictConfig, ckpt: Path) -> None:
    """Raise :class:`ResumeMismatchError` listing every defining key that differs."""
    if saved is None or cfg.get("resume_allow_changes"):
        return
    changed = experiment_differences(saved, cfg)
    if changed:
        raise ResumeMismatchError(
            f"checkpoint {ckpt} was written by a different experiment ({'; '.join(changed)}); "
            "resume with the original settings, start a new run folder, or pass "
            "resume_allow_changes=true to continue anyway"
        )


# -- the run that resume=true continues -----------------------------------------------------
# A run stopped before its end that can go on: preempted, or failed with a last.ckpt.
INTERRUPTED = ("preempted", "failed")


def latest_interrupted_run(parent: Path, cfg: DictConfig) -> Path | None:
    """The run folder directly under ``parent`` interrupted last (by its ``status.json``) whose
    experiment is ``cfg``'s, or ``None``.

    The experiment is read from the folder's ``.hydra/config.yaml`` rather than its checkpoint:
    no checkpoint is loaded, and a run whose ``last.ckpt`` is damaged is still found (its
    resume then names the way out).
    """
    found = []
    for folder in parent.iterdir() if parent.is_dir() else ():
        record = folder / "status.json"
        if (folder / "checkpoints" / "last.ckpt").is_file() and record.is_file():
            if RunFolder(folder).status.get("status") in INTERRUPTED:
                found.append((record.stat().st_mtime, folder))
    for _, folder in sorted(found, reverse=True):
        if _same_experiment(folder, cfg):
            return folder
    return None


def _same_experiment(folder: Path, cfg: DictConfig) -> bool:
    try:
        saved = OmegaConf.load(folder / ".hydra" / "config.yaml")
        return not experiment_differences(experiment_config(saved), cfg)
    except (OSError, OmegaConfBaseException):  # no or an unreadable config: not this run's
        return False
