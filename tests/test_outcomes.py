"""Honest outcomes: a run that did not train says so, skipped steps stay out of the
statistics, and what cannot work is refused in one line."""

from __future__ import annotations

import csv
import json
import math
from functools import partial

import pytest
import torch

from dreg.config import validate
from dreg.errors import ConfigError, NonFiniteError
from dreg.estimators import estimator_by_name
from dreg.lightning_module import DReGModule
from dreg.model import VAE
from dreg.run import train
from tests.conftest import NO_PROGRESS_BAR, cli, requires_mnist
from tests.test_reliability import inject_nan_at_call

TINY_NET = ["model.net.hidden_dims=[8]", "model.net.latent_dim=2", "model.num_samples=4"]


@requires_mnist
def test_a_run_that_skips_most_updates_fails_instead_of_completing(tmp_path):
    """lr=1e3 makes nearly every step non-finite: under skip the run used to end
    ``completed`` with exit 0 and a NaN test log-likelihood."""
    result = cli("debug=fast", *NO_PROGRESS_BAR, *TINY_NET, "model.nonfinite=skip",
                 "model.optimizer.lr=1e3", f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert result.returncode == NonFiniteError.exit_code, result.stderr[-2000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "model.max_skipped_fraction=0.1" in line and "model.optimizer.lr" in line
    status = json.loads((tmp_path / "status.json").read_text())
    assert (status["status"], status["exit_code"]) == ("failed", NonFiniteError.exit_code)
    assert not (tmp_path / "metrics.json").exists()


@requires_mnist
def test_a_skipped_step_never_enters_the_gradient_statistics(tiny_cfg, tmp_path, monkeypatch):
    """One non-finite step under skip used to make every later grad/*/snr NaN."""
    inject_nan_at_call(monkeypatch, 3)
    cfg = tiny_cfg("trainer.max_steps=8", "model.nonfinite=skip", "callbacks=grad_stats",
                   "model.max_skipped_fraction=0.5", *NO_PROGRESS_BAR)  # fmt: skip
    metrics = train(cfg)
    assert metrics["train/skipped_steps"] == 1
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").read_text().splitlines()))
    stats = [(row["step"], k, v) for row in rows for k, v in row.items() if k.startswith("grad/")]
    logged = {(step, key) for step, key, value in stats if value}
    assert ("8.0", "grad/inference/snr") in logged or ("8", "grad/inference/snr") in logged
    assert all(math.isfinite(float(v)) for _, _, v in stats if v), stats


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "16-true"])
def test_precision_that_needs_a_scaler_or_was_never_validated_is_refused(tiny_cfg, precision):
    with pytest.raises(ConfigError, match=f"trainer.precision={precision}: .*32-true"):
        validate(tiny_cfg(f"trainer.precision={precision}"))


def test_max_skipped_fraction_must_be_a_fraction(tiny_cfg):
    with pytest.raises(ConfigError, match=r"model.max_skipped_fraction=1.5: must be a number"):
        validate(tiny_cfg("model.max_skipped_fraction=1.5"))


def test_a_module_built_directly_refuses_antithetic_dreg():
    """The config check refuses it; so does the module built by hand (library users)."""
    net = VAE(12, latent_dim=2, hidden_dims=[4], train_mean=torch.rand(12))
    with pytest.raises(ValueError, match="antithetic=True: estimator 'dreg_iwae'"):
        DReGModule(net, estimator_by_name("dreg_iwae"), partial(torch.optim.Adam, lr=1e-3),
                   antithetic=True)  # fmt: skip
