"""User journeys around checkpoints, through the real CLI (issue 24): resume a preempted run
with the command it printed, evaluate a checkpoint, move or copy a run folder, a full disk, a
damaged ``last.ckpt`` (DDP with W&B offline: tests/test_ddp_training.py).

Each test runs ``train.py`` in a subprocess at a tiny size, from a fresh folder, as a new user
would, and checks what that user would check. A journey's further runs on a finished run's
files, whose command-line side (one-line error, exit code, Hydra's folders) another test
already shows, call :func:`dreg.run.main` (what ``train.py`` runs) in process: the same run
without another few seconds of importing Lightning.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dreg.checkpointing import load_checkpoint
from dreg.errors import EXIT_PREEMPTED, NonFiniteError
from dreg.run import main
from tests.conftest import (
    ROOT,
    TINY_RUN,
    assert_same_checkpoint_state,
    cli,
    compose_config,
    error_line,
    requires_mnist,
    start_cli,
    wait_for,
)
from tests.test_wandb_dashboard import records  # reads an offline run's .wandb file

pytestmark = [requires_mnist, pytest.mark.slow]

TINY = [*TINY_RUN, "model.net.hidden_dims=[8]", "model.net.latent_dim=2", "model.num_samples=4"]
LONG = [*TINY, "trainer.max_steps=60", "trainer.val_check_interval=10"]


def preempt(proc: subprocess.Popen, when: Path) -> str:
    """SIGTERM ``proc`` once ``when`` exists; its last stderr line (the one-line error)."""
    wait_for(when, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-2000:]
    return stderr.strip().splitlines()[-1]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def run_in_process(run_dir: Path, *overrides: str) -> dict:
    """What ``train.py *TINY *overrides hydra.run.dir=run_dir`` runs, in this process."""
    return main(compose_config([*TINY, *overrides], run_dir))


def run_folders(cwd: Path) -> list[Path]:
    """The single-run folders Hydra made under ``cwd`` (``outputs/runs/<time>``)."""
    return sorted((cwd / "outputs" / "runs").iterdir())


def wait_for_run_folder(cwd: Path, proc: subprocess.Popen, timeout: float = 240) -> Path:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if (cwd / "outputs" / "runs").is_dir() and run_folders(cwd):
            return run_folders(cwd)[0]
        time.sleep(0.05)
    raise AssertionError("no run folder appeared")


# -- item 4: the printed resume hint, and the same command with resume=true -----------------
def test_a_preempted_run_continues_with_the_same_command_or_its_printed_hint(tmp_path):
    reference = tmp_path / "reference"
    assert cli(*LONG, f"hydra.run.dir={reference}", cwd=tmp_path).returncode == 0
    work = tmp_path / "work"
    work.mkdir()

    # Preempted once, continued with the same command and resume=true (no run folder given).
    proc = start_cli(*LONG, cwd=work)
    run_dir = wait_for_run_folder(work, proc)
    first = preempt(proc, run_dir / "checkpoints" / "best-step10.ckpt")
    assert first.startswith("error: preempted at step") and "resume=true" in first
    next_validation = (read_json(run_dir / "status.json")["global_step"] // 10 + 1) * 10
    proc = start_cli(*LONG, "resume=true", cwd=work)
    second = preempt(proc, run_dir / "images" / f"samples-step{next_validation:06d}.png")
    assert run_folders(work) == [run_dir]  # continued in its own folder, no new one
    assert "continuing the interrupted run" in (run_dir / "train.log").read_text()

    # Preempted again: its printed command, run literally, finishes the run.
    command = shlex.split(second.split("resume=true: ", 1)[1])
    assert command[:2] == ["python", str(ROOT / "train.py")]
    result = subprocess.run(
        [sys.executable, *command[1:]], cwd=tmp_path, capture_output=True, text=True,
        timeout=600, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert run_folders(work) == [run_dir]
    got = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    want = load_checkpoint(reference / "checkpoints" / "last.ckpt")
    assert_same_checkpoint_state(got, want)  # bitwise an uninterrupted run
    metrics, expected = read_json(run_dir / "metrics.json"), read_json(reference / "metrics.json")
    for key in ("global_step", "test/log_likelihood", "val/log_likelihood", "tested_checkpoint"):
        assert metrics[key] == expected[key], key


# -- item 5: evaluate a checkpoint; moved and copied run folders -----------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 4-step run (validations at steps 2 and 4), moved after it ended."""
    root = tmp_path_factory.mktemp("trained")
    result = cli(*TINY, f"hydra.run.dir={root / 'run'}", cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    shutil.move(root / "run", root / "moved")
    return root / "moved"


def best_of(run_dir: Path) -> Path:
    return run_dir / read_json(run_dir / "metrics.json")["tested_checkpoint"]


def test_evaluate_tests_exactly_the_given_checkpoint(trained, tmp_path):
    checkpoint = trained / "checkpoints" / "last.ckpt"
    result = cli(*TINY, "mode=evaluate", f"ckpt_path={checkpoint}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = run_folders(tmp_path)  # a run folder of its own
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["tested_checkpoint"] == str(checkpoint)
    assert metrics["global_step"] == 4
    assert metrics["test/log_likelihood"] < 0
    assert read_json(run_dir / "status.json")["status"] == "completed"
    # No validation in an evaluation; only a sweep's job is told that its sweeper gets None.
    assert "optimized_metric" not in (run_dir / "train.log").read_text()


def test_evaluating_non_finite_weights_fails_instead_of_recording_nan(trained, tmp_path):
    broken = load_checkpoint(trained / "checkpoints" / "last.ckpt")
    name = next(iter(broken["state_dict"]))
    broken["state_dict"][name] = torch.full_like(broken["state_dict"][name], float("nan"))
    torch.save(broken, tmp_path / "nan.ckpt")
    # In process; evaluate's command line: the test above; an error's line and code: the tests
    # of a damaged and a full disk below.
    with pytest.raises(NonFiniteError, match="non-finite") as raised:
        run_in_process(tmp_path / "eval", "mode=evaluate", f"ckpt_path={tmp_path / 'nan.ckpt'}")
    assert raised.value.exit_code == 6 and "\n" not in str(raised.value)
    assert read_json(tmp_path / "eval" / "status.json")["exit_code"] == 6
    assert not (tmp_path / "eval" / "metrics.json").exists()


# In process a warning fails the test; this one says the run starts from another run's
# checkpoint, which is the point (the command line prints it).
@pytest.mark.filterwarnings("ignore:The dirpath has changed from:UserWarning")
def test_a_run_started_from_a_moved_runs_checkpoint_tests_its_own_weights(trained, tmp_path):
    # A budget already reached: nothing to train; the test is of the weights it started from,
    # not of the old run's best file, by a path that no longer exists.
    run_in_process(tmp_path / "run", f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}")
    assert read_json(tmp_path / "run" / "metrics.json")["tested_checkpoint"] == "final weights"


def test_a_copied_run_folder_resumes_and_tests_its_own_files(trained, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    # One step more and no validation after it: the test is of the best checkpoint, the copy's.
    run_in_process(copy, "trainer.max_steps=5", "resume=true")
    metrics = read_json(copy / "metrics.json")
    assert metrics["global_step"] == 5
    assert (copy / metrics["tested_checkpoint"]).exists()
    assert metrics["tested_checkpoint"] == read_json(trained / "metrics.json")["tested_checkpoint"]


# -- item 12: a damaged last.ckpt names the way out, and the way out works -------------------
def test_a_damaged_last_checkpoint_names_the_way_out_and_the_way_out_works(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:-300])  # cut short

    result = cli(*TINY, "trainer.max_steps=6", "resume=true", f"hydra.run.dir={run_dir}")
    assert result.returncode == 4, result.stderr[-2000:]
    line = error_line(result)
    assert "is damaged" in line and "delete" not in line
    way_out = line.split("to continue this run from another of its checkpoints: ", 1)[1]
    assert way_out == f"resume=true ckpt_path={best_of(run_dir)}"
    assert read_json(run_dir / "status.json")["status"] == "completed"  # refused: unchanged

    run_in_process(run_dir, "trainer.max_steps=6", *shlex.split(way_out))  # the way out
    assert read_json(run_dir / "metrics.json")["global_step"] == 6
    assert load_checkpoint(last)["global_step"] == 6  # the damaged file replaced by a good one


# -- item 7: a disk that fills up during a checkpoint save ----------------------------------
# Runs train.py with torch.save failing as a full disk does, from its third save on (the
# first validation's two checkpoints are written): part of the bytes reach the file, then
# ENOSPC.
DISK_FULL = """
import errno, runpy, sys, torch
real_save, saves = torch.save, []
def save(obj, f, *args, **kwargs):
    saves.append(f)
    if len(saves) < 3:
        return real_save(obj, f, *args, **kwargs)
    f.write(b"PK\\x03\\x04" + bytes(100))
    raise OSError(errno.ENOSPC, "No space left on device")
torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_full_disk_keeps_the_last_checkpoint_and_fails_with_its_own_code(tmp_path):
    wrapper, run_dir = tmp_path / "disk_full.py", tmp_path / "run"
    wrapper.write_text(DISK_FULL)
    result = subprocess.run(
        [sys.executable, str(wrapper), str(ROOT / "train.py"), *TINY,
         f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 8, result.stderr[-2000:]
    line = error_line(result)
    assert "No space left on device" in line and str(run_dir / "checkpoints") in line
    assert "resume=true" in line
    assert read_json(run_dir / "status.json") == {
        "status": "failed", "error": line[len("error: "):], "exit_code": 8,
    }  # fmt: skip
    files = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert not [name for name in files if not name.endswith(".ckpt")]  # no temporary left
    for name in files:  # every file under a checkpoint's name is whole
        assert load_checkpoint(run_dir / "checkpoints" / name)["global_step"] == 2, name

    run_in_process(run_dir, "resume=true")  # room made again
    assert read_json(run_dir / "metrics.json")["global_step"] == 4


# -- item 6: DDP with the default W&B logger, offline: tests/test_ddp_training.py's tiny DDP
# run is that journey (one 2-process run for the run-folder, noise and W&B checks).


# -- item 8: W&B offline, preempted and resumed: one run -------------------------------------
def test_a_resumed_offline_wandb_run_is_one_run_whose_steps_continue(tmp_path):
    run_dir, home = tmp_path / "run", tmp_path / "home"
    home.mkdir()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}, "HOME": str(home)}
    args = [*[a for a in LONG if a != "logger=csv"], f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env, text=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    preempt(proc, run_dir / "checkpoints" / "best-step10.ckpt")
    resumed_at = read_json(run_dir / "status.json")["global_step"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args, "resume=true"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]

    segments = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(segments) == 2
    runs, steps = [], []
    for segment in segments:
        (log,) = segment.glob("*.wandb")
        logged = list(records(log))
        runs += [r.run for r in logged if r.WhichOneof("record_type") == "run"]
        steps.append([
            int(item.value_json) for r in logged if r.WhichOneof("record_type") == "history"
            for item in r.history.item if list(item.nested_key) == ["trainer/global_step"]
        ])  # fmt: skip
    assert {run.run_id for run in runs} == {(run_dir / "wandb" / "run_id").read_text().strip()}
    assert all(run.resume for run in runs)  # synced together, W&B appends them in order
    assert min(steps[1]) > resumed_at and max(steps[1]) == 60  # continued, not from 0
    # The upload command names every segment, so they are synced together, in order.
    assert f"wandb sync {run_dir / 'wandb'}\n" in (run_dir / "train.log").read_text()
