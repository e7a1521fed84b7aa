"""Every way to train gives the same model: the path-equivalence matrix, through the CLI.

One job (tiny model, real MNIST, 20 steps) trained along every path dreg offers:

* alone at one step per call: the reference;
* alone at four steps per call (:mod:`dreg.grouped_step`);
* packed as a cohort of one (``hydra.launcher.max_pack_size=1``: a pack of one job);
* packed beside other jobs (every job of the sweep in one stacked cohort);
* packed, one replica at a time (``hydra.launcher.replicas_per_pass=1``, what ``auto``
  picks for large models on a CPU: each job steps alone, in place, in turn with the others);

crossed with the callbacks that read gradients ({default, ``grad_stats``,
``estimator_compare``}) and the non-finite policy ({raise, skip}). Each path's job must end
with the reference's trained parameters and Adam state, and log the reference's statistics:
bitwise where the path is bitwise by design (grouped steps, cohorts of one), float32
round-off where a stacked model sums its batched products in another order.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from dreg.checkpointing import load_checkpoint
from tests.conftest import NO_PROGRESS_BAR, assert_same_checkpoint_state, cli, requires_mnist

pytestmark = [requires_mnist, pytest.mark.slow]

# Six jobs in sweep order: callbacks x nonfinite.
MATRIX = ["callbacks=default,grad_stats,estimator_compare", "model.nonfinite=raise,skip"]
JOBS = [str(i) for i in range(6)]
BASE = [
    "-m",
    "debug=fast",
    *NO_PROGRESS_BAR,
    "model.num_samples=4",
    "model.net.latent_dim=2",
    "model.net.hidden_dims=[8]",
    "trainer.val_check_interval=20",
    "hydra.sweep.subdir=${hydra:job.num}",
    *MATRIX,
]
PACKED = ["hydra/launcher=packed", "model.steps_per_call=4"]
PATHS = {
    "alone, 4 steps per call": ["model.steps_per_call=4"],
    "packed, cohort of one": [*PACKED, "hydra.launcher.max_pack_size=1"],
    "packed beside other jobs": PACKED,
    "packed, one replica at a time": [*PACKED, "hydra.launcher.replicas_per_pass=1"],
}
BITWISE = {"alone, 4 steps per call", "packed, cohort of one", "packed, one replica at a time"}
# What dreg.cohort logs of the pack's stacks: auto keeps replicas this small in one.
STACKS = {
    "packed beside other jobs": "6 alike jobs share one stacked model "
    "(hydra.launcher.replicas_per_pass=auto)",
    "packed, one replica at a time": "6 alike jobs step one at a time, each alone in place "
    "(hydra.launcher.replicas_per_pass=1)",
}


def sweep(where: Path, *overrides: str) -> Path:
    result = cli(*BASE, *overrides, f"hydra.sweep.dir={where}")
    assert result.returncode == 0, result.stderr[-3000:]
    return where


ALONE_GROUPED = "alone, 4 steps per call"  # jobs 6-11 of the reference's sweep


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """Every job alone at one step per call: jobs 0-5 of one sweep (basic launcher), whose
    jobs 6-11 are the same jobs alone at four steps per call (``model.steps_per_call=1,4``
    first on the command line, so it varies slowest): one process for both paths alone."""
    where = tmp_path_factory.mktemp("reference")
    result = cli(BASE[0], "model.steps_per_call=1,4", *BASE[1:], f"hydra.sweep.dir={where}")
    assert result.returncode == 0, result.stderr[-3000:]
    return where


REPLAY_ERROR = "grad/compare/replay_rel_error"


def logged_rows(job: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((job / "csv" / "metrics.csv").read_text().splitlines()))


def assert_same_rows(got: Path, want: Path, rel: float) -> None:
    """The same logged rows (keys, steps), values equal (``rel=0``) or to ``rel``."""
    rows, reference_rows = logged_rows(got), logged_rows(want)
    assert len(rows) == len(reference_rows)
    for row, other in zip(rows, reference_rows, strict=True):
        assert row.keys() == other.keys() and row["step"] == other["step"]
        for key, value in row.items():
            if key == REPLAY_ERROR and value:  # round-off itself: small, not equal
                assert float(value) < 1e-4, value
            elif rel == 0 or not (value and other[key]):
                assert value == other[key], (key, value, other[key])
            else:
                assert math.isclose(float(value), float(other[key]), rel_tol=rel, abs_tol=1e-7), (
                    key, value, other[key]
                )  # fmt: skip


def assert_close_state(got: dict, want: dict, rel: float) -> None:
    assert got["global_step"] == want["global_step"]
    for name, tensor in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][name], tensor, rtol=rel, atol=1e-6, msg=name)


@pytest.mark.parametrize("path", list(PATHS))
def test_every_path_trains_the_reference_model(path, reference, tmp_path):
    if path == ALONE_GROUPED:  # run beside the reference, as its jobs 6-11
        got_of = {job: reference / str(int(job) + len(JOBS)) for job in JOBS}
    else:
        where = sweep(tmp_path / "sweep", *PATHS[path])
        got_of = {job: where / job for job in JOBS}
        if path in STACKS:  # the CLI's setting reached the run of steps
            logs = "".join((where / job / "train.log").read_text() for job in JOBS)
            assert logs.count(STACKS[path]) == 1
    for job in JOBS:
        got, want = got_of[job], reference / job
        got_ckpt = load_checkpoint(got / "checkpoints" / "last.ckpt")
        want_ckpt = load_checkpoint(want / "checkpoints" / "last.ckpt")
        assert got_ckpt["global_step"] == 20
        if path in BITWISE:
            assert_same_checkpoint_state(got_ckpt, want_ckpt)
            assert_same_rows(got, want, rel=0)
        else:
            assert_close_state(got_ckpt, want_ckpt, rel=1e-4)
            assert_same_rows(got, want, rel=1e-4)
        metrics = json.loads((got / "metrics.json").read_text())
        assert metrics["status"] == "completed" and metrics["global_step"] == 20


def test_observers_and_policies_do_not_change_the_reference(reference):
    """With every step finite, neither a callback that reads gradients nor the non-finite
    policy changes training: the six reference jobs end bitwise equal (a job whose observer
    dropped its gradients kept its initial weights), and estimator_compare's replay of each
    step matched the applied gradient (jobs 4 and 5 run it)."""
    first = load_checkpoint(reference / "0" / "checkpoints" / "last.ckpt")
    assert first["global_step"] == 20
    for job in JOBS[1:]:
        other = load_checkpoint(reference / job / "checkpoints" / "last.ckpt")
        assert_same_checkpoint_state(other, first)
    for job in ("4", "5"):
        errors = [
            float(row[REPLAY_ERROR])
            for row in logged_rows(reference / job)
            if row.get(REPLAY_ERROR)
        ]
        assert errors and max(errors) < 1e-4, errors
