"""Every estimator trains the MNIST model end to end from the command line.

One ``python train.py -m estimator=a,b,...`` process runs all of them (one interpreter start
instead of one per estimator); each estimator's test then checks its own job directory.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.estimators.cases import NAMES

ROOT = Path(__file__).resolve().parents[2]
MNIST = ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz")


def _has_mnist() -> bool:
    data_dir = os.environ.get("DREG_DATA_DIR")
    return bool(data_dir) and all((Path(data_dir) / "MNIST" / "raw" / f).exists() for f in MNIST)


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _has_mnist(), reason="set DREG_DATA_DIR to a folder with MNIST"),
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("estimator_sweep")
    command = [
        sys.executable, "train.py", "-m", f"estimator={','.join(NAMES)}",
        "debug=fast", "logger=csv", "callbacks=none", "trainer.enable_progress_bar=false",
        "trainer.max_steps=3", "trainer.log_every_n_steps=1", "trainer.val_check_interval=3",
        "model.num_samples=8", "model.eval_num_samples=10",  # K: a multiple of miwae's groups
        "dataset.train_subset=256", "dataset.eval_subset=100",
        f"hydra.sweep.dir={out}", "hydra.sweep.subdir=${hydra:runtime.choices.estimator}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    return out, result


@pytest.mark.parametrize("name", NAMES)
def test_estimator_trains_from_the_command_line(sweep, name):
    out, result = sweep
    metrics_file = out / name / "metrics.json"
    assert metrics_file.exists(), f"no metrics for {name}:\n{result.stderr[-3000:]}"
    metrics = json.loads(metrics_file.read_text())
    assert metrics["global_step"] == 3
    for key in ("test/log_likelihood", "test/bound"):
        assert math.isfinite(metrics[key]), key
    with (out / name / "csv" / "metrics.csv").open() as f:
        train_rows = [row for row in csv.DictReader(f) if row["train/objective"]]
    assert len(train_rows) == 3  # one logged training step each
    for row in train_rows:
        assert math.isfinite(float(row["train/objective"]))
        assert math.isfinite(float(row["train/iwae_bound"]))
