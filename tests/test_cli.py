"""The real command line in subprocesses: multirun, W&B offline. (2-process DDP on CPU through
the command line: tests/test_ddp_training.py, whose run checks the run folder as well.)"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.conftest import NO_PROGRESS_BAR, TINY_RUN, cli, requires_mnist

pytestmark = [requires_mnist, pytest.mark.slow]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real command line, which must succeed."""
    result = cli(*args, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


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


def test_wandb_logger_runs_offline_without_credentials_or_prompt(tmp_path):
    home = tmp_path / "home"  # no ~/.netrc, no API key: must go offline, never prompt
    home.mkdir()
    env = {"HOME": str(home), "WANDB_API_KEY": "", "WANDB_MODE": "", "WANDB_DIR": ""}
    overrides = [o for o in TINY_RUN if not o.startswith("logger=")]
    result = run_cli("logger=wandb", f"hydra.run.dir={tmp_path}/run", *overrides, env=env)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "run").iterdir())
    (record_file,) = runs[0].glob("*.wandb")  # what `wandb sync` uploads
    records = record_file.read_bytes()
    # History values are stored as JSON text after the key (protobuf field 16, length-prefixed).
    logged = [float(v) for v in re.findall(rb"test/log_likelihood\x82\x01.(-?[0-9.e+-]+)", records)]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test/log_likelihood"] in logged
    assert b"train/objective" in records
    assert "wandb sync" in result.stdout + result.stderr
