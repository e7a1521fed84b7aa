"""Every option of every config group composes, instantiates, and has the paper's values."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import MissingConfigException
from hydra.utils import instantiate

from tests.conftest import CONF_DIR, ROOT, compose_config

GROUPS = [
    "dataset",
    "model",
    "estimator",
    "trainer",
    "logger",
    "callbacks",
    "mode",
    "debug",
    "experiment",
]
OPTIONS = [
    (group, path.stem) for group in GROUPS for path in sorted((CONF_DIR / group).glob("*.yaml"))
]


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(group, option, tmp_path):
    cfg = compose_config([f"{group}={option}"], tmp_path)
    if group in ("debug", "experiment"):  # global packages: they change other groups
        assert "csv" in cfg.logger
    else:
        assert cfg.get(group) is not None
    if group == "estimator":
        estimator = instantiate(cfg.estimator)
        assert estimator.name == option  # the YAML builds the estimator it is named for
        assert "num_samples" not in cfg.estimator  # K has one home: model.num_samples
    if group == "trainer" and option in ("default", "cpu"):
        trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
        assert trainer.max_steps == cfg.trainer.max_steps


def test_defaults_are_the_papers(tmp_path):
    cfg = compose_config([], tmp_path)
    assert cfg.model.num_samples == 64
    assert cfg.model.eval_num_samples == 5000
    assert cfg.model.net.latent_dim == 50
    assert list(cfg.model.net.hidden_dims) == [200, 200]
    assert cfg.model.net.activation == "tanh"
    assert cfg.model.optimizer.lr == pytest.approx(3e-4)
    assert cfg.dataset.batch_size == 32
    assert cfg.estimator._target_ == "dreg.estimators.IWAE"
    assert "wandb" in cfg.logger
    assert cfg.mode.run._target_ == "dreg.run.train"


@pytest.mark.parametrize("launcher", ["local", "slurm"])
def test_launcher_configs_compose(launcher, tmp_path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    expected = {"local": "JoblibLauncher", "slurm": "SlurmLauncher"}[launcher]
    assert cfg.hydra.launcher._target_.endswith(expected)


def test_unknown_option_lists_the_choices(tmp_path):
    with pytest.raises(MissingConfigException, match="estimator"):
        compose_config(["estimator=dreg_iwea"], tmp_path)


def test_cli_typo_fails_fast_with_the_valid_choices(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "estimator=iwea", f"hydra.run.dir={tmp_path}/run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "Could not find 'estimator/iwea'" in result.stderr
    assert "Available options in 'estimator'" in result.stderr
    assert "iwae" in result.stderr
