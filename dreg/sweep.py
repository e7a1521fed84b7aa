"""Hydra callback: a multirun's ``summary.csv``, kept current as each job ends.

A failing job must not lose the others' results. Hydra runs every job of a sweep and records
a failure in that job's return value; this callback writes the job's ``status.json`` (for a
failure: the error) and rewrites ``<sweep dir>/summary.csv`` from every job directory, so the
summary is complete whichever job ends last, with any launcher (local, joblib, SLURM).
"""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from dreg.files import atomic_write

# -- job folder names ---------------------------------------------------------------------------
JOB_FOLDER_CHARS = re.compile(r"[^A-Za-z0-9._-]+")  # what pastes unquoted into an override
OVERRIDE_START = re.compile(r",(?=[+~]*[A-Za-z_][\w.@/-]*=)")  # a comma that starts an override
JOB_FOLDER_LENGTH = 60


def job_folder(num: int, override_dirname: str, sweep_dir: str | None = None) -> str:
    """A multirun job's folder: its number, then its overrides in short, e.g.
    ``3_estimator-dreg_iwae_seed-1`` for ``estimator=dreg_iwae,seed=1``.

    Hydra's own ``override_dirname`` has ``=`` and ``,`` (a path into it must be quoted to
    be an override: ``ckpt_path=<job>/checkpoints/last.ckpt``) and grows past file-name
    limits. Here each key keeps its last part, every other character than ``[A-Za-z0-9._-]``
    becomes ``_`` and the name stops at 60 characters. The keys the sweep varies (read from
    ``<sweep_dir>/multirun.yaml``, which Hydra writes before any job) come first, so the cut
    never hides what tells the jobs apart. The number makes it unique and the same for the
    same command (``resume=true`` is not in ``override_dirname``); the full overrides are in
    ``<job>/.hydra/overrides.yaml``.
    """
    items = []
    for override in OVERRIDE_START.split(override_dirname) if override_dirname else []:
        key, _, value = override.partition("=")
        items.append((key, value))
    swept = swept_keys(Path(sweep_dir)) if sweep_dir else set()
    items.sort(key=lambda item: item[0].lstrip("+~") not in swept)  # stable: swept first
    short = [
        "-".join(JOB_FOLDER_CHARS.sub("_", part).strip("_") for part in (k.split(".")[-1], v))
        for k, v in items
    ]
    return "_".join([str(num), *short])[:JOB_FOLDER_LENGTH].rstrip("._-")


def swept_keys(sweep_dir: Path) -> set[str]:
    """The keys a sweep varies (``a=1,2``, ``range(...)``, ``choice(...)``), from the
    command's overrides in ``<sweep_dir>/multirun.yaml``; none when it is not there (yet)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        task = OmegaConf.load(sweep_dir / "multirun.yaml").hydra.overrides.task
        overrides = OverridesParser.create().parse_overrides(list(task))
    except Exception:  # no such file, or not a Hydra multirun record: the plain order
        return set()
    return {o.key_or_group for o in overrides if o.is_sweep_override()}


# conf/hydra/default.yaml names job folders with it; Hydra's callbacks import this module in
# every process that starts a job (the launcher's workers unpickle this callback).
OmegaConf.register_new_resolver("dreg.job_folder", job_folder, replace=True)

def sweep_dir_of(hydra_cfg: Any) -> Path:
    """The sweep folder of a multirun job, from its own folder (``hydra.runtime.output_dir``,
    set once when the job starts). Not ``hydra.sweep.dir``: its default holds ``${now:...}``,
    which a job's copy of the config resolves again, later, to another folder."""
    job_dir = Path(str(hydra_cfg.runtime.output_dir))
    try:
        depth = len(Path(str(hydra_cfg.sweep.subdir)).parts)
    except Exception:  # an interpolation this copy cannot resolve: our folders are flat
        depth = 1
    return job_dir.parents[max(depth, 1) - 1]


SUMMARY_METRICS = (
    "test/log_likelihood",
    "test/bound",
    "train/objective",
    "global_step",
    "train_seconds",
)


def job_row(job_dir: Path, sweep_dir: Path) -> dict[str, Any]:
    status = {}
    if (job_dir / "status.json").exists():
        status = json.loads((job_dir / "status.json").read_text())
    metrics = {}
    if (job_dir / "metrics.json").exists():
        metrics = json.loads((job_dir / "metrics.json").read_text())
    row = {
        "job": str(job_dir.relative_to(sweep_dir)),
        "status": status.get("status", "running"),
        "error": status.get("error", ""),
    }
    row.update({key: metrics.get(key, "") for key in SUMMARY_METRICS})
    return row


def write_summary(sweep_dir: Path) -> Path:
    """Rewrite ``summary.csv`` from every job directory (those holding ``.hydra``)."""
    jobs = sorted(p.parent for p in sweep_dir.glob("**/.hydra") if p.parent != sweep_dir)
    rows = [job_row(job, sweep_dir) for job in jobs]
    target = sweep_dir / "summary.csv"
    with atomic_write(target, newline="") as f:  # concurrent jobs never leave a torn file
        writer = csv.DictWriter(f, fieldnames=["job", "status", "error", *SUMMARY_METRICS])
        writer.writeheader()
        writer.writerows(rows)
    return target


# The sweeps this process launched, with when each began: train.py reports their failed jobs.
_launched: list[tuple[Path, float]] = []


def failed_jobs(sweep_dir: Path, since: float = 0.0) -> list[dict[str, Any]]:
    """The rows of the jobs of ``sweep_dir`` that failed, recorded at or after ``since``."""
    jobs = sorted(p.parent for p in sweep_dir.glob("**/.hydra") if p.parent != sweep_dir)
    failed = []
    for job in jobs:
        status = job / "status.json"
        if status.exists() and status.stat().st_mtime >= since:
            row = job_row(job, sweep_dir)
            if row["status"] == "failed":
                row["exit_code"] = json.loads(status.read_text()).get("exit_code", 1)
                failed.append(row)
    return failed


def failure_report() -> str | None:
    """One line naming the failed jobs of the sweeps this process launched (``None``: none
    failed): their folders, exit codes, the first one's error, and where the rest is."""
    for sweep_dir, started in _launched:
        failed = failed_jobs(sweep_dir, started)
        if not failed:
            continue
        total = len([p for p in sweep_dir.glob("**/.hydra") if p.parent != sweep_dir])
        shown = ", ".join(f"{r['job']} (exit {r['exit_code']})" for r in failed[:5])
        more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
        return (
            f"{len(failed)} of {total} jobs of the sweep {sweep_dir} failed: {shown}{more}; "
            f"first error: {failed[0]['error']}; every job's status: {sweep_dir}/summary.csv"
        )
    return None


class SweepSummary(Callback):
    """Registered in ``conf/hydra/default.yaml``; does nothing for single runs."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # A second earlier: file times are coarse on some file systems.
        _launched.append((Path(str(config.hydra.sweep.dir)), time.time() - 1.0))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        hydra_cfg = job_return.hydra_cfg.hydra if job_return.hydra_cfg else None
        if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN:
            return
        # Each job records its own status.json (dreg.run.main), failures included.
        write_summary(sweep_dir_of(hydra_cfg))
