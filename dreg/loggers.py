"""Loggers that continue the same run on resume, and W&B that never prompts.

A run folder is one run for every logger: ``resume=true`` (or ``ckpt_path``) continues its
``csv/metrics.csv`` with each logged step exactly once, its TensorBoard folder with the events
after the checkpoint hidden, and its W&B run under the same id. ``dreg.run`` calls
:func:`continue_loggers` with the checkpoint's global step before training resumes.

W&B runs come ready for dashboards (:func:`dashboard_fields`): a readable name, the sweep as
their group, the mode as their job type, tags, Hydra's choices in the config, and a summary
holding the best validation log-likelihood and the tested checkpoint's step.
"""

from __future__ import annotations

import csv
import io
import logging
import netrc
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning_fabric.loggers.logger import rank_zero_experiment
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pytorch_lightning.loggers import CSVLogger as LightningCSVLogger
from pytorch_lightning.loggers import Logger
from pytorch_lightning.loggers import TensorBoardLogger as LightningTensorBoardLogger
from pytorch_lightning.loggers import WandbLogger as LightningWandbLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from dreg.checkpointing import load_checkpoint
from dreg.errors import ConfigError
from dreg.files import atomic_write
from dreg.sweep import sweep_dir_of

log = logging.getLogger(__name__)


def hparams_yaml(hparams: dict[str, Any]) -> str:
    """``hparams`` as YAML; a value YAML cannot hold (an object) is recorded by its type name."""
    try:
        return OmegaConf.to_yaml(OmegaConf.create(hparams))
    except (OmegaConfBaseException, ValueError, TypeError):
        safe = {}
        for key, value in hparams.items():
            try:
                yaml.safe_dump(value)
                safe[key] = value
            except yaml.YAMLError:
                safe[key] = type(value).__name__
        return yaml.safe_dump(safe, sort_keys=False)


def logged_before(row: dict[str, str], step: int) -> bool:
    """Whether a run at global step ``step`` had already logged this ``metrics.csv`` row.

    dreg labels every row with the number of updates completed when it is logged: the train
    row of update G, the validation after it and the gradient callbacks' rows of update G all
    have step G (``DReGModule`` logs a ``step`` metric, which Lightning uses as the row's step
    and then adds no ``epoch``). A checkpoint at G is written after all of them, so it holds
    every row with step <= G. Test rows are never kept: a test follows the fit, and a resumed
    run tests again. Rows that carry ``epoch`` come from runs before that labelling, where
    Lightning labelled train and validation rows with the updates completed *before* the one
    they follow: those are kept when step < G.
    """
    if any(key.startswith("test/") and value for key, value in row.items()):
        return False
    row_step = int(row["step"])
    if row.get("epoch"):
        return row_step < step
    return row_step <= step


class MetricsCSV:
    """``metrics.csv`` of one run: rows are appended as they are logged; the file is rewritten
    atomically when a metric adds a column, and when a resumed run drops what the interrupted
    one logged after its checkpoint.

    A fresh run replaces what an earlier run left in the folder at its first write (as
    Lightning does); :meth:`continue_from` keeps it instead. Columns are sorted, as Lightning's.
    """

    NAME_METRICS_FILE = "metrics.csv"
    NAME_HPARAMS_FILE = "hparams.yaml"

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file_path = str(self.log_dir / self.NAME_METRICS_FILE)
        self.metrics: list[dict[str, Any]] = []  # logged, not yet written (Lightning's name)
        self.columns: list[str] = []
        self.hparams: dict[str, Any] = {}
        self._owns_file = False  # False until this run has written or adopted metrics.csv

    @property
    def path(self) -> Path:
        return Path(self.metrics_file_path)

    def log_hparams(self, params: dict[str, Any]) -> None:
        self.hparams.update(params)
        with atomic_write(self.log_dir / self.NAME_HPARAMS_FILE) as f:
            f.write(hparams_yaml(self.hparams))

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if step is None:
            step = len(self.metrics)
        row = {k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()}
        self.metrics.append({**row, "step": step})

    def read(self) -> tuple[list[str], list[dict[str, str]]]:
        """The header and rows on disk. A last line without its newline was torn by a kill
        mid-write, and is dropped."""
        if not self.path.exists():
            return [], []
        text = self.path.read_text()
        if not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
        reader = csv.DictReader(io.StringIO(text))
        return list(reader.fieldnames or []), list(reader)

    def _rewrite(self, columns: list[str], rows: list[dict[str, Any]]) -> None:
        with atomic_write(self.path, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        self.columns = columns

    def save(self) -> None:
        if not self.metrics:
            return
        new = set().union(*self.metrics) - set(self.columns)
        if not self._owns_file or new or not self.path.exists():
            # A new column changes the header: old and new rows go into one new file.
            kept = self.read()[1] if self._owns_file else []
            self._rewrite(sorted(set(self.columns) | new), [*kept, *self.metrics])
            self._owns_file = True
        else:
            with open(self.path, "a", newline="") as f:  # append-only stream
                csv.DictWriter(f, fieldnames=self.columns).writerows(self.metrics)
        self.metrics = []

    def continue_from(self, step: int) -> list[dict[str, str]]:
        """Keep the rows a run at global step ``step`` had logged (see :func:`logged_before`)
        and continue this file; drop the rest, which the resumed run logs again.

        :return: the kept rows at exactly ``step`` (the gradient callbacks' rows), for
            :meth:`TensorBoardLogger.continue_from`.
        """
        _, rows = self.read()
        # Empty cells are metrics a row did not log: dropped, so are columns only later rows had.
        kept = [
            {k: v for k, v in row.items() if v not in ("", None)}
            for row in rows
            if logged_before(row, step)
        ]
        dropped = len(rows) - len(kept)
        columns = sorted(set().union(*kept)) if kept else []
        self._rewrite(columns, kept)
        self._owns_file = True
        if dropped:
            log.info(
                "%s: kept %d rows up to step %d, dropped %d logged after it",
                self.path,
                len(kept),
                step,
                dropped,
            )
        return [row for row in kept if int(row["step"]) == step]


class CSVLogger(LightningCSVLogger):
    """Lightning's CSV logger writing ``<save_dir>/<name>/metrics.csv`` through
    :class:`MetricsCSV`: nothing is deleted, every row reaches the disk when it is logged,
    and a resumed run continues the file."""

    def __init__(self, save_dir: str, name: str = "csv") -> None:
        # version "": no version_N subfolder, one folder per run directory. Each row is
        # written when it is logged (flush every step): a row logged before a checkpoint is on
        # disk when the checkpoint is, whatever kills the run later.
        super().__init__(save_dir, name=name, version="", flush_logs_every_n_steps=1)

    @property
    @rank_zero_experiment
    def experiment(self) -> MetricsCSV:
        if self._experiment is None:
            self._experiment = MetricsCSV(self.log_dir)
        return self._experiment

    @rank_zero_only
    def continue_from(self, step: int) -> list[dict[str, str]]:
        return self.experiment.continue_from(step)


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoard logger that continues its run folder on resume (events after
    the checkpoint are hidden through ``purge_step``) and writes ``hparams.yaml`` atomically."""

    def __init__(self, save_dir: str, name: str = "tensorboard", **kwargs: Any) -> None:
        super().__init__(save_dir, name=name, version="", **kwargs)
        self._hparams_saved = False

    @rank_zero_only
    def log_hyperparams(self, params: Any, metrics: Any = None, step: int | None = None) -> None:
        super().log_hyperparams(params, metrics=metrics, step=step)
        self._hparams_saved = False

    @rank_zero_only
    def continue_from(self, step: int, rows_at_step: Iterable[dict[str, str]] = ()) -> None:
        """Hide the events logged after a checkpoint at global step ``step``.

        ``SummaryWriter(purge_step=G)`` hides every earlier event with step >= G: what the
        resumed run logs again, and also the gradient callbacks' points at exactly G, which it
        does not; those are written again from ``rows_at_step`` (kept ``metrics.csv`` rows).
        """
        if self._experiment is not None:
            self._experiment.close()
            self._experiment = None
        self._kwargs["purge_step"] = step
        for row in rows_at_step:
            metrics = {k: float(v) for k, v in row.items() if k not in ("step", "epoch")}
            self.log_metrics(metrics, step=step)

    @rank_zero_only
    def save(self) -> None:
        if self._experiment is not None:
            self._experiment.flush()
        if not self._hparams_saved:  # Lightning saves on every logging step: write on change
            with atomic_write(Path(self.log_dir) / self.NAME_HPARAMS_FILE) as f:
                f.write(hparams_yaml(dict(self.hparams)))
            self._hparams_saved = True


@rank_zero_only
def continue_loggers(loggers: Iterable[Logger], step: int) -> None:
    """Make every logger continue the run a checkpoint at global step ``step`` came from.

    Call before training resumes, after the trainer (and so the loggers) is built. W&B needs
    nothing here: :func:`wandb_logger` reuses the run folder's W&B id (W&B cannot drop
    points offline, so its history keeps those the interrupted run logged after the
    checkpoint; ``csv/metrics.csv`` is the exact record).
    """
    loggers = list(loggers)
    rows_at_step: list[dict[str, str]] = []
    for logger in loggers:
        if isinstance(logger, CSVLogger):
            rows_at_step = logger.continue_from(step)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.continue_from(step, rows_at_step)
        elif not isinstance(logger, CSVLogger | LightningWandbLogger):
            log.warning(
                "%s cannot continue a run: its history after step %d may repeat; use the "
                "loggers of conf/logger (dreg.loggers)",
                type(logger).__name__,
                step,
            )


def wandb_has_credentials() -> bool:
    """True when an API key is in the environment or in ~/.netrc (``wandb login``)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_run_id(save_dir: str | Path) -> str:
    """The W&B run id of this run folder (``<save_dir>/wandb/run_id``), created on first use,
    so a resumed run continues the same W&B run."""
    path = Path(save_dir) / "wandb" / "run_id"
    if path.exists():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    if rank_zero_only.rank == 0:  # other DDP ranks do not log; only rank 0's id is used
        with atomic_write(path) as f:
            f.write(run_id + "\n")
    return run_id


# -- one W&B mode per process ----------------------------------------------------------------
# Lightning starts an offline run by setting WANDB_MODE=dryrun in os.environ, for the whole
# process and for good: an online run started later in the same process (the next job of a
# packed sweep) would go offline without a word. So the first W&B run of a process fixes the
# mode of every later one: `auto` follows it, another explicit mode is refused.
_process_mode: str | None = None


def wandb_mode(mode: str) -> str:
    """``online`` or ``offline`` for a run configured with ``mode``.

    ``auto``: the mode of this process's earlier W&B runs if any; otherwise offline when
    ``WANDB_MODE`` says so or there are no credentials, online when there are.
    """
    if mode not in ("auto", "online", "offline"):
        raise ValueError(f"logger.mode must be auto, online or offline, got {mode!r}")
    if mode != "auto":
        return mode
    if _process_mode is not None:
        return _process_mode
    if os.environ.get("WANDB_MODE") in ("offline", "dryrun"):
        return "offline"
    return "online" if wandb_has_credentials() else "offline"


def claim_wandb_mode(mode: str) -> None:
    """Fix this process's W&B mode at its first run; refuse a run in the other mode after it."""
    global _process_mode
    if _process_mode is None:
        _process_mode = mode
    elif mode != _process_mode:
        raise ConfigError(
            f"logger.wandb.mode={mode}: this process already logs to W&B {_process_mode} (the "
            "mode is process-wide and packed jobs share one process); give every job of the "
            "sweep the same logger.wandb.mode"
        )


# -- what a dashboard groups, filters and summarizes by ---------------------------------------
# Summaries other than the last value: the best validation log-likelihood, the number the
# tested checkpoint is chosen on (the test numbers themselves are set by summarize_wandb).
SUMMARIES = {"val/log_likelihood": "max"}
STEP_METRIC = "trainer/global_step"  # Lightning's x-axis: dreg's step, updates completed


def hydra_job() -> tuple[dict[str, str], str | None]:
    """This job's config-group choices (Hydra's own left out) and, in a multirun, the name of
    its sweep folder; ``({}, None)`` outside a Hydra app.

    Hydra's config per job is current here in a pack too: :class:`dreg.pack.Pack` swaps it
    with the job's thread, and the logger is built in that thread.
    """
    if not HydraConfig.initialized():
        return {}, None
    hydra = HydraConfig.get()
    choices = {
        str(group): str(option)
        for group, option in hydra.runtime.choices.items()
        if option is not None and str(group).partition("/")[0] != "hydra"
    }
    sweep = sweep_dir_of(hydra).name if hydra.mode == RunMode.MULTIRUN else None
    return choices, sweep


def dashboard_fields(
    num_samples: int | None = None,
    seed: int | None = None,
    train_model: bool = True,
    run_id: str = "",
) -> dict[str, Any]:
    """``wandb.init`` arguments that make runs easy to find, group and compare.

    - ``name``: ``<estimator>-<dataset>-K<K>-seed<seed>``, readable in a legend (the override
      string is not), after the job type when it is not ``train``; a diagnose run has no
      estimator and K (it studies ``mode.estimators`` at ``mode.num_samples``);
    - ``group``: a multirun job's sweep, ``[<experiment>/]<sweep folder>``, so that a sweep's
      runs appear together; a single run is a group of its own (``<name>-<run id>``);
    - ``job_type``: the mode (``train``, ``bias_check``, ``diagnose``), ``inference_only`` when
      a train run trains only the inference network (``train_model=false``);
    - ``tags``: ``estimator:``, ``dataset:``, ``K:``, ``model:`` (those the run has);
    - ``config``: Hydra's choices under ``choices`` (``choices.estimator``...): the composed
      config (logged later, nested) holds only their contents, e.g. an estimator's class.
    """
    choices, sweep = hydra_job()
    estimator, dataset, model = (choices.get(g) for g in ("estimator", "dataset", "model"))
    job_type = choices.get("mode", "train")
    if job_type == "train" and not train_model:
        job_type = "inference_only"
    if job_type == "diagnose":  # it studies the lists mode.estimators and mode.num_samples
        estimator = num_samples = None
    parts = [None if job_type == "train" else job_type, estimator, dataset]
    parts += [f"K{num_samples}"] if num_samples is not None else []
    parts += [f"seed{seed}"] if seed is not None else []
    name = "-".join(p for p in parts if p)
    experiment = choices.get("experiment")
    if sweep is None:
        group = f"{name}-{run_id}" if run_id else name
    else:
        group = f"{experiment}/{sweep}" if experiment else sweep
    tagged = {"estimator": estimator, "dataset": dataset, "K": num_samples, "model": model}
    return {
        "name": name or None,  # None: W&B's own name
        "group": group or None,
        "job_type": job_type,
        "tags": [f"{key}:{value}" for key, value in tagged.items() if value is not None],
        "config": {"choices": choices},
    }


class WandbLogger(LightningWandbLogger):
    """Lightning's W&B logger, whose run claims the process's W&B mode (refused when another
    run of the process logs in the other mode) and keeps the dashboard's summaries."""

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is not None:
            return super().experiment
        claim_wandb_mode("offline" if self._offline else "online")
        if self._wandb_init.get("anonymous") is None:  # Lightning's None: W&B warns of any value
            self._wandb_init.pop("anonymous", None)
        run = super().experiment
        if hasattr(run, "define_metric"):
            for key, summary in SUMMARIES.items():
                run.define_metric(key, step_metric=STEP_METRIC, summary=summary)
        return run


def wandb_logger(
    save_dir: str,
    mode: str = "auto",
    job: dict[str, Any] | None = None,
    tags: Iterable[str] | None = None,
    **kwargs: Any,
) -> WandbLogger:
    """A :class:`WandbLogger` that runs offline, with no prompt, when there are no credentials,
    continues the run folder's W&B run (same id, ``resume="allow"``), and fills in the
    dashboard fields (:func:`dashboard_fields`) that are not given.

    :param mode: ``online``, ``offline`` or ``auto`` (:func:`wandb_mode`). Offline runs are
        saved under ``save_dir/wandb`` and can be uploaded later with ``wandb sync``.
    :param job: what the dashboard fields are made of besides Hydra's choices: ``num_samples``
        (K), ``seed`` and ``train_model``.
    :param kwargs: for ``wandb.init`` (``project``, ``name``, ``group``, ``job_type``...) and
        Lightning's logger; a ``None`` dashboard field is derived.
    """
    mode = wandb_mode(mode)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    kwargs.setdefault("id", wandb_run_id(save_dir))
    fields = dashboard_fields(**dict(job or {}), run_id=kwargs["id"])
    if tags is not None:
        fields["tags"] = [str(tag) for tag in tags]
    for key, value in fields.items():
        if kwargs.get(key) is None:
            kwargs[key] = value
    # create_new: the jobs of a pack (dreg.pack) each keep a W&B run of their own in one
    # process; otherwise Lightning would attach every job to the first one's run.
    kwargs.setdefault("reinit", "create_new")
    return WandbLogger(save_dir=save_dir, offline=mode == "offline", resume="allow", **kwargs)


@rank_zero_only
def summarize_wandb(
    loggers: Iterable[Logger], metrics: dict[str, Any], tested_checkpoint: str | Path | None
) -> None:
    """Put a finished run's record into its W&B summary: the test numbers and the step of the
    weights they come from (``test/checkpoint_step``: the best checkpoint's, else the last
    step), beside the best validation log-likelihood (:data:`SUMMARIES`). ``dreg.run`` calls
    this after testing, so the runs table of a dashboard needs no history scan."""
    runs = [lg.experiment for lg in loggers if isinstance(lg, LightningWandbLogger)]
    if not runs:
        return
    if tested_checkpoint:
        step = int(load_checkpoint(tested_checkpoint)["global_step"])
    else:
        step = int(metrics["global_step"])
    summary = {k: v for k, v in metrics.items() if k.startswith("test/")}
    summary |= {
        "test/checkpoint_step": step,
        "test/checkpoint": str(metrics.get("tested_checkpoint", "")),
        "global_step": metrics["global_step"],
        "train_seconds": metrics["train_seconds"],
    }
    for run in runs:
        run.summary.update(summary)


@rank_zero_only
def finish_wandb(loggers: Iterable[Logger]) -> None:
    """Close the W&B runs (Lightning leaves them open), which flushes their summaries; an
    offline run's log line names the ``wandb sync`` command that uploads it. Rank 0 only: the
    other ranks' loggers hold no run.

    Each segment of a resumed offline run is a folder of its own, ``<run dir>/wandb/offline-
    run-<time>-<id>``, with the same id and the resume recorded. Synced together, W&B uploads
    them in the order they started as one run whose steps continue; synced alone, a segment
    could be uploaded before the one it continues. So the command names them all.
    """
    for logger in loggers:
        if isinstance(logger, LightningWandbLogger):
            segments = Path(logger.experiment.dir).parent.parent
            logger.experiment.finish()
            if logger._offline:
                log.info("W&B run saved offline; upload it with: wandb sync %s", segments)
