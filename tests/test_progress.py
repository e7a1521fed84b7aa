"""The progress bar counts optimizer steps (not Lightning's calls of several steps each), and a
pack draws one bar."""

from __future__ import annotations

import csv
import re
import threading
from types import SimpleNamespace

import pytest

from dreg.callbacks import progress
from dreg.callbacks.progress import StepProgressBar, shows_bars, step_position
from tests.conftest import cli, requires_mnist


def test_position_is_the_step_count_out_of_max_steps():
    assert step_position(476, 100_000, 0, 1562) == (476, 100_000)
    assert step_position(476, 100_000, 400, 1562) == (476, 100_000)  # epochs do not matter


def test_a_run_bounded_by_epochs_counts_the_steps_of_the_epoch():
    assert step_position(20, -1, 16, 8) == (4, 8)
    assert step_position(20, -1, 16, float("inf")) == (4, None)  # unknown length: no ETA


def fake_trainer(global_step: int, max_steps: int, batches: int = 8) -> SimpleNamespace:
    return SimpleNamespace(
        global_step=global_step, max_steps=max_steps, max_epochs=-1, current_epoch=0,
        is_global_zero=True,
        num_training_batches=batches, state=SimpleNamespace(fn="fit"),
    )  # fmt: skip


def run_calls(trainer: SimpleNamespace, calls: int, steps_per_call: int, refresh_rate=1):
    bar = StepProgressBar(refresh_rate=refresh_rate)
    bar.get_metrics = lambda *_: {}
    bar.setup(trainer, None, "fit")
    bar.on_train_start(trainer)
    bar.on_train_epoch_start(trainer)
    for call in range(calls):
        trainer.global_step += steps_per_call
        bar.on_train_batch_end(trainer, None, None, None, call)
    return bar.train_progress_bar


def test_the_bar_moves_by_the_steps_of_each_call(capsys):
    # 25 calls of 4 steps: Lightning's bar said 25/1562; the run is at step 100 of 1000.
    bar = run_calls(fake_trainer(0, 1000), calls=25, steps_per_call=4)
    assert (bar.n, bar.total, bar.unit) == (100, 1000, "step")


def test_refresh_rate_counts_steps_and_is_not_skipped_by_calls_of_several(capsys):
    bar = run_calls(fake_trainer(0, 1000), calls=13, steps_per_call=4, refresh_rate=50)
    assert bar.n == 52  # the first call past 50 steps redraws (52 is no multiple of 50)


def test_a_resumed_run_starts_at_its_step_so_the_eta_is_this_sessions(capsys):
    bar = run_calls(fake_trainer(600, 1000), calls=10, steps_per_call=4)
    assert (bar.initial, bar.n, bar.total) == (600, 640, 1000)


def test_refresh_rate_0_draws_nothing(capsys):
    bar = run_calls(fake_trainer(0, 100), calls=5, steps_per_call=4, refresh_rate=0)
    assert bar.disable
    assert capsys.readouterr().out == ""


def test_in_a_pack_only_the_first_job_draws_and_its_label_names_the_pack(monkeypatch):
    monkeypatch.setattr(progress, "current_pack", lambda: SimpleNamespace(size=48))
    seen = {}

    def job(index: int) -> None:
        seen[index] = (shows_bars(), StepProgressBar().train_description)

    threads = [threading.Thread(target=job, args=(i,), name=f"pack-job-{i}") for i in (0, 1)]
    for thread in threads:
        thread.start()
        thread.join()
    assert seen == {0: (True, "pack of 48 jobs, steps"), 1: (False, "pack of 48 jobs, steps")}


@requires_mnist
@pytest.mark.slow
def test_a_packed_sweep_draws_one_bar_in_optimizer_steps(tmp_path):
    result = cli(
        "-m", "hydra/launcher=packed", "debug=fast", "seed=0,1", "logger=csv",
        "model.net.hidden_dims=[8]", "model.net.latent_dim=2", "model.num_samples=4",
        "trainer.max_steps=8", "model.steps_per_call=4", "callbacks.progress_bar.refresh_rate=4",
        f"hydra.sweep.dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    frames = result.stdout.replace("\r", "\n").splitlines()
    training = [f for f in frames if "step/s" in f or "?step" in f]
    assert training and all(f.startswith("pack of 2 jobs, steps") for f in training)
    # Steps, not calls: 4 and 8 of 8 (Lightning's bar said 1/... and 2/...).
    assert {m for f in training for m in re.findall(r"\| (\d+/\d+) \[", f)} >= {"4/8", "8/8"}
    assert not [f for f in frames if f.startswith("Epoch ")]  # no second job's bar
    # A shown bar reads the objective every call; the logger still writes rows at its cadence
    # (debug=fast: every 5 steps) and at the end only.
    assert any("train/objective=" in f for f in training if "| 4/8 [" in f)  # before row 5
    for metrics in sorted(tmp_path.glob("*/csv/metrics.csv")):
        with metrics.open() as f:
            rows = [r for r in csv.DictReader(f) if r.get("train/objective")]
        assert [int(r["step"]) for r in rows] == [5, 8], metrics
