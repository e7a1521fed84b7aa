"""Hyper-parameter search through the real CLI: hydra/sweeper=optuna_lr (extra ``optuna``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir

from tests.conftest import CONF_DIR, ROOT, requires_mnist

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install -e '.[optuna]'")
optuna = pytest.importorskip("optuna")

LR_RANGE = (3e-5, 3e-3)


def test_optuna_lr_maximizes_the_returned_metric_over_a_log_lr_range():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", ["hydra/sweeper=optuna_lr"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper.direction == "maximize"  # the plugin's own default minimizes
    assert cfg.optimized_metric == "val/log_likelihood"  # never select on test data
    assert sweeper.params["model.optimizer.lr"] == "tag(log, interval(3e-5, 3e-3))"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.sampler.seed is not None  # the same command proposes the same trials


@requires_mnist
@pytest.mark.slow
def test_three_trial_study_through_the_cli_names_the_best_learning_rate(tmp_path):
    sweep_dir, study_db = tmp_path / "sweep", tmp_path / "study.db"
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            "hydra/sweeper=optuna_lr",
            "hydra.sweeper.n_trials=3",
            f"hydra.sweeper.storage=sqlite:///{study_db}",
            "debug=fast",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",  # the selection metric is the last validation
            "model.eval_num_samples=20",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    results = {}  # learning rate -> that trial's returned metric
    jobs = sorted(p.parent for p in sweep_dir.glob("*/metrics.json"))
    assert len(jobs) == 3, sorted(p.name for p in sweep_dir.iterdir())
    for job in jobs:
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        (lr,) = [float(o.split("=")[1]) for o in overrides if o.startswith("model.optimizer.lr")]
        assert LR_RANGE[0] <= lr <= LR_RANGE[1]
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["status"] == "completed" and metrics["global_step"] == 2
        results[lr] = metrics["val/log_likelihood"]
    assert len(results) == 3  # three different learning rates were tried

    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    best_lr = max(results, key=results.get)
    assert best["best_params"] == {"model.optimizer.lr": best_lr}
    assert best["best_value"] == results[best_lr]

    # The study on disk holds the same trials (SQLAlchemy pinned <2 for optuna 2.10).
    study = optuna.load_study(study_name="dreg", storage=f"sqlite:///{study_db}")
    assert sorted(t.value for t in study.trials) == sorted(results.values())
