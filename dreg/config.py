"""Fail fast: check a composed config before any data is read or any file is written.

Hydra already rejects unknown group options (listing the valid ones) and unknown keys (struct
mode). This catches values that compose fine but cannot work, each with a one-line message
naming the key, the value and the fix.
"""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from dreg.errors import ConfigError
from dreg.estimators.base import check_num_samples


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value}: must be {rule}; override it, e.g. {key}=<{rule}>")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first impossible value in ``cfg``."""
    model, data = cfg.model, cfg.dataset
    _require(
        _positive_int(model.num_samples), "model.num_samples", model.num_samples, "an integer >= 1"
    )
    _require(
        _positive_int(model.eval_num_samples),
        "model.eval_num_samples",
        model.eval_num_samples,
        "an integer >= 1",
    )
    _require(
        _positive_int(model.eval_chunk_size),
        "model.eval_chunk_size",
        model.eval_chunk_size,
        "an integer >= 1",
    )
    _require(
        _positive_int(data.batch_size), "dataset.batch_size", data.batch_size, "an integer >= 1"
    )
    _require(
        _positive_int(data.eval_batch_size),
        "dataset.eval_batch_size",
        data.eval_batch_size,
        "an integer >= 1",
    )
    lr = model.optimizer.get("lr")
    _require(isinstance(lr, int | float) and lr > 0, "model.optimizer.lr", lr, "a number > 0")
    _require(
        _positive_int(model.get("steps_per_call", 1)),
        "model.steps_per_call",
        model.get("steps_per_call"),
        "an integer >= 1",
    )
    clip = model.get("clip_grad_norm")
    _require(
        clip is None or (isinstance(clip, int | float) and clip > 0),
        "model.clip_grad_norm",
        clip,
        "a number > 0 (or null)",
    )
    if cfg.trainer.get("gradient_clip_val") is not None:
        raise ConfigError(
            f"trainer.gradient_clip_val={cfg.trainer.gradient_clip_val}: Lightning does not "
            "clip manually optimized steps, which every dreg step is; use "
            f"model.clip_grad_norm={cfg.trainer.gradient_clip_val} instead"
        )
    accumulate = cfg.trainer.get("accumulate_grad_batches", 1)
    if accumulate != 1:
        raise ConfigError(
            f"trainer.accumulate_grad_batches={accumulate}: every dreg step is one optimizer "
            "step on one batch (manually optimized, which Lightning does not accumulate); "
            f"set a larger dataset.batch_size instead (e.g. {accumulate} times as large)"
        )
    policy = model.get("nonfinite", "raise")
    _require(policy in ("raise", "skip"), "model.nonfinite", policy, "raise or skip")
    steps = cfg.trainer.get("max_steps", -1)
    _require(
        steps == -1 or _positive_int(steps), "trainer.max_steps", steps, "an integer >= 1 (or -1)"
    )
    try:  # the estimator's own rules (e.g. dreg_alpha's alpha), then K against its minimum
        estimator = instantiate(cfg.estimator)
        check_num_samples(type(estimator), model.num_samples)
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise ConfigError(f"estimator: {cause}") from err
    except ValueError as err:
        raise ConfigError(f"estimator: {err}") from err
    if model.get("antithetic") and estimator.needs_independent_samples:
        raise ConfigError(
            f"model.antithetic=true: estimator '{estimator.name}' is unbiased only for "
            "independent samples; set model.antithetic=false or use iwae/vae/stl/rws/jvi"
        )
