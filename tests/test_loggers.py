"""Every logger continues the same run on resume: csv/metrics.csv holds each logged step once
and equals an uninterrupted run's, TensorBoard shows the same points, W&B keeps its run id."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dreg.checkpointing import load_checkpoint
from dreg.loggers import MetricsCSV, logged_before, wandb_run_id
from dreg.report import write_report
from dreg.run import main
from tests.conftest import ROOT, TINY_RUN, compose_config, requires_mnist
from tests.conftest import cli as run_train

CLI = [sys.executable, "train.py"]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real command line, which must succeed."""
    result = run_train(*args, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def rows(run_dir: Path) -> list[dict[str, str]]:
    return MetricsCSV(run_dir / "csv").read()[1]  # without a row being written right now


def assert_each_step_once(run_dir: Path) -> None:
    """Per metric, the logged steps strictly increase: none repeated, none out of order."""
    table = rows(run_dir)
    for column in table[0]:
        if column in ("step", "epoch"):
            continue
        steps = [int(r["step"]) for r in table if r[column] != ""]
        assert steps == sorted(set(steps)), (column, steps)


# -- metrics.csv on its own (no training) -----------------------------------------------------
def test_a_new_column_rewrites_the_file_keeping_every_row(tmp_path, monkeypatch):
    log = MetricsCSV(tmp_path)
    log.log_metrics({"train/objective": -200.5, "epoch": 0}, step=0)
    log.save()
    log.log_metrics({"val/log_likelihood": -190.25, "epoch": 0}, step=0)
    log.save()
    assert log.path.read_text().splitlines() == [
        "epoch,step,train/objective,val/log_likelihood",
        "0,0,-200.5,",
        "0,0,,-190.25",
    ]

    # A writer killed in the middle of the next rewrite leaves the previous file whole.
    def killed(self, rowdicts):
        raise KeyboardInterrupt

    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    log.log_metrics({"grad/inference/snr": 0.5}, step=1)
    with pytest.raises(KeyboardInterrupt):
        log.save()
    monkeypatch.undo()
    assert len(log.path.read_text().splitlines()) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no temporary left


def test_a_fresh_run_replaces_an_earlier_runs_file_and_a_resumed_one_continues_it(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch,step,train/objective\n0,7,-1.0\n")
    fresh = MetricsCSV(tmp_path)
    fresh.log_metrics({"train/objective": -2.0, "epoch": 0}, step=0)
    fresh.save()
    assert [r["step"] for r in fresh.read()[1]] == ["0"]  # not appended to stale rows

    resumed = MetricsCSV(tmp_path)
    resumed.continue_from(1)
    resumed.log_metrics({"train/objective": -3.0, "epoch": 0}, step=1)
    resumed.save()
    assert [(r["step"], r["train/objective"]) for r in resumed.read()[1]] == [
        ("0", "-2.0"),
        ("1", "-3.0"),
    ]


def test_resuming_keeps_what_the_checkpoint_had_logged_and_drops_a_torn_row(tmp_path):
    # A checkpoint at global step 10 had logged the train/validation rows of steps <= 9 and
    # the gradient-callback rows of steps <= 10 (see dreg.loggers.logged_before).
    text = (
        "epoch,grad/inference/snr,step,train/objective,val/log_likelihood\n"
        ",0.5,10,,\n"  # callback row of update 10: kept
        "0,,9,-1.0,\n"  # train row of update 10: kept
        "0,,9,,-2.0\n"  # validation after update 10: kept
        ",0.4,11,,\n"  # after the checkpoint: dropped
        "0,,10,-3.0,\n"  # after the checkpoint: dropped
        "0,,11,-4"  # torn by the kill (no newline): dropped
    )
    (tmp_path / "metrics.csv").write_text(text)
    log = MetricsCSV(tmp_path)
    at_step = log.continue_from(10)
    assert log.path.read_text() == (
        "epoch,grad/inference/snr,step,train/objective,val/log_likelihood\n"
        ",0.5,10,,\n0,,9,-1.0,\n0,,9,,-2.0\n"
    )
    assert at_step == [{"grad/inference/snr": "0.5", "step": "10"}]
    assert not logged_before({"epoch": "0", "step": "10"}, 10)  # a test row at the end


def test_the_wandb_id_is_stored_once_per_run_folder(tmp_path):
    first = wandb_run_id(tmp_path)
    assert (tmp_path / "wandb" / "run_id").read_text().strip() == first
    assert wandb_run_id(tmp_path) == first
    assert wandb_run_id(tmp_path / "other") != first


# -- the real command line -------------------------------------------------------------------
RUN = [
    *[o for o in TINY_RUN if not o.startswith(("logger=", "trainer.max_steps", "trainer.val"))],
    "trainer.val_check_interval=10",
    "callbacks=grad_stats",  # gradient rows: logged at global_step + 1, unlike train rows
]
# A checkpoint every 7 steps, between validations (every 10): a last.ckpt taken after a
# training batch, as preemption and every_n_train_steps write it.
EVERY_7 = ["trainer.max_steps=40", "+callbacks.last_checkpoint.every_n_train_steps=7"]


def kill_after_a_checkpoint(run_dir: Path, *overrides: str) -> int:
    """Start a run, SIGKILL it once it has logged past its last checkpoint; that step."""
    proc = subprocess.Popen(
        [*CLI, *overrides, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = run_dir / "csv" / "metrics.csv"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if log.exists() and any(int(r["step"]) >= 16 for r in rows(run_dir)):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGSTOP)  # freeze it to look, then kill it where it stands
    assert proc.poll() is None, "the run finished before it could be killed"
    step = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    after = [r for r in rows(run_dir) if not logged_before(r, step)]
    proc.kill()
    proc.send_signal(signal.SIGCONT)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert after, "nothing was logged after the checkpoint: the test would prove nothing"
    return step


@requires_mnist
@pytest.mark.slow
def test_sigkill_and_resume_logs_each_step_once_as_an_uninterrupted_run(tmp_path):
    cli(*RUN, *EVERY_7, "logger=csv", f"hydra.run.dir={tmp_path / 'reference'}")

    run_dir = tmp_path / "killed"
    # logger=tensorboard writes csv/metrics.csv too: both must continue the same run.
    step = kill_after_a_checkpoint(run_dir, *RUN, *EVERY_7, "logger=tensorboard")
    assert step % 7 == 0 and step < 40
    cli(*RUN, *EVERY_7, "logger=tensorboard", f"hydra.run.dir={run_dir}", "resume=true")

    assert_each_step_once(run_dir)
    # Same rows, same values, same order: on CPU the resumed run is bitwise exact.
    reference = (tmp_path / "reference" / "csv" / "metrics.csv").read_text()
    assert (run_dir / "csv" / "metrics.csv").read_text() == reference

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    table = rows(run_dir)
    for tag in ("train/objective", "grad/inference/snr", "val/log_likelihood"):
        shown = [(e.step, e.value) for e in events.Scalars(tag)]
        logged = [(int(r["step"]), float(r[tag])) for r in table if r[tag] != ""]
        assert [s for s, _ in shown] == [s for s, _ in logged], tag  # each step once
        assert [v for _, v in shown] == pytest.approx([v for _, v in logged], rel=1e-6), tag


@requires_mnist
@pytest.mark.slow
def test_extending_a_finished_run_keeps_its_rows(tmp_path):
    # The three runs in process (what train.py runs): the metrics.csv continued is the
    # logger's, not the command line's; a resume through the command line: the test above.
    def run(run_dir: Path, *overrides: str) -> None:
        main(compose_config([*RUN, "logger=csv", *overrides], run_dir))

    run(tmp_path / "reference", "trainer.max_steps=30")
    run_dir = tmp_path / "extended"
    run(run_dir, "trainer.max_steps=20")
    before = rows(run_dir)
    run(run_dir, "trainer.max_steps=30", "resume=true")

    after = rows(run_dir)
    training = [r for r in before if not r.get("test/log_likelihood")]
    assert len(training) == len(before) - 1 > 40  # all but the 20-step run's test row
    assert after[: len(training)] == training
    assert_each_step_once(run_dir)
    reference = (tmp_path / "reference" / "csv" / "metrics.csv").read_text()
    assert (run_dir / "csv" / "metrics.csv").read_text() == reference


@requires_mnist
@pytest.mark.slow
def test_wandb_offline_resume_continues_the_same_run_and_the_report_has_its_curves(tmp_path):
    home = tmp_path / "home"  # no credentials anywhere: offline, and it must never prompt
    home.mkdir()
    env = {"HOME": str(home), "WANDB_API_KEY": "", "WANDB_MODE": "offline", "WANDB_DIR": ""}
    run_dir = tmp_path / "sweep" / "run"
    wandb_run = [*RUN, "logger=wandb", f"hydra.run.dir={run_dir}"]
    cli(*wandb_run, "trainer.max_steps=10", env=env)
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    cli(*wandb_run, "trainer.max_steps=20", "resume=true", env=env)

    segments = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(segments) == 2  # `wandb sync` uploads both into run `run_id`
    assert all(s.name.endswith(f"-{run_id}") for s in segments), (run_id, segments)
    assert (run_dir / "wandb" / "run_id").read_text().strip() == run_id

    assert_each_step_once(run_dir)  # the CSV beside W&B continued too
    assert max(int(r["step"]) for r in rows(run_dir)) == 20
    write_report(tmp_path / "sweep", tmp_path / "sweep")  # its command line: test_report.py
    report = (tmp_path / "sweep" / "results.md").read_text()
    assert "Runs without curves (no csv/metrics.csv): none." in report
    assert (tmp_path / "sweep" / "val_log_likelihood.png").stat().st_size > 1000
