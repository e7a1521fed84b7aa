"""Every experiment preset (``conf/experiment/*.yaml``) composes with its Hydra settings, its
sweep gives every job a valid config and its own directory, and it runs at a tiny size.

Parametrized over the files on disk, so a new preset is covered without editing this file.
"""

from __future__ import annotations

import csv
import functools
import json
import math
from pathlib import Path

import pytest
import torch
from hydra import initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig

from dreg.checkpointing import load_checkpoint
from dreg.config import validate
from dreg.estimators import estimator_by_name
from dreg.run import main, train
from tests.conftest import CONF_DIR, TINY_RUN, compose_config, requires_mnist

EXPERIMENTS = sorted(path.stem for path in (CONF_DIR / "experiment").glob("*.yaml"))

# Per mode, what shrinks its own work to a tiny run (TINY_RUN shrinks data, model and trainer).
# A preset with a mode missing here fails loudly rather than running the full-size study.
TINY_MODE = {
    "train": [],
    "diagnose": ["mode.num_samples=[1,4]", "mode.num_draws=3", "mode.batch_size=4"],
}


def compose_with_hydra(*jobs: list[str], run_mode: RunMode = RunMode.RUN) -> list[DictConfig]:
    """``conf/train.yaml`` with each job's overrides and the ``hydra`` node, as the CLI composes
    it; one Hydra instance for all jobs (its config repository is cached between them)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        hydra = GlobalHydra.instance().hydra
        return [
            hydra.compose_config("train", overrides, run_mode=run_mode, from_shell=False)
            for overrides in jobs
        ]


def sweep_jobs(master: DictConfig, arguments: list[str]) -> list[list[str]]:
    """The jobs of ``python train.py -m <arguments>``: the basic sweeper's own expansion of
    ``hydra.sweeper.params`` plus the command line into one override list per job."""
    assert master.hydra.sweeper._target_.endswith(".BasicSweeper")  # else not its expansion
    params = [f"{key}={values}" for key, values in (master.hydra.sweeper.params or {}).items()]
    overrides = OverridesParser.create().parse_overrides([*params, *arguments])
    (jobs,) = BasicSweeper.split_arguments(overrides, max_batch_size=None)
    return jobs


def covering_jobs(jobs: list[list[str]]) -> list[list[str]]:
    """As few jobs of the product as use every swept value (the i-th value of every key, cycling
    through the shorter lists): composing these checks every value without the whole product."""
    values = [list(dict.fromkeys(column)) for column in zip(*jobs, strict=True)]
    longest = max(len(v) for v in values)
    return [[v[i % len(v)] for v in values] for i in range(longest)]


@functools.cache  # read-only below; composed once for collection and reused by the tests
def experiment_cfg(experiment: str) -> DictConfig:
    (cfg,) = compose_with_hydra([f"experiment={experiment}"])
    return cfg


SWEEPS = [e for e in EXPERIMENTS if experiment_cfg(e).hydra.sweeper.get("params")]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_preset_composes_with_its_hydra_settings_and_validates(experiment):
    cfg = experiment_cfg(experiment)
    validate(cfg)  # the preset's own values (K, estimator, budget) are runnable
    assert callable(instantiate(cfg.mode.run))
    assert cfg.hydra.runtime.choices.mode in TINY_MODE, "add its tiny-run overrides to TINY_MODE"


@pytest.mark.parametrize("experiment", SWEEPS)
def test_sweep_preset_jobs_validate_and_get_their_own_directories(experiment):
    arguments = [f"experiment={experiment}"]
    (master,) = compose_with_hydra(arguments, run_mode=RunMode.MULTIRUN)
    jobs = sweep_jobs(master, arguments)
    assert len(jobs) > 1
    naming = master.hydra.job.config.override_dirname
    chosen = covering_jobs(jobs)
    assert all(job in jobs for job in chosen)
    for job, cfg in zip(chosen, compose_with_hydra(*chosen), strict=True):  # as the launcher does
        validate(cfg)
        # Each job's directory names its swept values: no two jobs share (and overwrite) one.
        dirname = cfg.hydra.job.override_dirname.split(naming.item_sep)
        swept = [o.replace("=", naming.kv_sep, 1) for o in job if o not in arguments]
        assert set(swept) <= set(dirname), (job, cfg.hydra.job.override_dirname)


# -- each preset run at a tiny size ------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> Path:
    """A tiny run's last checkpoint, for presets that start from a trained model."""
    out = tmp_path_factory.mktemp("trained")
    train(compose_config(TINY_RUN, out))
    return out / "checkpoints" / "last.ckpt"


def first_job(experiment: str) -> list[str]:
    """The overrides of the preset's run: its sweep's first job, or the preset alone."""
    arguments = [f"experiment={experiment}"]
    if experiment not in SWEEPS:
        return arguments
    (master,) = compose_with_hydra(arguments, run_mode=RunMode.MULTIRUN)
    return sweep_jobs(master, arguments)[0]


def check_training_run(cfg: DictConfig, out: Path, start: Path | None) -> None:
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert metrics["global_step"] == cfg.trainer.max_steps
    assert math.isfinite(metrics["test/log_likelihood"])
    if "csv" in (cfg.get("logger") or {}):
        assert list(out.rglob("metrics.csv")), "the CSV logger wrote nothing"
    if not cfg.train_model:  # the decoder stays as the checkpoint had it
        before = load_checkpoint(start)["state_dict"]
        after = load_checkpoint(out / "checkpoints" / "last.ckpt")["state_dict"]
        decoder = [k for k in before if k.startswith("net.decoder.")]
        assert decoder and all(torch.equal(before[k], after[k]) for k in decoder)


def check_diagnose_run(cfg: DictConfig, out: Path) -> None:
    with open(out / "snr_vs_k.csv") as f:
        rows = list(csv.DictReader(f))
    got = {(int(r["num_samples"]), r["estimator"]) for r in rows}
    want = {
        (k, name)
        for k in cfg.mode.num_samples
        for name in cfg.mode.estimators
        if k >= estimator_by_name(name).min_samples
    }
    assert got == want
    assert all(int(r["num_draws"]) == cfg.mode.num_draws for r in rows)
    assert (out / "snr_vs_k.png").read_bytes().startswith(b"\x89PNG")


@requires_mnist
@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_preset_runs_at_a_tiny_size(experiment, trained_checkpoint, tmp_path):
    preset = experiment_cfg(experiment)
    mode = preset.hydra.runtime.choices.mode
    overrides = [*first_job(experiment), *TINY_RUN, *TINY_MODE[mode]]
    # Presets that do not train a model from scratch start from a trained one.
    needs_model = not preset.train_model or mode != "train"
    start = trained_checkpoint if needs_model else None
    if start is not None:
        overrides.append(f"ckpt_path={start}")
    cfg = compose_config(overrides, tmp_path)
    main(cfg)
    if mode == "diagnose":
        check_diagnose_run(cfg, tmp_path)
    else:  # TINY_MODE knows no other mode (the composition test checks)
        check_training_run(cfg, tmp_path, start)
