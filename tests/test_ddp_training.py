"""Training under 2-process DDP (gloo, CPU) through the real CLI: each rank its own noise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dreg.checkpointing import load_checkpoint
from tests.conftest import ROOT, TINY_RUN, requires_mnist

pytestmark = [requires_mnist, pytest.mark.ddp]


def test_each_rank_draws_its_own_noise_and_checkpoints_keep_every_stream(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "trainer=ddp_cpu", *TINY_RUN,
         "model.net.hidden_dims=[16]", "model.num_samples=4", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    (rng,) = [v for k, v in checkpoint["callbacks"].items() if "PreemptionCheckpoint" in k]
    assert len(rng["ranks"]) == 2
    # Same seed on both ranks until set-up (one initial model); different streams after it.
    assert not torch.equal(rng["ranks"][0]["torch"], rng["ranks"][1]["torch"])
    assert rng["ranks"][0]["numpy"][1].tolist() != rng["ranks"][1]["numpy"][1].tolist()
