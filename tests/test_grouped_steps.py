"""model.steps_per_call: N optimizer steps per Lightning call are N single steps, bitwise.

Each comparison trains the same tiny configuration twice from the same seed, once with one
step per call (Lightning's automatic optimization) and once grouped, and compares the final
parameters, the optimizer state and every logged row with exact equality. Runs cross an epoch
boundary (512 training images = 16 batches per epoch) and use intervals that the group size
does not divide, so groups are cut at epoch ends, validation steps and log steps.
"""

from __future__ import annotations

import csv
import json
import logging
import signal
from pathlib import Path

import pytest
import torch

from dreg.checkpointing import load_checkpoint
from dreg.datamodules.batches import GroupedBatches, ShuffledBatches
from dreg.errors import EXIT_PREEMPTED
from dreg.run import train
from tests.conftest import (
    TINY_RUN,
    assert_same_checkpoint_state,
    cli,
    compose_config,
    requires_mnist,
    start_cli,
    wait_for,
)
from tests.test_reliability import inject_nan_at_call

# 21 steps: one epoch (16) and a bit; validation every 5, log rows every 3, groups of 4.
CADENCE = ["trainer.max_steps=21", "trainer.val_check_interval=5", "trainer.log_every_n_steps=3"]
SINGLE = "model.steps_per_call=1"  # Lightning's automatic loop: the reference


def run(out: Path, *overrides: str) -> dict:
    metrics = train(compose_config([*TINY_RUN, *CADENCE, *overrides], out))
    checkpoint = load_checkpoint(out / "checkpoints" / "last.ckpt")
    (csv_path,) = out.rglob("metrics.csv")
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    return {"metrics": metrics, "checkpoint": checkpoint, "rows": rows}


@pytest.fixture(scope="module")
def single_steps(tmp_path_factory) -> dict:
    """The default configuration at one step per call: the reference of several tests
    (trained once; they only read it)."""
    return run(tmp_path_factory.mktemp("single"), SINGLE)


def assert_same_training(got: dict, want: dict) -> None:
    assert_same_checkpoint_state(got["checkpoint"], want["checkpoint"])
    assert got["checkpoint"]["epoch"] == want["checkpoint"]["epoch"]
    (got_opt,), (want_opt,) = (
        got["checkpoint"]["optimizer_states"],
        want["checkpoint"]["optimizer_states"],
    )
    assert got_opt["param_groups"] == want_opt["param_groups"]
    assert got["rows"] == want["rows"]  # every logged value, at the same steps
    loader = "loops"  # the data position (epoch, batches consumed) continues identically
    assert (
        got["checkpoint"][loader]["fit_loop"]["state_dict"]["combined_loader"]
        == want["checkpoint"][loader]["fit_loop"]["state_dict"]["combined_loader"]
    )
    for key in ("train/objective", "train/iwae_bound", "val/log_likelihood", "test/bound"):
        assert got["metrics"][key] == want["metrics"][key], key


# -- the grouped loader ------------------------------------------------------------------------
DATA = torch.arange(103, dtype=torch.float32).unsqueeze(1)  # [N, 1]: row i holds i


def drain(loader, calls: int) -> list[list[int]]:
    """Take ``calls`` items as Lightning does (iterate per epoch, mark each consumed)."""
    taken: list[list[int]] = []
    while len(taken) < calls:
        for item in loader:
            n = item.shape[0] if isinstance(loader, GroupedBatches) else 1
            loader_state = loader.batches if isinstance(loader, GroupedBatches) else loader
            loader_state.mark_consumed(n)
            taken.append([int(v) for v in item.reshape(-1)])
            if len(taken) == calls:
                break
    return taken


def test_groups_hold_the_single_batches_in_order_cut_at_epochs_and_boundaries():
    single = drain(ShuffledBatches(DATA, 10, seed=3), 28)  # 10 batches per epoch
    grouped = GroupedBatches(ShuffledBatches(DATA, 10, seed=3), 4, boundaries=(7,))
    groups = drain(grouped, 9)
    sizes = [len(g) // 10 for g in groups]
    # ends after batch 4, 7 (boundary), 10 (epoch), 14 (boundary), 18, 20 (epoch), 21, 25, 28
    assert sizes == [4, 3, 3, 4, 4, 2, 1, 4, 3]
    assert [row for g in groups for row in g] == [row for batch in single for row in batch]
    state = grouped.state_dict()
    assert state["epoch"] == 2 and state["consumed"] == sum(sizes) - 20


def test_a_resumed_grouped_loader_continues_with_the_same_batches():
    whole = drain(GroupedBatches(ShuffledBatches(DATA, 10, seed=3), 3), 8)
    first = GroupedBatches(ShuffledBatches(DATA, 10, seed=3), 3)
    head = drain(first, 3)
    second = GroupedBatches(ShuffledBatches(DATA, 10, seed=3), 3)
    second.load_state_dict(first.state_dict())
    assert head + drain(second, 5) == whole


# -- training: grouped == single, bitwise --------------------------------------------------------
@requires_mnist
@pytest.mark.slow  # real training runs compared step by step
@pytest.mark.parametrize(
    "overrides",
    [[], ["estimator=dreg_jvi"], ["estimator=dreg_cv"], ["train_model=false"]],
    ids=["iwae", "dreg_jvi", "dreg_cv-aux-loss", "inference-only"],
)
def test_grouped_calls_equal_single_steps_bitwise(tmp_path, request, overrides):
    if overrides:
        want = run(tmp_path / "single", *overrides, SINGLE)
    else:
        want = request.getfixturevalue("single_steps")
    got = run(tmp_path / "grouped", *overrides, "model.steps_per_call=4")
    assert want["metrics"]["global_step"] == got["metrics"]["global_step"] == 21
    assert_same_training(got, want)


@requires_mnist
@pytest.mark.slow  # real training runs compared step by step
def test_groups_longer_than_every_interval_still_step_and_log_like_single_steps(
    tmp_path, single_steps
):
    want = single_steps
    got = run(tmp_path / "grouped", "model.steps_per_call=64")
    assert_same_training(got, want)


@requires_mnist
@pytest.mark.slow  # real training runs compared step by step
def test_skip_inside_a_group_equals_skip_in_single_steps(tmp_path, monkeypatch):
    inject_nan_at_call(monkeypatch, 7)  # the 7th step: inside the group of steps 6..9 (0-based 5-8)
    want = run(tmp_path / "single", "model.nonfinite=skip", SINGLE)
    inject_nan_at_call(monkeypatch, 7)
    got = run(tmp_path / "grouped", "model.nonfinite=skip", "model.steps_per_call=4")
    assert want["metrics"]["train/skipped_steps"] == got["metrics"]["train/skipped_steps"] == 1
    assert_same_training(got, want)


@requires_mnist
@pytest.mark.slow  # real training runs compared step by step
def test_raise_inside_a_group_names_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch
):
    inject_nan_at_call(monkeypatch, 8)  # step 7 (0-based): inside the group 5..8
    cfg = compose_config([*TINY_RUN, *CADENCE, "model.steps_per_call=4"], tmp_path)
    with pytest.raises(FloatingPointError, match=r"non-finite loss.*step 7 \(epoch 0, batch 7\)"):
        train(cfg)
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 5  # the last validation, before the group
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())


@requires_mnist
@pytest.mark.slow  # real training runs compared step by step
@pytest.mark.parametrize(
    "first, then", [(4, 1), (1, 4)], ids=["grouped-then-single", "single-then-grouped"]
)
def test_a_run_extended_with_another_steps_per_call_continues_exactly(
    tmp_path, first, then, single_steps
):
    want = single_steps  # the straight run
    out = tmp_path / "extended"
    train(
        compose_config(
            [*TINY_RUN, *CADENCE, "trainer.max_steps=12", f"model.steps_per_call={first}"], out
        )
    )
    got = run(out, "resume=true", f"model.steps_per_call={then}")  # continues last.ckpt (10)
    assert got["metrics"]["global_step"] == want["metrics"]["global_step"] == 21
    # The CSV continues across the resume (the first segment's test row dropped): every row
    # of the extended run equals the straight run's.
    assert len(want["rows"]) >= 12  # log rows every 3 steps, validation every 5, test
    assert_same_training(got, want)


@requires_mnist
@pytest.mark.slow  # real training runs compared step by step
def test_gradient_statistics_see_every_step_of_a_group(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="dreg.lightning_module"):
        got = run(tmp_path / "grouped", "callbacks=grad_stats", "model.steps_per_call=4")
    assert "one eager step per call instead" not in caplog.text
    want = run(tmp_path / "single", "callbacks=grad_stats", SINGLE)
    assert any("grad/inference/snr" in row for row in want["rows"])
    assert_same_training(got, want)  # every row, the gradient statistics included


@requires_mnist
@pytest.mark.slow  # real training runs compared step by step
def test_a_step_replaying_callback_sees_every_step_of_a_group(tmp_path, caplog):
    # estimator_compare replays each step's (x, context, eps): no fallback is needed.
    compare = ["callbacks=estimator_compare"]
    with caplog.at_level(logging.INFO, logger="dreg.lightning_module"):
        got = run(tmp_path / "grouped", *compare, "model.steps_per_call=4")
    assert "one step per call instead" not in caplog.text
    want = run(tmp_path / "single", *compare, SINGLE)
    assert_same_training(got, want)


@requires_mnist
@pytest.mark.slow  # real training runs compared step by step
def test_cuda_graph_is_ignored_on_cpu_with_a_log_line(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="dreg.lightning_module"):
        got = run(tmp_path / "graph", "model.cuda_graph=true", "trainer.accelerator=cpu")
    assert "model.cuda_graph=true ignored: training runs on cpu" in caplog.text
    assert got["metrics"]["global_step"] == 21


# -- preemption and exact resume, through the real CLI ------------------------------------------
RESUME_RUN = [*TINY_RUN, "trainer.max_steps=40", "trainer.val_check_interval=10"]


@requires_mnist
@pytest.mark.slow
def test_preempted_grouped_run_resumes_bitwise_identical_to_single_steps(tmp_path):
    reference = tmp_path / "reference"
    assert cli(*RESUME_RUN, SINGLE, f"hydra.run.dir={reference}").returncode == 0

    run_dir = tmp_path / "interrupted"
    grouped = [*RESUME_RUN, "model.steps_per_call=3", f"hydra.run.dir={run_dir}"]
    proc = start_cli(*grouped)
    wait_for(run_dir / "checkpoints" / "best-step10.ckpt", proc)
    proc.send_signal(signal.SIGTERM)  # mid-epoch, between step 10 and 40
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-2000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "preempted" and 10 <= status["global_step"] < 40, status

    result = cli(*grouped, "resume=true")
    assert result.returncode == 0, result.stderr[-2000:]
    got = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    want = load_checkpoint(reference / "checkpoints" / "last.ckpt")
    assert want["global_step"] == 40
    assert_same_checkpoint_state(got, want)
