"""Loggers that continue the same run on resume, and W&B that never prompts.

A run folder is one run for every logger: ``resume=true`` (or ``ckpt_path``) continues its
``csv/metrics.csv`` with each logged step exactly once, its TensorBoard folder with the events
after the checkpoint hidden, and its W&B run under the same id. ``dreg.run`` calls
:func:`continue_loggers` with the checkpoint's global step before training resumes.
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
from lightning_fabric.loggers.logger import rank_zero_experiment
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pytorch_lightning.loggers import CSVLogger as LightningCSVLogger
from pytorch_lightning.loggers import Logger, WandbLogger
from pytorch_lightning.loggers import TensorBoardLogger as LightningTensorBoardLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from dreg.files import atomic_write

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
        elif not isinstance(logger, CSVLogger | WandbLogger):
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


def wandb_logger(save_dir: str, mode: str = "auto", **kwargs) -> WandbLogger:
    """A :class:`WandbLogger` that runs offline, with no prompt, when there are no credentials,
    and continues the run folder's W&B run (same id, ``resume="allow"``).

    :param mode: ``online``, ``offline`` or ``auto`` (online only with credentials). Offline
        runs are saved under ``save_dir/wandb`` and can be uploaded later with ``wandb sync``.
    """
    if mode not in ("auto", "online", "offline"):
        raise ValueError(f"logger.mode must be auto, online or offline, got {mode!r}")
    if mode == "auto":
        mode = "online" if wandb_has_credentials() else "offline"
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    kwargs.setdefault("id", wandb_run_id(save_dir))
    # create_new: the jobs of a pack (dreg.pack) each keep a W&B run of their own in one
    # process; otherwise Lightning would attach every job to the first one's run.
    kwargs.setdefault("reinit", "create_new")
    return WandbLogger(save_dir=save_dir, offline=mode == "offline", resume="allow", **kwargs)
