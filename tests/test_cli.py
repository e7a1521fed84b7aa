"""The real command line in subprocesses: multirun. (W&B offline: tests/test_images.py's tiny
run; 2-process DDP on CPU: tests/test_ddp_training.py's, which check these as well.)"""

from __future__ import annotations

import json

import pytest

from tests.conftest import NO_PROGRESS_BAR, cli, requires_mnist

pytestmark = [requires_mnist, pytest.mark.slow]


def test_multirun_writes_one_directory_per_job_named_by_number_and_values(tmp_path):
    """The default sweep folder (``outputs/multirun/<time>``), as a user gets it: one folder
    holding every job and the sweep's summary.csv (its ``${now:...}`` used to be resolved
    again when each job ended, scattering summaries into later timestamps), and job folders
    named by their number, then the swept values first (dreg.sweep.job_folder)."""
    result = cli("-m", "debug=fast", *NO_PROGRESS_BAR, "estimator=iwae", "seed=0,1",
                 "trainer.max_steps=2", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "multirun").iterdir()
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2
    for seed, job in enumerate(jobs):  # at most 60 characters, the swept seed first
        assert job.startswith(f"{seed}_seed-{seed}_refresh_rate-0_debug-fast_estimator-iwae")
        assert len(job) <= 60
    summary = (sweep / "summary.csv").read_text().splitlines()
    assert [row.split(",")[:2] for row in summary[1:]] == [[job, "completed"] for job in jobs]
    for job in jobs:
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["global_step"] == 2
        assert (sweep / job / ".hydra" / "config.yaml").exists()


# W&B offline without credentials or a prompt, through the command line: the tiny run of
# tests/test_images.py (the same command) checks it with its pictures.
