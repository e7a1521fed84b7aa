"""Training under 2-process DDP (gloo, CPU) through the real CLI: each rank its own noise."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from dreg.checkpointing import load_checkpoint
from tests.conftest import ROOT, TINY_RUN, requires_mnist

pytestmark = [requires_mnist, pytest.mark.ddp]


def test_one_cli_run_in_one_folder_each_rank_its_own_noise_and_checkpoints_keep_every_stream(
    tmp_path, tmp_path_factory
):
    """The command line's tiny 2-process DDP run, with the default W&B logger offline: it was
    also the run of tests/test_cli.py (rank 1, relaunched by Lightning, writes into rank 0's
    run folder only) and of tests/test_journeys.py (W&B offline ends clean on every rank)."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    home = tmp_path_factory.mktemp("home")  # no W&B credentials; outside the checked folder
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "trainer=ddp_cpu",
         *[a for a in TINY_RUN if a != "logger=csv"], "model.net.hidden_dims=[16]",
         "model.num_samples=4", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        env={**env, "HOME": str(home), "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Error" not in result.stderr, result.stderr[-3000:]
    assert list((run_dir / "wandb").glob("offline-run-*"))
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 4
    # Lightning relaunches train.py for rank 1 into the same run directory; nothing else.
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert (run_dir / ".hydra" / "config.yaml").exists()
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    (rng,) = [v for k, v in checkpoint["callbacks"].items() if "PreemptionCheckpoint" in k]
    assert len(rng["ranks"]) == 2
    # Same seed on both ranks until set-up (one initial model); different streams after it.
    assert not torch.equal(rng["ranks"][0]["torch"], rng["ranks"][1]["torch"])
    assert rng["ranks"][0]["numpy"][1].tolist() != rng["ranks"][1]["numpy"][1].tolist()


def test_the_two_layer_model_trains_under_ddp_with_per_layer_statistics(tmp_path):
    """model=two_layer under 2-process DDP: one backward per step reaches both layers, the
    gradient statistics (averaged across ranks) come per stochastic layer."""
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "trainer=ddp_cpu", *TINY_RUN,
         "model=two_layer", "model.net.latent_dims=[4,2]", "model.net.hidden_dims=[[8],[8]]",
         "model.num_samples=4", "estimator=dreg_iwae", "callbacks=grad_stats",
         f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (csv_path,) = run_dir.rglob("metrics.csv")
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    for layer in ("inference_layer1", "inference_layer2"):
        values = [float(r[f"grad/{layer}/snr"]) for r in rows if r.get(f"grad/{layer}/snr")]
        assert values and all(math.isfinite(v) for v in values), layer
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 4
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())
