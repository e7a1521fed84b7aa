"""Fast end-to-end runs of the real training path on a slice of real MNIST."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dreg.run import build, train
from tests.conftest import requires_mnist

pytestmark = [requires_mnist, pytest.mark.slow]


def test_thirty_step_run_writes_finite_metrics(tiny_cfg, tmp_path):
    cfg = tiny_cfg("trainer.max_steps=30", "trainer.val_check_interval=15")
    metrics = train(cfg)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["global_step"] == 30
    for key in ("test/bound", "test/log_likelihood", "train/objective"):
        assert math.isfinite(written[key]), key
    assert written["git_commit"]
    assert metrics["test/log_likelihood"] == written["test/log_likelihood"]
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    logged = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/objective" in logged and "val/log_likelihood" in logged


def test_training_moves_both_parameter_groups(tiny_cfg):
    cfg = tiny_cfg()
    datamodule, module = build(cfg)
    before = [p.detach().clone() for p in module.net.parameters()]
    import pytorch_lightning as pl

    trainer = pl.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=datamodule)
    moved = [not torch.equal(b, p) for b, p in zip(before, module.net.parameters(), strict=True)]
    assert all(moved)


def test_loglikelihood_estimate_beats_the_k_sample_bound_after_training(tiny_cfg):
    """log p-hat with S = 1000 samples is >= the K = 64 bound on average (IWAE monotonicity)."""
    cfg = tiny_cfg(
        "trainer.max_steps=200",
        "trainer.val_check_interval=200",
        "model.num_samples=64",
        "model.eval_num_samples=1000",
        "dataset.eval_subset=200",
        "trainer.limit_test_batches=4",
    )
    metrics = train(cfg)
    assert metrics["test/log_likelihood"] > metrics["test/bound"]
    assert metrics["test/log_likelihood"] > -250  # 200 steps already beat the initial ~-550


def test_frozen_decoder_trains_only_the_encoder(tiny_cfg):
    cfg = tiny_cfg("train_model=false")
    datamodule, module = build(cfg)
    decoder_before = [p.detach().clone() for p in module.net.model_parameters()]
    encoder_before = [p.detach().clone() for p in module.net.inference_parameters()]
    import pytorch_lightning as pl

    pl.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
    ).fit(module, datamodule=datamodule)
    after = module.net.model_parameters()
    assert all(torch.equal(b, p) for b, p in zip(decoder_before, after, strict=True))
    after = module.net.inference_parameters()
    assert all(not torch.equal(b, p) for b, p in zip(encoder_before, after, strict=True))
