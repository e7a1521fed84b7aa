"""Run records through the real CLI: what a user sees after kills, re-runs, sweeps and bad input.

Each test runs ``train.py`` in a subprocess at a tiny size and checks what a user would check:
exit codes, the one-line message, ``status.json``, ``metrics.json``, folders and summary rows.
Where a test checks several variants of one refusal, one variant goes through the real command
line (its one-line ``error: ...`` and exit code) and the others call :func:`dreg.run.main`,
what ``train.py`` runs, in process: the same error, code and ``status.json`` without another
few seconds of importing Lightning each. Tests that only read a finished run share one
(:func:`finished`); those that change it work on a copy.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dreg.checkpointing import load_checkpoint
from dreg.errors import EXIT_PREEMPTED, RunError
from dreg.run import main
from tests.conftest import (
    ROOT,
    TINY_RUN,
    cli,
    compose_config,
    error_line,
    requires_mnist,
    start_cli,
    wait_for,
)

pytestmark = [requires_mnist, pytest.mark.slow]

SMALL = ["model.net.hidden_dims=[16]", "model.net.latent_dim=4", "model.num_samples=4"]
RUN = [*TINY_RUN, *SMALL]


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def run_in_process(run_dir: Path, *overrides: str) -> dict:
    """What ``train.py *RUN *overrides hydra.run.dir=run_dir`` runs, in this process."""
    return main(compose_config([*RUN, *overrides], run_dir))


def refused_in_process(run_dir: Path, *overrides: str) -> RunError:
    """The expected error :func:`run_in_process` raises; ``train.py`` prints ``error: `` and
    its message, and exits with its code (as the command-line variants check)."""
    with pytest.raises(RunError) as raised:
        run_in_process(run_dir, *overrides)
    assert "\n" not in str(raised.value), str(raised.value)  # one line
    return raised.value


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 4-step run through the real command line, for the tests that only read it
    (the others copy it first)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = cli(*RUN, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


def copy_of(run_dir: Path, where: Path) -> Path:
    shutil.copytree(run_dir, where)
    return where


# -- run-folder guard and lock (item 6) -----------------------------------------------------
def test_rerun_into_a_used_folder_is_refused_and_changes_nothing(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path / "run")
    metrics = (run_dir / "metrics.json").read_text()
    config = (run_dir / ".hydra" / "config.yaml").read_text()

    result = cli(*RUN, "seed=5", f"hydra.run.dir={run_dir}")
    assert result.returncode == 7
    assert "already holds a run (completed); continue it with resume=true" in error_line(result)
    assert (run_dir / "metrics.json").read_text() == metrics
    assert (run_dir / ".hydra" / "config.yaml").read_text() == config  # Hydra's rewrite undone
    assert status(run_dir)["status"] == "completed"


def test_a_second_live_run_in_the_same_folder_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    first = start_cli(*RUN, "trainer.max_steps=100000", "trainer.val_check_interval=100000",
                  f"hydra.run.dir={run_dir}")  # fmt: skip
    try:
        wait_for(run_dir / "csv" / "metrics.csv", first)
        # The second run in process: the folder's lock is the first process's, held live.
        # (A refused rerun's exit code 7 on the command line: the test above.)
        err = refused_in_process(run_dir, "resume=true")
        assert err.exit_code == 7
        assert f"in use by a live run (pid {first.pid})" in str(err)
        assert status(run_dir)["status"] == "running"
    finally:
        first.kill()
        first.communicate()


# -- preemption: exit code, status from one step, cumulative time (item 9) ------------------
def test_preempted_run_records_one_step_and_resume_accumulates_time(tmp_path):
    run_dir = tmp_path / "run"
    extra = ["trainer.max_steps=60", "trainer.val_check_interval=10", "logger=csv",
             "callbacks=estimator_compare", "callbacks.estimator_compare.log_every_n_steps=1",
             "callbacks.estimator_compare.estimators=[iwae,dreg_iwae]"]  # fmt: skip
    args = [*RUN, *extra]
    proc = start_cli(*args, f"hydra.run.dir={run_dir}")
    wait_for(run_dir / "checkpoints" / "best-step10.ckpt", proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("error: preempted at step")
    preempted = status(run_dir)
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert preempted["status"] == "preempted"
    assert preempted["global_step"] == checkpoint["global_step"]  # one step, one record
    assert not any(k.startswith(("train/", "val/")) for k in preempted)  # no stale values
    compare = [v for k, v in checkpoint["callbacks"].items() if "EstimatorComparison" in k]
    assert compare and compare[0]["iwae"]["steps"] == checkpoint["global_step"]

    # The resume in process (the command line's resume of a killed run: tests/test_journeys.py).
    run_in_process(run_dir, *extra, "resume=true")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 60
    assert metrics["train_seconds"] > preempted["train_seconds"]  # both segments counted
    assert metrics["tested_checkpoint"].startswith("checkpoints/")  # relative to the run
    assert status(run_dir)["status"] == "completed"
    final = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    (ema,) = [v for k, v in final["callbacks"].items() if "EstimatorComparison" in k]
    assert ema["iwae"]["steps"] == 60  # the comparison's averages continued across the resume


# -- resume checks (item 5) -----------------------------------------------------------------
def test_resume_under_another_experiment_is_refused_with_the_differences(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path / "run")
    resume = ["resume=true", "trainer.max_steps=6"]
    result = cli(*RUN, "estimator=dreg_iwae", f"hydra.run.dir={run_dir}", *resume)
    assert result.returncode == 5, result.stderr[-2000:]
    assert "estimator._target_: dreg.estimators.IWAE -> " in error_line(result)
    assert status(run_dir)["status"] == "completed"  # the refused attempt changed nothing
    for override, shown in [  # the other differences, in process
        ("model.num_samples=2", "model.num_samples: 4 -> 2"),
        ("dataset=omniglot", "dataset._target_"),
    ]:
        err = refused_in_process(run_dir, override, *resume)
        assert err.exit_code == 5
        assert shown in str(err)
        assert status(run_dir)["status"] == "completed"
    run_in_process(run_dir, "estimator=dreg_iwae", *resume, "resume_allow_changes=true")
    assert status(run_dir)["status"] == "completed"
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 6


# In process, a warning fails the test; this one is what starting from another run's checkpoint
# is expected to say (the command line prints it).
@pytest.mark.filterwarnings("ignore:The dirpath has changed from:UserWarning")
def test_resume_continues_its_own_checkpoint_not_the_one_it_started_from(finished, tmp_path):
    origin, run_dir = finished, tmp_path / "run"  # origin: 4 steps
    start_from = f"ckpt_path={origin / 'checkpoints' / 'last.ckpt'}"
    run_in_process(run_dir, start_from, "trainer.max_steps=8")  # the run started from it
    # The README's recipe: the same command plus resume=true (and a longer budget).
    result = cli(*RUN, start_from, "trainer.max_steps=10", f"hydra.run.dir={run_dir}",
                 "resume=true")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    log = (run_dir / "train.log").read_text()
    assert f"Restoring states from the checkpoint path at {run_dir / 'checkpoints'}" in log
    with (run_dir / "csv" / "metrics.csv").open() as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/objective")]
    assert max(steps) == 10 and min(steps) > 4  # never restarted from the origin's step 4


# -- sweeps (item 2) ------------------------------------------------------------------------
def summary(sweep_dir: Path) -> dict[str, dict]:
    with (sweep_dir / "summary.csv").open() as f:
        return {row["job"]: row for row in csv.DictReader(f)}


# Every task override is part of a job's folder name (in short): a sweep keeps them few.
SWEEP = ["debug=fast", "model.num_samples=4"]


def test_swept_step_budgets_get_their_own_folders(tmp_path):
    result = cli("-m", *SWEEP, "trainer.max_steps=3,5", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = summary(tmp_path)
    # The job number, then the swept value first, then the other overrides in short.
    names = [f"{i}_max_steps-{n}_debug-fast_num_samples-4" for i, n in ((0, 3), (1, 5))]
    assert sorted(rows) == names
    assert [int(rows[j]["global_step"]) for j in sorted(rows)] == [3, 5]
    assert not list(tmp_path.glob("*/checkpoints/last-v1.ckpt"))


def test_a_sweep_rerun_with_resume_keeps_finished_jobs_and_finishes_the_rest(tmp_path):
    args = ["-m", *SWEEP, "trainer.max_steps=30", "seed=0,1,2", f"hydra.sweep.dir={tmp_path}"]
    job = {s: f"{s}_seed-{s}_debug-fast_num_samples-4_max_steps-30" for s in range(3)}
    sweep = start_cli(*args)
    wait_for(tmp_path / job[1] / "checkpoints" / "best-step10.ckpt", sweep)
    sweep.send_signal(signal.SIGTERM)  # job seed=1 is preempted; seed=2 never starts
    _, stderr = sweep.communicate(timeout=240)
    assert sweep.returncode == EXIT_PREEMPTED, stderr[-2000:]
    rows = summary(tmp_path)
    assert rows[job[0]]["status"] == "completed" and rows[job[1]]["status"] == "preempted"
    assert not (tmp_path / job[2]).exists()
    finished = (tmp_path / job[0] / "metrics.json").read_text()

    result = cli(*args, "resume=true")
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert jobs == [job[0], job[1], job[2]]
    rows = summary(tmp_path)
    assert len(rows) == 3 and all(r["status"] == "completed" for r in rows.values())
    assert all(int(r["global_step"]) == 30 for r in rows.values())
    assert (tmp_path / job[0] / "metrics.json").read_text() == finished  # kept, not retrained
    log = (tmp_path / job[1] / "train.log").read_text()
    assert "Restoring states from the checkpoint path" in log  # continued, not restarted


# -- safe loading and one-line errors (items 4 and 7) ---------------------------------------
class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_checkpoint_runs_nothing(tmp_path):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Exploit(marker)}, evil)
    refusal = "holds objects that are not allowed in a dreg checkpoint"
    use = ["estimator=dreg_iwae", f"ckpt_path={evil}"]
    result = cli(*RUN, "mode=train", *use, f"hydra.run.dir={tmp_path / 'mode-train'}")
    assert result.returncode == 4, result.stderr[-2000:]
    assert refusal in error_line(result)
    assert not marker.exists()
    for mode in ("mode=diagnose", "mode=bias_check"):  # the other modes' loads, in process
        err = refused_in_process(tmp_path / mode.replace("=", "-"), mode, *use)
        assert err.exit_code == 4 and refusal in str(err), mode
        assert not marker.exists()


NOT_A_CHECKPOINT = "is not a checkpoint (not a PyTorch archive: a wrong path?)"
EXPECTED_ERRORS = {
    "not-a-checkpoint": (["ckpt_path=train.py"], 4, NOT_A_CHECKPOINT),
    "missing-checkpoint": (["ckpt_path=missing.ckpt"], 4, "checkpoint missing.ckpt not found"),
    "non-finite": (["model.optimizer.lr=1e30", "trainer.max_steps=20"], 6, "non-finite"),
    "data": (["paths.data_dir=/nonexistent-data", "dataset.download=false"], 3, "not found"),
}


def test_an_expected_error_on_the_command_line_is_one_line_with_its_exit_code(tmp_path):
    """train.py's printing of an expected error; every case's error and code: the next test."""
    overrides, code, message = EXPECTED_ERRORS["not-a-checkpoint"]
    result = cli(*RUN, *overrides, f"hydra.run.dir={tmp_path}")
    assert result.returncode == code, result.stderr[-2000:]
    line = error_line(result)
    assert message in line and "delete" not in line
    assert status(tmp_path) == {"status": "failed", "error": line[7:], "exit_code": code}


@pytest.mark.parametrize("case", list(EXPECTED_ERRORS))
def test_expected_errors_are_one_line_with_their_exit_code(tmp_path, monkeypatch, case):
    overrides, code, message = EXPECTED_ERRORS[case]
    monkeypatch.chdir(ROOT)  # relative paths as from the command line above
    err = refused_in_process(tmp_path, *overrides)
    assert err.exit_code == code
    line = str(err)
    assert message in line and "delete" not in line
    assert status(tmp_path) == {"status": "failed", "error": line, "exit_code": code}


def test_wrong_model_shape_in_a_checkpoint_is_one_line(finished, tmp_path):
    err = refused_in_process(tmp_path / "run", "model.net.hidden_dims=[8]", "train_model=false",
                             f"ckpt_path={finished / 'checkpoints' / 'last.ckpt'}")  # fmt: skip
    assert err.exit_code == 4
    assert "holds a model of another shape" in str(err)


def test_traceback_on_request(tmp_path):
    result = cli(*RUN, "ckpt_path=train.py", f"hydra.run.dir={tmp_path}",
                 env={"DREG_TRACEBACK": "1", "HYDRA_FULL_ERROR": "1"})  # fmt: skip
    assert result.returncode != 0 and "Traceback" in result.stderr


# -- logging from the first run on (items 8, 9) ---------------------------------------------
# Lightning's warning that a 4-step epoch logs nothing at log_every_n_steps=50: what is tested.
@pytest.mark.filterwarnings("ignore:The number of training batches")
def test_short_runs_log_a_training_curve_and_steps_agree_with_checkpoints(tmp_path):
    run_in_process(tmp_path, "trainer.max_steps=6", "trainer.log_every_n_steps=50",
                   "trainer.val_check_interval=3")  # fmt: skip
    with (tmp_path / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r.get("train/objective")] == [6]
    val_steps = [int(r["step"]) for r in rows if r.get("val/log_likelihood")]
    assert val_steps == [3, 6]
    best = sorted(p.name for p in (tmp_path / "checkpoints").glob("best-step*.ckpt"))
    assert {f"best-step{s}.ckpt" for s in val_steps} >= set(best)


@pytest.mark.filterwarnings("ignore:The number of training batches")
def test_a_run_stopped_between_rows_records_its_last_step(tmp_path):
    """Training metrics are logged for the logger's rows only (and a shown progress bar):
    the row Lightning writes when a callback stops the run (max_time) holds that call's
    values under its own step, and metrics.json the last step's."""
    run_in_process(tmp_path, "trainer.max_steps=20", "trainer.log_every_n_steps=5",
                   "model.steps_per_call=4", "trainer.val_check_interval=5",
                   "+callbacks.stop._target_=tests.conftest.StopAtStep",
                   "+callbacks.stop.step=7")  # fmt: skip
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["global_step"] == 9  # groups of 4 and 1 (cut at rows): steps 4, 5, 9
    with (tmp_path / "csv" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/objective")]
    assert [int(r["step"]) for r in rows] == [5, 9]  # the last row is not step 5's again
    for key in ("train/objective", "train/iwae_bound"):
        assert float(rows[1][key]) != float(rows[0][key])
        assert metrics[key] == pytest.approx(float(rows[1][key]), rel=1e-6)


# -- diagnostics need no source tree (item 9) -----------------------------------------------
def test_diagnostics_run_from_a_copied_package_and_any_folder(tmp_path):
    site, app, elsewhere = tmp_path / "site", tmp_path / "app", tmp_path / "elsewhere"
    shutil.copytree(ROOT / "dreg", site / "dreg", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "conf", app / "conf")
    shutil.copy(ROOT / "train.py", app / "train.py")
    elsewhere.mkdir()
    result = subprocess.run(
        [sys.executable, str(app / "train.py"), *RUN, "mode=diagnose",
         "mode.num_samples=[1,2]", "mode.estimators=[iwae,jvi]", "mode.num_draws=3",
         "mode.batch_size=4", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=elsewhere, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(site)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "snr_vs_k.csv").exists()
