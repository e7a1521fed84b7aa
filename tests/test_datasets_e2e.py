"""End to end on each dataset: compose the real config, train a few steps, validate, test.

Small slices of the real data from ``$DREG_DATA_DIR`` (skipped, with the reason, without it).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from dreg.run import train

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
NEEDS = {
    "mnist": "MNIST/raw/train-images-idx3-ubyte.gz",
    "struct_mnist": "MNIST/raw/train-images-idx3-ubyte.gz",
    "omniglot": "omniglot-lake/omniglot_lake_105x105.npz",
}


@pytest.mark.slow
@pytest.mark.parametrize("dataset", sorted(NEEDS))
def test_train_and_test_each_dataset(dataset: str, tmp_path: Path) -> None:
    root = os.environ.get("DREG_DATA_DIR")
    if not root:
        pytest.skip("DREG_DATA_DIR is not set (point it at the folder holding the datasets)")
    if not (Path(root) / NEEDS[dataset]).exists():
        pytest.skip(f"DREG_DATA_DIR={root} lacks {NEEDS[dataset]}")
    overrides = [
        f"dataset={dataset}",
        "logger=csv",
        f"paths.data_dir={root}",
        f"paths.output_dir={tmp_path}",
        "dataset.train_subset=512",
        "dataset.eval_subset=100",
        "dataset.eval_batch_size=50",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        "model.num_samples=8",
        "model.eval_num_samples=20",
    ]
    if dataset == "omniglot":  # the data folder may be read-only (CI): prepare into tmp_path
        overrides.append(f"dataset.prepared_path={tmp_path / 'omniglot28.npz'}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    metrics = train(cfg)
    assert metrics["global_step"] == 4
    # Per-image log-likelihoods: negative, and a nats-per-pixel scale below log 2 (uniform).
    pixels = 392 if dataset == "struct_mnist" else 784
    assert -pixels * math.log(2) < metrics["test/log_likelihood"] < 0
    assert math.isfinite(metrics["test/bound"])
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    if dataset == "omniglot":  # training's prepare_data made it
        assert (tmp_path / "omniglot28.npz").exists()
