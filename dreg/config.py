"""Fail fast: check a composed config before any data is read or any file is written.

Hydra already rejects unknown group options (listing the valid ones) and unknown keys (struct
mode). This catches values that compose fine but cannot work, each with a one-line message
naming the key, the value and the fix.
"""

from __future__ import annotations

import os
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dreg.errors import ConfigError
from dreg.estimators.base import check_num_samples
from dreg.loggers import wandb_has_credentials


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value}: must be {rule}; override it, e.g. {key}=<{rule}>")


def _integer(value: Any) -> bool:
    # YAML's true is a Python bool, which is an int; a count or a seed is never a bool.
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: Any) -> bool:
    return _integer(value) and value > 0


# Switches read with a plain `if`: any other value would silently count as on or off
# (resume=no is the non-empty string "no", hence true).
BOOLEAN_KEYS = (
    "resume",
    "resume_allow_changes",
    "train_model",
    "model.antithetic",
    "model.cuda_graph",
)
# model.compile: what is compiled. `true` once meant the MLPs; it is refused rather than
# guessed, so a config written for one meaning never silently runs the other.
COMPILE_CHOICES = (False, "mlps", "step")
SEED_RANGE = (0, 2**32 - 1)  # what numpy's and Lightning's seeding accept


def _check_types(cfg: DictConfig) -> None:
    """Values whose type decides what runs: an int key refuses 1.5, a switch refuses "no"."""
    seed = cfg.get("seed")
    _require(
        _integer(seed) and SEED_RANGE[0] <= seed <= SEED_RANGE[1],
        "seed",
        seed,
        f"an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]",
    )
    for key in BOOLEAN_KEYS:
        value = OmegaConf.select(cfg, key, default=False)
        _require(isinstance(value, bool), key, value, "true or false")
    _check_compile(cfg.model.get("compile", False))
    if cfg.model.get("compile") == "step" and cfg.model.get("cuda_graph"):
        raise ConfigError(
            "model.compile=step with model.cuda_graph=true: choose one way to take the step; "
            "model.compile=step alone (or model.cuda_graph=true alone, on CUDA)"
        )


def _check_compile(value: Any) -> None:
    if value is True:
        raise ConfigError(
            "model.compile=true: say what to compile; use model.compile=mlps (the encoder and "
            "decoder networks, what true meant) or model.compile=step (the whole training step)"
        )
    valid = value is False or value in COMPILE_CHOICES[1:]  # 0 == False, but 0 is no choice
    _require(valid, "model.compile", value, "false, mlps or step")


def _check_trainer_cadence(trainer: DictConfig) -> None:
    """Lightning's step counts: integers, and never 0 (dreg divides by them)."""
    steps = trainer.get("max_steps", -1)
    _require(
        (steps == -1 and _integer(steps)) or _positive_int(steps),
        "trainer.max_steps",
        steps,
        "an integer >= 1 (or -1)",
    )
    log_every = trainer.get("log_every_n_steps", 50)
    _require(_positive_int(log_every), "trainer.log_every_n_steps", log_every, "an integer >= 1")
    interval = trainer.get("val_check_interval")
    fraction = isinstance(interval, float) and 0 < interval <= 1
    _require(
        interval is None or _positive_int(interval) or fraction,
        "trainer.val_check_interval",
        interval,
        "an integer >= 1 (steps) or a fraction in (0, 1] of an epoch",
    )


def _check_dataset_sizes(data: DictConfig) -> None:
    for key in ("train_subset", "eval_subset"):
        value = data.get(key)
        rule = "an integer >= 1 (or null)"
        _require(value is None or _positive_int(value), f"dataset.{key}", value, rule)


# Credentials dreg cannot see (another server, an identity token, another netrc): wandb.init
# decides then, as it always did.
WANDB_OTHER_CREDENTIALS = ("WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE", "NETRC")


def _check_wandb_online(cfg: DictConfig) -> None:
    """Online W&B asked for without credentials: refused here, not as wandb.init's traceback
    after the data are loaded (logger.wandb.mode=online), nor silently run offline (auto with
    WANDB_MODE=online)."""
    wandb = (cfg.get("logger") or {}).get("wandb")
    if not wandb:
        return
    mode = wandb.get("mode", "auto")
    _require(
        mode in ("auto", "online", "offline"), "logger.wandb.mode", mode, "auto, online or offline"
    )
    if any(os.environ.get(k) for k in WANDB_OTHER_CREDENTIALS):
        return
    if mode == "online":
        asked = "logger.wandb.mode=online"
    elif mode == "auto" and os.environ.get("WANDB_MODE") == "online":
        asked = "WANDB_MODE=online"
    else:
        return
    if not wandb_has_credentials():
        raise ConfigError(
            f"{asked}: no W&B credentials (WANDB_API_KEY or ~/.netrc from `wandb login`); log "
            "in, or log offline with logger.wandb.mode=offline and upload later with wandb sync"
        )


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first impossible value in ``cfg``."""
    model, data = cfg.model, cfg.dataset
    _check_types(cfg)
    _check_dataset_sizes(data)
    _check_wandb_online(cfg)
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
    fraction = model.get("max_skipped_fraction", 0.1)
    _require(
        isinstance(fraction, int | float) and not isinstance(fraction, bool) and 0 <= fraction <= 1,
        "model.max_skipped_fraction",
        fraction,
        "a number in [0, 1]",
    )
    precision = str(cfg.trainer.get("precision", "32-true"))
    if precision not in ("32", "32-true", "64", "64-true"):
        # Every dreg step is manually optimized: its optimizer update does not go through
        # Lightning's precision plugin, so a gradient scaler would never unscale (16-mixed),
        # and a bf16 run's non-finite checks and records were never validated.
        raise ConfigError(
            f"trainer.precision={precision}: dreg steps train in full precision only; use "
            "trainer.precision=32-true (or 64-true)"
        )
    _check_trainer_cadence(cfg.trainer)
    try:  # the estimator's own rules (e.g. dreg_alpha's alpha), then K against its minimum
        estimator = instantiate(cfg.estimator)
        check_num_samples(type(estimator), model.num_samples)
        estimator.validate_num_samples(model.num_samples)  # its own rules (e.g. MIWAE's groups)
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
