"""W&B dashboards out of the box: every run's name, group, job type, tags, nested config and
summary, read back from the offline run's transaction log (what ``wandb sync`` uploads), and
one W&B mode per process."""

from __future__ import annotations

import csv
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict
from wandb.proto import wandb_internal_pb2

from dreg import loggers
from dreg.checkpointing import load_checkpoint
from dreg.errors import ConfigError
from dreg.loggers import WandbLogger, claim_wandb_mode, dashboard_fields, wandb_mode
from tests.conftest import CONF_DIR, NO_PROGRESS_BAR, cli, requires_mnist

# -- reading an offline run back --------------------------------------------------------------
# A .wandb file is a 7-byte header (":W&B", magic, version) and then LevelDB's log format:
# 32 KiB blocks of records (crc32, length, type), a protobuf Record split across blocks as
# FIRST, MIDDLE..., LAST pieces; a block's tail too short for a record header is padding.
BLOCK, HEADER = 32768, 7
FULL, LAST = 1, 4


def records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    offset, pending = HEADER, b""
    while offset + HEADER <= len(data):
        left = BLOCK - offset % BLOCK
        if left < HEADER:
            offset += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[offset : offset + HEADER])
        pending += data[offset + HEADER : offset + HEADER + length]
        offset += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def apply(into: dict[str, Any], items: Any) -> None:
    """Config or summary updates (a ``key``, or a ``nested_key`` path, and a JSON value)."""
    for item in items:
        *parents, last = [item.key] if item.key else list(item.nested_key)
        node = into
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = json.loads(item.value_json)


@dataclass
class OfflineRun:
    run: Any  # the RunRecord: run_id, display_name, run_group, job_type, tags
    config: dict[str, Any]
    summary: dict[str, Any]  # as it stands at the end of the log
    files: Path  # <offline run>/files: media/table/..., media/images/...

    def media(self, key: str) -> Path:
        """The file a table or (the first) image logged under ``key`` was written to."""
        entry = self.summary[key]
        return self.files / (entry["path"] if "path" in entry else entry["filenames"][0])


def read_offline_run(run_dir: Path) -> OfflineRun:
    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    (log,) = folder.glob("*.wandb")
    run, config, summary = None, {}, {}
    for record in records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            apply(config, record.run.config.update)
        elif kind == "config":
            apply(config, record.config.update)
        elif kind == "summary":
            apply(summary, record.summary.update)
    assert run is not None, log
    return OfflineRun(run=run, config=config, summary=summary, files=folder / "files")


# -- the fields and the mode, without training ------------------------------------------------
@pytest.fixture
def current_job():
    """Factory: make Hydra's config of a job with these overrides current, as in a real run."""

    def make(*overrides: str, multirun: bool = False) -> None:
        mode = RunMode.MULTIRUN if multirun else RunMode.RUN
        overrides = (*overrides, f"hydra.mode={mode.name}")  # what `train.py [-m]` adds
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = GlobalHydra.instance().hydra.compose_config(
                "train", list(overrides), run_mode=mode, from_shell=False
            )
        if multirun:  # what Hydra's run_job sets: the job's folder in its sweep
            with open_dict(cfg):
                cfg.hydra.runtime.output_dir = str(Path(cfg.hydra.sweep.dir).absolute() / "0")
        HydraConfig.instance().set_config(cfg)

    yield make
    HydraConfig.instance().cfg = None


def test_a_single_run_is_a_group_of_its_own_named_by_what_it_compares(current_job):
    current_job("estimator=dreg_iwae", "dataset=omniglot")
    fields = dashboard_fields(num_samples=64, seed=2, run_id="abcd1234")
    assert fields["name"] == "dreg_iwae-omniglot-K64-seed2"
    assert fields["group"] == "dreg_iwae-omniglot-K64-seed2-abcd1234"
    assert fields["job_type"] == "train"
    assert fields["tags"] == ["estimator:dreg_iwae", "dataset:omniglot", "K:64", "model:vae"]
    assert fields["config"]["choices"]["estimator"] == "dreg_iwae"
    assert not any(group.startswith("hydra") for group in fields["config"]["choices"])


def test_a_sweeps_jobs_share_its_group_and_the_job_type_is_the_mode(current_job):
    current_job(
        "experiment=paper_families", "hydra.sweep.dir=out/multirun/2026-01-02", multirun=True
    )
    fields = dashboard_fields(num_samples=64, seed=0, run_id="abcd1234")
    assert fields["group"] == "paper_families/2026-01-02"
    assert dashboard_fields(64, 0, train_model=False)["job_type"] == "inference_only"

    current_job("mode=bias_check", "estimator=stl", "hydra.sweep.dir=out/lr", multirun=True)
    fields = dashboard_fields(num_samples=8, seed=1)
    assert (fields["group"], fields["job_type"]) == ("lr", "bias_check")
    assert fields["name"] == "bias_check-stl-mnist-K8-seed1"

    current_job("mode=diagnose")  # it studies lists of estimators and of K: neither in the name
    fields = dashboard_fields(num_samples=8, seed=1, run_id="abcd1234")
    assert (fields["name"], fields["job_type"]) == ("diagnose-mnist-seed1", "diagnose")
    assert fields["tags"] == ["dataset:mnist", "model:vae"]


def test_outside_a_hydra_app_the_fields_are_what_is_known(monkeypatch):
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # e.g. a config from compose()
    fields = dashboard_fields(num_samples=4, seed=0, run_id="abcd1234")
    assert (fields["name"], fields["group"], fields["tags"]) == ("K4-seed0", "K4-seed0-abcd1234",
                                                                 ["K:4"])  # fmt: skip


def test_one_process_keeps_one_wandb_mode(monkeypatch, tmp_path):
    monkeypatch.setattr(loggers, "_process_mode", None)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_API_KEY", "")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode("auto") == "offline"  # no credentials
    monkeypatch.setenv("WANDB_API_KEY", "not-a-key")
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # what Lightning sets for an offline run
    assert wandb_mode("auto") == "offline"
    with pytest.raises(ValueError, match="auto, online or offline"):
        wandb_mode("sometimes")

    claim_wandb_mode("offline")  # the process's first run
    claim_wandb_mode("offline")
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode("auto") == "offline"  # credentials or not: the process's mode
    with pytest.raises(ConfigError) as refused:
        claim_wandb_mode("online")
    assert str(refused.value).startswith("logger.wandb.mode=online: this process already logs")
    assert "\n" not in str(refused.value)

    # A logger of the other mode is refused when its run would start, before wandb.init.
    online = WandbLogger(save_dir=str(tmp_path), offline=False, project="dreg")
    with pytest.raises(ConfigError, match="already logs to W&B offline"):
        _ = online.experiment
    assert online._experiment is None


# -- the real command line --------------------------------------------------------------------
TINY = [
    "logger=wandb",
    *NO_PROGRESS_BAR,
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.log_every_n_steps=1",
    "dataset.train_subset=256",
    "dataset.eval_subset=50",
    "dataset.eval_batch_size=50",
    "model.num_samples=4",
    "model.eval_num_samples=20",
    "model.net.hidden_dims=[8]",
    "model.net.latent_dim=2",
]
TEST_CONFIGS = Path(__file__).resolve().parent / "configs"  # config groups of the tests
# The checks of a run folder after a real run: no credentials anywhere, so offline, no prompt.
NO_CREDENTIALS = {"WANDB_API_KEY": "", "WANDB_MODE": "", "WANDB_DIR": ""}


def run_cli(home: Path, *args: str) -> None:
    home.mkdir(exist_ok=True)
    result = cli(*args, env={"HOME": str(home), **NO_CREDENTIALS})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny training run logged to W&B (offline); its folder."""
    root = tmp_path_factory.mktemp("wandb")
    run_cli(root / "home", *TINY, f"hydra.run.dir={root / 'train'}")
    return root / "train"


@requires_mnist
@pytest.mark.slow
def test_a_training_run_records_its_fields_nested_config_and_summary(trained):
    recorded = read_offline_run(trained)
    run, config, summary = recorded.run, recorded.config, recorded.summary
    run_id = (trained / "wandb" / "run_id").read_text().strip()
    assert run.run_id == run_id
    assert run.display_name == "iwae-mnist-K4-seed0"
    assert run.run_group == f"iwae-mnist-K4-seed0-{run_id}"  # a single run: its own group
    assert run.job_type == "train"
    assert list(run.tags) == ["estimator:iwae", "dataset:mnist", "K:4", "model:vae"]

    # The resolved config, nested: a panel can group by model.num_samples or choices.estimator.
    assert config["model"]["num_samples"] == 4
    assert config["model"]["net"]["hidden_dims"] == [8]
    assert config["dataset"]["train_subset"] == 256
    assert config["choices"]["estimator"] == "iwae"
    assert config["seed"] == 0

    # Summary: the best validation log-likelihood, the test numbers and their checkpoint's step.
    metrics = json.loads((trained / "metrics.json").read_text())
    with (trained / "csv" / "metrics.csv").open() as f:
        val = [(float(r["val/log_likelihood"]), int(r["step"])) for r in csv.DictReader(f)
               if r["val/log_likelihood"]]  # fmt: skip
    assert len(val) == 2
    best, best_step = max(val)
    assert summary["val/log_likelihood"] == {"max": pytest.approx(best)}
    assert summary["test/log_likelihood"] == pytest.approx(metrics["test/log_likelihood"])
    assert summary["test/bound"] == pytest.approx(metrics["test/bound"])
    tested = load_checkpoint(trained / metrics["tested_checkpoint"])["global_step"]
    assert summary["test/checkpoint_step"] == tested == best_step
    assert summary["test/checkpoint"] == metrics["tested_checkpoint"]
    assert summary["global_step"] == 4


@requires_mnist
@pytest.mark.slow
def test_every_mode_has_its_job_type_and_the_diagnostics_their_tables_and_plots(trained):
    ckpt = f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}"
    home, root = trained.parent / "home", trained.parent / "modes"
    # The three uses of the checkpoint are the three jobs of one sweep (one process): each
    # job's overrides are an option of the group tests/configs/dashboard_mode (inference_only:
    # train_model=false, trainer.max_steps=2; bias_check: mode=bias_check,
    # estimator=dreg_iwae, mode.num_batches=8, mode.batch_size=4; diagnose: mode=diagnose,
    # mode.num_samples=[1,4], mode.num_draws=2, mode.batch_size=4), each in its own folder.
    modes = ["inference_only", "bias_check", "diagnose"]
    run_cli(home, "-m", *TINY, ckpt, f"hydra.searchpath=[file://{TEST_CONFIGS}]",
            f"+dashboard_mode={','.join(modes)}", f"hydra.sweep.dir={root}",
            "hydra.sweep.subdir=${hydra:runtime.choices.dashboard_mode}")  # fmt: skip
    for name in modes:
        assert read_offline_run(root / name).run.job_type == name

    bias = read_offline_run(root / "bias_check")
    assert bias.run.display_name == "bias_check-dreg_iwae-mnist-K4-seed0"
    report = json.loads((root / "bias_check" / "bias_check.json").read_text())
    assert bias.summary["bias/verdict"] == report["verdict"]
    table = json.loads(bias.media("bias/t_tests").read_text())
    names = [row[0] for row in table["data"]]
    assert names == ["aggregate", *(r["name"] for r in report["per_tensor"]), "all_coordinate_mean"]
    assert table["data"][0][table["columns"].index("t")] == pytest.approx(report["aggregate"]["t"])
    assert bias.media("bias/t_plot").stat().st_size > 1000  # a PNG of the t statistics

    diagnose = read_offline_run(root / "diagnose")
    assert diagnose.run.display_name == "diagnose-mnist-seed0"
    table = json.loads(diagnose.media("diagnose/snr_vs_k").read_text())
    with (root / "diagnose" / "snr_vs_k.csv").open() as f:
        assert len(table["data"]) == len(list(csv.DictReader(f))) == 4  # 2 K x 2 groups
    assert diagnose.media("diagnose/snr_vs_k_plot").stat().st_size > 1000


@requires_mnist
@pytest.mark.slow
def test_the_jobs_of_a_packed_sweep_are_runs_of_their_own_in_the_sweeps_group(tmp_path):
    sweep = tmp_path / "estimator_study"
    home = tmp_path / "home"
    home.mkdir()
    result = cli("-m", *TINY, "hydra.sweep.subdir=${hydra:job.num}", "estimator=iwae,dreg_iwae",
                 "hydra/launcher=packed", f"hydra.sweep.dir={sweep}",
                 env={"HOME": str(home), **NO_CREDENTIALS})  # fmt: skip
    runs = [read_offline_run(sweep / job) for job in ("0", "1")]
    assert runs[0].run.run_id != runs[1].run.run_id
    for job, recorded in zip(("0", "1"), runs, strict=True):
        assert recorded.run.run_id == (sweep / job / "wandb" / "run_id").read_text().strip()
    assert [r.run.run_group for r in runs] == ["estimator_study"] * 2
    assert [r.run.display_name for r in runs] == ["iwae-mnist-K4-seed0", "dreg_iwae-mnist-K4-seed0"]
    assert [r.config["choices"]["estimator"] for r in runs] == ["iwae", "dreg_iwae"]
    assert [r.run.job_type for r in runs] == ["train", "train"]
    assert result.returncode == 0, result.stderr[-3000:]
    for job, recorded in zip(("0", "1"), runs, strict=True):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["pack_size"] == 2
        assert recorded.summary["test/log_likelihood"] == pytest.approx(
            metrics["test/log_likelihood"]
        )
