"""Hydra callback: a multirun's ``summary.csv``, kept current as each job ends.

A failing job must not lose the others' results. Hydra runs every job of a sweep and records
a failure in that job's return value; this callback writes the job's ``status.json`` (for a
failure: the error) and rewrites ``<sweep dir>/summary.csv`` from every job directory, so the
summary is complete whichever job ends last, with any launcher (local, joblib, SLURM).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from dreg.files import atomic_write

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


class SweepSummary(Callback):
    """Registered in ``conf/hydra/default.yaml``; does nothing for single runs."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        hydra_cfg = job_return.hydra_cfg.hydra if job_return.hydra_cfg else None
        if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN:
            return
        # Each job records its own status.json (dreg.run.main), failures included.
        write_summary(Path(hydra_cfg.sweep.dir))
