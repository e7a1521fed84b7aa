"""Diagnostics under 2-process DDP (gloo, CPU) through the real CLI.

A diagnostic's draw i is a pure function of (seed, i) and rank r computes the draws with
i % 2 == r, so after the all-reduce the 2-process statistics must equal a 1-process run's on
the same draws up to float32 round-off (DDP runs one thread per process, so matmul sums are
ordered differently: agreement to ~1e-6, tested at 1e-4). Without the all-reduce they would
describe half of the draws and differ at the first digit. Only rank 0 writes, into one run
directory.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dreg.run import main
from tests.conftest import ROOT, TINY_RUN, compose_config, requires_mnist

pytestmark = [requires_mnist, pytest.mark.ddp]

SMALL = ["model.net.hidden_dims=[32]", "model.net.latent_dim=8", "model.num_samples=16"]


def run_ddp(cwd: Path, *overrides: str) -> Path:
    """``train.py trainer=ddp_cpu ...`` run from ``cwd``; returns the one run directory."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "trainer=ddp_cpu", *TINY_RUN, *SMALL, *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Lightning relaunches train.py for rank 1 with hydra.run.dir pinned to rank 0's directory.
    run_dirs = list((cwd / "outputs" / "runs").iterdir())
    assert len(run_dirs) == 1, run_dirs
    return run_dirs[0]


def written_files(run_dir: Path) -> set[str]:
    """Files in the run directory, less Hydra's own (config and one log per process)."""
    return {
        str(p.relative_to(run_dir))
        for p in run_dir.rglob("*")
        if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"
    }


def test_bias_check_two_processes_equal_one(tmp_path):
    args = ["mode=bias_check", "estimator=stl", "mode.num_batches=12", "logger=csv"]
    ddp_dir = run_ddp(tmp_path, *args)
    main(compose_config([*TINY_RUN, *SMALL, *args], tmp_path / "single"))
    two = json.loads((ddp_dir / "bias_check.json").read_text())
    one = json.loads((tmp_path / "single" / "bias_check.json").read_text())
    assert (two["world_size"], one["world_size"]) == (2, 1)
    for key in ("aggregate", "all_coordinate_mean"):
        assert two[key]["t"] == pytest.approx(one[key]["t"], rel=1e-4)
        assert two[key]["mean"] == pytest.approx(one[key]["mean"], rel=1e-4)
    for a, b in zip(two["per_tensor"], one["per_tensor"], strict=True):
        assert a["t"] == pytest.approx(b["t"], rel=1e-4)
    assert written_files(ddp_dir) == {
        "bias_check.json", "csv/metrics.csv", "csv/hparams.yaml", "status.json", ".lock",
    }  # fmt: skip
    assert json.loads((ddp_dir / "status.json").read_text()) == {"status": "completed"}


def test_diagnose_two_processes_equal_one(tmp_path):
    args = ["mode=diagnose", "mode.num_samples=[1,8]", "mode.estimators=[iwae,dreg_iwae]",
            "mode.num_draws=7", "logger=csv"]  # fmt: skip
    ddp_dir = run_ddp(tmp_path, *args)
    main(compose_config([*TINY_RUN, *SMALL, *args], tmp_path / "single"))

    def rows(path: Path) -> list[dict[str, str]]:
        with path.open() as f:
            return list(csv.DictReader(f))

    two, one = rows(ddp_dir / "snr_vs_k.csv"), rows(tmp_path / "single" / "snr_vs_k.csv")
    assert len(two) == len(one) == 2 * 2 * 2
    for a, b in zip(two, one, strict=True):
        assert (a["num_samples"], a["estimator"], a["group"]) == (
            b["num_samples"], b["estimator"], b["group"],
        )  # fmt: skip
        assert int(a["num_draws"]) == int(b["num_draws"]) == 7
        for stat in ("variance", "mean_square", "snr"):
            assert float(a[stat]) == pytest.approx(float(b[stat]), rel=1e-4)
    assert written_files(ddp_dir) == {
        "snr_vs_k.csv", "snr_vs_k.png", "csv/metrics.csv", "csv/hparams.yaml", "status.json",
        ".lock",
    }  # fmt: skip


def test_training_callbacks_average_over_ranks(tmp_path):
    """The comparison gradients are all-reduced: the replayed training-estimator gradient
    equals DDP's averaged p.grad (it would differ by the other rank's half otherwise)."""
    run_dir = run_ddp(tmp_path, "callbacks=estimator_compare")
    with (run_dir / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    errors = [float(r["grad/compare/replay_rel_error"]) for r in rows
              if r.get("grad/compare/replay_rel_error")]  # fmt: skip
    assert len(errors) == 4 and max(errors) < 1e-5
    assert all(float(r["grad/inference/snr"]) > 0 for r in rows if r.get("grad/inference/snr"))
