"""Trajectory callbacks and inference-network-only training from a checkpoint (in process)."""

from __future__ import annotations

import pytest
import torch

from dreg.checkpointing import CheckpointError
from dreg.config import validate
from dreg.errors import ConfigError
from dreg.run import build, build_trainer, train
from tests.conftest import TINY_RUN, compose_config, requires_mnist

pytestmark = [requires_mnist, pytest.mark.slow]

COMPARE = [
    "callbacks=estimator_compare",
    "callbacks.estimator_compare.estimators=[iwae,stl,dreg_iwae]",
]


def fit(cfg):
    datamodule, module = build(cfg)
    trainer = build_trainer(cfg, cfg.paths.output_dir)
    trainer.fit(module, datamodule=datamodule)
    by_type = {type(c).__name__: c for c in trainer.callbacks}
    return module, by_type


def test_callbacks_log_variance_snr_and_replay_the_training_samples(tiny_cfg):
    _, callbacks = fit(tiny_cfg(*COMPARE, "callbacks.grad_stats.per_tensor=true"))
    stats = callbacks["GradientStatistics"].last_metrics
    compare = callbacks["EstimatorComparison"].last_metrics
    for group in ("model", "inference"):
        assert stats[f"grad/{group}/variance"] > 0 and stats[f"grad/{group}/snr"] > 0
    assert "grad/inference/encoder.net.0.weight/snr" in stats
    # The replayed forward pass reproduces the training step's samples exactly.
    assert compare["grad/compare/replay_rel_error"] < 1e-5
    # Training with iwae: the comparison's iwae EMA is the applied gradient's EMA.
    for stat in ("variance", "snr"):
        assert compare[f"grad/compare/iwae/inference/{stat}"] == pytest.approx(
            stats[f"grad/inference/{stat}"], rel=1e-5
        )
    assert {f"grad/compare/{n}/inference/snr" for n in ("stl", "dreg_iwae")} <= compare.keys()


def test_callbacks_write_to_the_logger(tiny_cfg, tmp_path):
    fit(tiny_cfg(*COMPARE))
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"grad/inference/snr", "grad/model/variance", "grad/compare/stl/inference/snr"} <= set(
        header
    )


def test_frozen_decoder_has_no_model_statistics(tiny_cfg):
    _, callbacks = fit(tiny_cfg("callbacks=grad_stats", "train_model=false"))
    stats = callbacks["GradientStatistics"].last_metrics
    assert "grad/inference/snr" in stats and not any(k.startswith("grad/model") for k in stats)


def test_gradient_accumulation_is_refused_in_one_line_naming_the_fix(tiny_cfg):
    # Each step (and so each replayed comparison) is one batch and one optimizer step.
    cfg = tiny_cfg(*COMPARE, "+trainer.accumulate_grad_batches=2")
    with pytest.raises(ConfigError) as refused:
        validate(cfg)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("trainer.accumulate_grad_batches=2: ")
    assert message.endswith("set a larger dataset.batch_size instead (e.g. 2 times as large)")


def test_inference_only_training_starts_from_the_checkpoint_weights(tmp_path):
    first = compose_config([*TINY_RUN, "trainer.max_steps=6"], tmp_path / "first")
    train(first)
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    second = compose_config(
        [*TINY_RUN, f"ckpt_path={ckpt}", "train_model=false"], tmp_path / "second"
    )
    metrics = train(second)
    # A fresh optimizer from step 0: resuming Lightning's state would end at step 6 at once.
    assert metrics["global_step"] == second.trainer.max_steps == 4
    before = torch.load(ckpt, weights_only=False)["state_dict"]
    after = torch.load(tmp_path / "second" / "checkpoints" / "last.ckpt", weights_only=False)
    after = after["state_dict"]
    decoder = [k for k in before if k.startswith("net.decoder.")]
    encoder = [k for k in before if k.startswith("net.encoder.")]
    assert decoder and all(torch.equal(before[k], after[k]) for k in decoder)
    assert all(not torch.equal(before[k], after[k]) for k in encoder if k.endswith("weight"))
    # Started from the checkpoint, not from a fresh initialisation: the decoder is trained.
    _, fresh = build(second)
    fresh_decoder = fresh.net.state_dict()["decoder.0.weight"]
    assert not torch.equal(fresh_decoder, after["net.decoder.0.weight"])


def test_missing_checkpoint_is_one_clear_error(tmp_path):
    cfg = compose_config(["logger=csv", "ckpt_path=nope.ckpt", "train_model=false"], tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint nope.ckpt not found; check ckpt_path"):
        train(cfg)
