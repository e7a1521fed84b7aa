"""What a user meets when something is wrong: a value of the wrong type, an override Hydra
refuses, W&B online without credentials, an unwritable run folder, a sweep with a failed job,
and a path into a sweep's job folder pasted into the next command."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

import train
from dreg.config import validate
from dreg.errors import EXIT_SWEEP_FAILED, ConfigError, StorageError
from dreg.run import main
from dreg.sweep import job_folder
from tests.conftest import NO_PROGRESS_BAR, TINY_RUN, cli, compose_config, requires_mnist

# The tiny model of these journeys: seconds per run.
TINY_MODEL = ["model.net.hidden_dims=[8]", "model.net.latent_dim=2", "model.num_samples=4"]


def config_error(overrides: list[str], tmp_path: Path) -> str:
    with pytest.raises(ConfigError) as raised:
        validate(compose_config(overrides, tmp_path))
    return str(raised.value)


def last_line(result) -> str:
    return result.stderr.strip().splitlines()[-1]


# -- honest types -----------------------------------------------------------------------------
WRONG_TYPES = {
    "seed=1.5": "seed=1.5: must be an integer",  # was silently seed 1
    "seed=-1": "seed=-1: must be an integer in [0,",
    "resume=no": "resume=no: must be true or false",  # the string "no" is true
    "train_model=1": "train_model=1: must be true or false",
    "model.antithetic=yes": "model.antithetic=yes: must be true or false",
    "resume_allow_changes=0": "resume_allow_changes=0: must be true or false",
    "model.compile=fast": "model.compile=fast: must be false, mlps or step",
    "model.compile=true": "model.compile=true: say what to compile; use model.compile=mlps",
    "trainer.max_steps=2.5": "trainer.max_steps=2.5: must be an integer >= 1 (or -1)",
    "trainer.max_steps=-1.0": "trainer.max_steps=-1.0: must be an integer >= 1 (or -1)",
    "trainer.val_check_interval=0": "trainer.val_check_interval=0: must be an integer >= 1",
    "trainer.val_check_interval=1.5": "trainer.val_check_interval=1.5: must be an integer",
    "trainer.log_every_n_steps=0": "trainer.log_every_n_steps=0: must be an integer >= 1",
    "dataset.train_subset=0.5": "dataset.train_subset=0.5: must be an integer >= 1 (or null)",
    "dataset.eval_subset=true": "dataset.eval_subset=True: must be an integer >= 1 (or null)",
}


@pytest.mark.parametrize("override", list(WRONG_TYPES))
def test_a_value_of_the_wrong_type_is_refused_in_one_line(override, tmp_path):
    message = config_error([override], tmp_path)
    assert "\n" not in message
    assert message.startswith(WRONG_TYPES[override]), message


@pytest.mark.parametrize(
    "override",
    ["model.compile=false", "model.compile=mlps", "model.compile=step", "seed=4294967295",
     "trainer.val_check_interval=0.5", "trainer.max_steps=-1", "dataset.train_subset=null"],
)  # fmt: skip
def test_values_of_the_right_type_pass(override, tmp_path):
    validate(compose_config([override], tmp_path))


# seed=1.5 ran as seed 1; val_check_interval=0 was a ZeroDivisionError traceback.
REFUSED_RUNS = ["seed=1.5", "trainer.val_check_interval=0", "model.compile=true"]


@pytest.mark.slow  # a real process (imports Lightning)
def test_the_cli_refuses_a_wrong_type_with_one_line_and_exit_2(tmp_path):
    override = REFUSED_RUNS[0]  # the others' runs, in process: the next test
    result = cli(*TINY_RUN, override, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert last_line(result).startswith(f"error: {override}: "), last_line(result)


@pytest.mark.parametrize("override", REFUSED_RUNS)
def test_a_run_refuses_a_wrong_type_with_one_line_and_exit_2(override, tmp_path):
    # What train.py runs, in process: the error it prints as its last line, and its code.
    with pytest.raises(ConfigError) as raised:
        main(compose_config([*TINY_RUN, override], tmp_path / "run"))
    assert raised.value.exit_code == 2 and "\n" not in str(raised.value)
    assert str(raised.value).startswith(f"{override}: "), str(raised.value)


# -- Hydra's own refusals ---------------------------------------------------------------------
HYDRA_REFUSALS = {
    "model.num_sampels=3": "error: Could not override 'model.num_sampels'. To append",
    "estimator=nope": "error: In 'train': Could not find 'estimator/nope'; Available options "
    "in 'estimator': ",
    "hydra/launcher=nope": "error: In 'hydra/config': Could not find 'hydra/launcher/nope'",
    "seed=[1,2": "error: no viable alternative at input '[1,2'",
}


@pytest.mark.parametrize("override", list(HYDRA_REFUSALS))
def test_an_override_hydra_refuses_is_a_config_error_in_one_line(override, tmp_path):
    result = cli(override, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]  # was 1, the code of a bug
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert last_line(result).startswith(HYDRA_REFUSALS[override])
    assert "iwae, " in last_line(result) or override != "estimator=nope"  # the options, listed
    assert not (tmp_path / "run").exists()


def test_help_and_cfg_still_work(tmp_path):
    assert cli("--help").returncode == 0
    shown = cli("--cfg", "job", "seed=3")
    assert shown.returncode == 0 and "seed: 3" in shown.stdout


def test_train_py_repeats_the_exit_codes_of_dreg_errors():
    assert (train.EXIT_CONFIG, train.EXIT_STORAGE) == (
        ConfigError.exit_code,
        StorageError.exit_code,
    )
    assert train.EXIT_SWEEP_FAILED == EXIT_SWEEP_FAILED


# -- W&B online without credentials ------------------------------------------------------------
def no_wandb_credentials(monkeypatch, tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"  # no ~/.netrc
    home.mkdir(exist_ok=True)
    env = {"HOME": str(home), "WANDB_API_KEY": ""}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    return env


@pytest.mark.parametrize("how", ["logger.wandb.mode=online", "WANDB_MODE=online"])
def test_wandb_online_without_credentials_is_refused(how, tmp_path, monkeypatch):
    no_wandb_credentials(monkeypatch, tmp_path)
    overrides = ["logger=wandb"]
    if how.startswith("WANDB_MODE"):
        monkeypatch.setenv("WANDB_MODE", "online")  # was: silently offline
    else:
        overrides.append(how)
    message = config_error(overrides, tmp_path)
    assert message.startswith(f"{how}: no W&B credentials"), message
    assert "logger.wandb.mode=offline" in message


@pytest.mark.slow
def test_wandb_online_without_credentials_on_the_cli_is_one_line_and_exit_2(tmp_path, monkeypatch):
    env = no_wandb_credentials(monkeypatch, tmp_path)
    tiny = [o for o in TINY_RUN if not o.startswith("logger=")]
    run = tmp_path / "run"
    result = cli(*tiny, "logger=wandb", "logger.wandb.mode=online", f"hydra.run.dir={run}", env=env)
    assert result.returncode == 2, result.stderr[-2000:]  # was wandb's traceback, exit 1
    assert last_line(result).startswith("error: logger.wandb.mode=online: no W&B credentials")
    assert json.loads((run / "status.json").read_text())["exit_code"] == 2


# -- an unwritable run folder ------------------------------------------------------------------
def test_an_unwritable_run_folder_is_one_line_and_the_storage_code(tmp_path):
    # A path below a file: unwritable for everyone, root included (a chmod is not).
    (tmp_path / "file").write_text("")
    result = cli(*NO_PROGRESS_BAR, f"hydra.run.dir={tmp_path / 'file' / 'run'}")
    assert result.returncode == StorageError.exit_code, result.stderr[-2000:]
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert last_line(result).startswith("error: cannot write the run folder: ")
    assert "hydra.run.dir" in last_line(result)


# -- a sweep: short folder names, a failed job ----------------------------------------------------
def test_job_folders_are_short_and_paste_safe():
    long = ",".join(f"model.net.hidden_dims=[{i},{i}],+callbacks.x{i}.y=/a b/c" for i in range(20))
    for name in (job_folder(7, long), job_folder(0, "estimator=dreg_iwae,seed=1")):
        assert re.fullmatch(r"[A-Za-z0-9._-]{1,60}", name), name
    assert job_folder(0, "estimator=dreg_iwae,seed=1") == "0_estimator-dreg_iwae_seed-1"
    assert job_folder(3, "model.net.hidden_dims=[8,8],model.optimizer.lr=-1") == (
        "3_hidden_dims-8_8_lr--1"
    )
    assert job_folder(2, "") == "2"


@requires_mnist
@pytest.mark.slow
def test_a_sweep_with_a_failed_job_exits_9_naming_it_and_its_folders_paste_unquoted(tmp_path):
    """Also the run of tests/test_reliability.py's "a failing job does not lose the others"
    (the same sweep): every job ran, the good one's results are kept."""
    sweep = tmp_path / "sweep"
    result = cli("-m", "debug=fast", *NO_PROGRESS_BAR, *TINY_MODEL, "trainer.max_steps=2",
                 "trainer.val_check_interval=2",
                 "model.optimizer.lr=0.001,-1", f"hydra.sweep.dir={sweep}")  # fmt: skip
    assert result.returncode == EXIT_SWEEP_FAILED, result.stderr[-3000:]
    line = last_line(result)
    assert line.startswith(f"error: 1 of 2 jobs of the sweep {sweep} failed: 1_"), line
    assert "(exit 2); first error: model.optimizer.lr=-1: must be a number > 0" in line
    assert line.endswith(f"every job's status: {sweep}/summary.csv")

    # A failing job does not lose the others: after running every job (exit 9 above), the
    # good one is completed with its results, the bad one failed naming its override.
    with open(sweep / "summary.csv") as f:
        rows = {row["job"]: row for row in csv.DictReader(f)}
    # The job number, then the swept value first, then the other overrides in short.
    good_job = "0_lr-0.001_refresh_rate-0_debug-fast_hidden_dims-8_latent_di"  # 60 characters
    bad_job = "1_lr--1_refresh_rate-0_debug-fast_hidden_dims-8_latent_dim-2"
    assert sorted(rows) == [good_job, bad_job]
    good, bad = rows[good_job], rows[bad_job]
    assert good["status"] == "completed" and float(good["test/log_likelihood"]) < 0
    assert bad["status"] == "failed" and "model.optimizer.lr=-1" in bad["error"]
    assert (sweep / good_job / "metrics.json").exists()

    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == [good_job, bad_job]
    assert [p.name[:2] for p in jobs] == ["0_", "1_"]
    for job in jobs:
        assert re.fullmatch(r"[A-Za-z0-9._-]{1,60}", job.name), job.name
        assert "model.optimizer.lr" in str(
            yaml.safe_load((job / ".hydra/overrides.yaml").read_text())
        )
    # The next command takes a path into a job folder as it is, unquoted.
    last = jobs[0] / "checkpoints" / "last.ckpt"
    assert last.exists()
    shown = cli("--cfg", "job", f"ckpt_path={last}")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert f"ckpt_path: {last}" in shown.stdout
