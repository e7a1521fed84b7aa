"""Reliability: exact resume after a real kill, atomic checkpoints, fail-fast configs,
numerical-fault policies, sweeps that survive a failing job, determinism."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from dreg.checkpointing import CheckpointError, SafeCheckpointIO, load_checkpoint, request_stop
from dreg.config import ConfigError, validate
from dreg.errors import EXIT_PREEMPTED
from dreg.model import VAE
from dreg.run import main, train
from tests.conftest import (
    NO_PROGRESS_BAR,
    TINY_RUN,
    cli,
    compose_config,
    requires_mnist,
    start_cli,
    wait_for,
)

# -- preemption and exact resume ------------------------------------------------------------
RESUME_RUN = [
    *TINY_RUN,
    "trainer.max_steps=40",
    "trainer.val_check_interval=10",
    "callbacks=grad_stats",
]


def final_state(run_dir: Path) -> dict:
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    (stats,) = [v for k, v in checkpoint["callbacks"].items() if "GradientStatistics" in k]
    return {
        "model": checkpoint["state_dict"],
        "optimizer": checkpoint["optimizer_states"],
        "step": checkpoint["global_step"],
        "grad_stats": stats,
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The run the killed ones must equal, through the command line as they are: one for
    both signals."""
    reference = tmp_path_factory.mktemp("uninterrupted") / "reference"
    result = cli(*RESUME_RUN, f"hydra.run.dir={reference}")
    assert result.returncode == 0, result.stderr[-2000:]
    return reference


@requires_mnist
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_killed_run_resumes_bitwise_identical(tmp_path, sig, uninterrupted):
    reference = uninterrupted
    run_dir = tmp_path / "interrupted"
    proc = start_cli(*RESUME_RUN, f"hydra.run.dir={run_dir}")
    wait_for(run_dir / "checkpoints" / "best-step10.ckpt", proc)
    proc.send_signal(sig)  # mid-epoch, between step 10 and 40
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-2000:]  # never 0: `&& next` stops
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "preempted" and 10 <= status["global_step"] < 40, status
    assert not (run_dir / "metrics.json").exists()

    result = cli(*RESUME_RUN, f"hydra.run.dir={run_dir}", "resume=true")
    assert result.returncode == 0, result.stderr[-2000:]
    got, want = final_state(run_dir), final_state(reference)
    assert got["step"] == want["step"] == 40
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    for group, ema in want["grad_stats"].items():  # EMA gradient statistics continue exactly
        assert got["grad_stats"][group]["steps"] == ema["steps"] == 40
        assert torch.equal(got["grad_stats"][group]["m2"], ema["m2"]), group
    for got_group, want_group in zip(got["optimizer"], want["optimizer"], strict=True):
        for key, state in want_group["state"].items():
            for field, value in state.items():
                assert torch.equal(got_group["state"][key][field], value), (key, field)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = SafeCheckpointIO()  # Lightning's own save, our safe load
    io.save_checkpoint({"state": torch.ones(3)}, path)

    def killed_mid_write(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # as if killed while writing

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(io.load_checkpoint(path)["state"], torch.ones(3))  # old one intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_a_damaged_checkpoint_is_told_apart_from_a_file_that_is_not_one(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:-300])  # cut short: still starts like a zip archive
    with pytest.raises(CheckpointError, match=r"is damaged, e.g. cut short .*use another") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value) and "delete" not in str(err.value)
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        load_checkpoint(Path(__file__))  # a wrong path: never called corrupt


def write_corrupt_last_checkpoint(run_dir: Path) -> None:
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"\x00" * 100)


@requires_mnist
def test_resume_from_a_corrupt_checkpoint_fails_clearly(tiny_cfg, tmp_path):
    write_corrupt_last_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        train(tiny_cfg("resume=true"))


@requires_mnist
@pytest.mark.slow
def test_resume_from_a_corrupt_checkpoint_fails_clearly_on_the_cli(tmp_path):
    write_corrupt_last_checkpoint(tmp_path)
    result = cli(*TINY_RUN, f"hydra.run.dir={tmp_path}", "resume=true")
    assert result.returncode != 0
    assert "is not a checkpoint" in result.stderr


# -- fail-fast configuration ----------------------------------------------------------------
# Values checked by dreg.config's generic rules: the message starts with the override itself
# (key and value) and ends with the override that fixes it.
BAD_VALUES = [
    "model.num_samples=0",
    "model.num_samples=true",  # a bool is not a count, though Python says True == 1
    "model.eval_num_samples=0",
    "model.eval_chunk_size=0",
    "dataset.batch_size=0",
    "dataset.eval_batch_size=-5",
    "model.optimizer.lr=-0.1",
    "model.nonfinite=ignore",
    "trainer.max_steps=0",
    "model.steps_per_call=0",
    "model.clip_grad_norm=-1",
]
# The estimators' own rules: (overrides, how the message starts, the fix it names).
BAD_ESTIMATOR_SETTINGS = {
    "jackknife-K<2": (
        ["estimator=jvi", "model.num_samples=1"],
        "estimator: estimator 'jvi' needs K >= 2",
        "set model.num_samples=2 or more",
    ),
    "alpha>1": (
        ["estimator=dreg_alpha", "estimator.alpha=1.5"],
        "estimator: alpha=1.5: dreg_alpha needs",
        "a number in [0, 1]",
    ),
    "groups-not-dividing-K": (
        ["estimator=dreg_miwae", "model.num_samples=12"],
        "estimator: estimator 'dreg_miwae' splits the K samples into estimator.groups=8",
        "model.num_samples=12 is not a multiple of 8; set model.num_samples to a multiple of 8",
    ),
    "groups<1": (
        ["estimator=miwae", "estimator.groups=0"],
        "estimator: estimator.groups=0: miwae needs",
        "an integer >= 1",
    ),
    "ciwae-beta>1": (
        ["estimator=ciwae", "estimator.beta=1.5"],
        "estimator: beta=1.5: ciwae needs",
        "estimator.beta in [0, 1]",
    ),
    "antithetic-dreg": (
        ["estimator=dreg_iwae", "model.antithetic=true"],
        "model.antithetic=true: estimator 'dreg_iwae'",
        "set model.antithetic=false",
    ),
}


def config_error(overrides: list[str], tmp_path: Path) -> str:
    """The message :func:`dreg.config.validate` raises for the real config plus ``overrides``."""
    with pytest.raises(ConfigError) as raised:
        validate(compose_config(overrides, tmp_path))
    return str(raised.value)


@pytest.mark.parametrize("override", BAD_VALUES)
def test_bad_value_fails_validation_with_one_line_naming_key_value_and_fix(override, tmp_path):
    key = override.split("=")[0]
    message = config_error([override], tmp_path)
    assert "\n" not in message
    # Case-blind: the message spells the parsed value, e.g. YAML's `true` as Python's `True`.
    assert message.lower().startswith(f"{override}: must be ".lower()), message
    assert f"override it, e.g. {key}=<" in message, message


@pytest.mark.parametrize("case", list(BAD_ESTIMATOR_SETTINGS))
def test_bad_estimator_setting_fails_validation_with_one_line_and_fix(case, tmp_path):
    overrides, start, fix = BAD_ESTIMATOR_SETTINGS[case]
    message = config_error(overrides, tmp_path)
    assert "\n" not in message
    assert message.startswith(start), message
    assert fix in message, message


REFUSED_BEFORE_TRAINING = ["model.num_samples=0", "model.steps_per_call=0",
                           "+trainer.gradient_clip_val=1"]  # fmt: skip


@pytest.mark.slow  # a real process: importing Lightning alone takes seconds
def test_cli_exits_2_with_the_validation_message_before_writing_anything(tmp_path):
    # The same message validate() gives in process, printed as the last line, exit code 2.
    # (Each override's run, in process: the next test.)
    override = REFUSED_BEFORE_TRAINING[0]
    message = config_error([override], tmp_path / "in-process")
    run_dir = tmp_path / "run"
    result = cli(override, *NO_PROGRESS_BAR, f"hydra.run.dir={run_dir}")
    assert result.returncode == 2, result.stderr[-1000:]
    assert result.stderr.strip().splitlines()[-1] == f"error: {message}"
    # Nothing but Hydra's files, the folder lock and the failure record.
    written = sorted(p.name for p in run_dir.iterdir())
    assert written == [".hydra", ".lock", "status.json", "train.log"]
    status = json.loads((run_dir / "status.json").read_text())
    assert status == {"status": "failed", "error": message, "exit_code": 2}


@pytest.mark.parametrize("override", REFUSED_BEFORE_TRAINING)
def test_a_run_exits_2_with_the_validation_message_before_writing_anything(tmp_path, override):
    # What train.py runs, in process: validate()'s error, code 2, and only the folder lock
    # and the failure record written (Hydra's own files: the command line above).
    message = config_error([override], tmp_path / "in-process")
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as raised:
        main(compose_config([override, *NO_PROGRESS_BAR], run_dir))
    assert str(raised.value) == message and raised.value.exit_code == 2
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "status.json"]
    status = json.loads((run_dir / "status.json").read_text())
    assert status == {"status": "failed", "error": message, "exit_code": 2}


def test_lightning_gradient_clipping_is_refused_with_the_setting_that_clips(tmp_path):
    # Every dreg step is manually optimized, which Lightning's gradient_clip_val never clips.
    message = config_error(["+trainer.gradient_clip_val=0.5"], tmp_path)
    assert "\n" not in message
    assert message.startswith("trainer.gradient_clip_val=0.5: Lightning does not clip"), message
    assert message.endswith("use model.clip_grad_norm=0.5 instead"), message


def test_unknown_key_typo_fails_before_anything_runs(tmp_path):
    result = cli("model.num_sampels=3", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "Could not override 'model.num_sampels'" in result.stderr
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


# -- numerical faults -----------------------------------------------------------------------
def inject_nan_at_call(monkeypatch, call: int) -> None:
    """Make the model's log p(x, z) NaN on its ``call``-th training evaluation."""
    original, count = VAE.log_joint, {"n": 0}

    def log_joint(self, x, z, context=None):
        out = original(self, x, z, context)
        if torch.is_grad_enabled():
            count["n"] += 1
            if count["n"] == call:
                return out * float("nan")
        return out

    monkeypatch.setattr(VAE, "log_joint", log_joint)


@requires_mnist
def test_nan_raises_naming_the_step_and_keeps_the_last_good_checkpoint(
    tiny_cfg, tmp_path, monkeypatch
):
    inject_nan_at_call(monkeypatch, 6)  # the 6th step; validation + checkpoints at 2 and 4
    cfg = tiny_cfg("trainer.max_steps=8")
    with pytest.raises(FloatingPointError, match=r"non-finite loss.*step 5 \(epoch 0, batch 5\)"):
        train(cfg)
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 4
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())


@requires_mnist
def test_nan_skip_policy_drops_the_update_and_counts_it(tiny_cfg, tmp_path, monkeypatch):
    inject_nan_at_call(monkeypatch, 3)
    cfg = tiny_cfg("trainer.max_steps=6", "model.nonfinite=skip",
                   "model.max_skipped_fraction=0.5")
    metrics = train(cfg)
    assert metrics["train/skipped_steps"] == 1
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())
    # A skipped update counts toward max_steps, as Lightning's own loop counts it: 6 steps
    # took 6 batches (5 applied updates), not 7 batches to reach 6 applied ones.
    assert metrics["global_step"] == 6
    (loader,) = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert (loader["epoch"], loader["consumed"]) == (0, 6)


class StopSignalAtStep(pl.Callback):
    """A stop signal, as Lightning's SIGTERM handler records it, at step ``step``: ``end`` of
    the training call that reaches it (right before that step's validation), or ``start`` of
    the next call (right after the validation, before the call's first step)."""

    def __init__(self, step: int, when: str) -> None:
        self.step, self.when = step, when

    def _stop(self, trainer: pl.Trainer) -> None:
        if trainer.global_step == self.step:
            request_stop(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if self.when == "end":
            self._stop(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, *args) -> None:
        if self.when == "start":
            self._stop(trainer)


@requires_mnist
@pytest.mark.parametrize("when", ["end", "start"])
def test_a_stop_signal_next_to_validation_keeps_the_resume_exact(tmp_path, when):
    # "end": Lightning alone would stop after the first of the two validation batches and
    # save a half-done validation. "start": a call that takes no step must not validate the
    # same step again. Either way a resume could not repeat the uninterrupted run's draws.
    cadence = ["trainer.max_steps=8", "trainer.val_check_interval=4",
               "trainer.limit_val_batches=2", "dataset.eval_batch_size=25"]  # fmt: skip
    whole = train(compose_config([*TINY_RUN, *cadence], tmp_path / "whole"))
    out = tmp_path / "cut"
    stop = ["+callbacks.stop._target_=tests.test_reliability.StopSignalAtStep",
            "+callbacks.stop.step=4", f"+callbacks.stop.when={when}"]  # fmt: skip
    cut = train(compose_config([*TINY_RUN, *cadence, *stop], out))
    assert cut["status"] == "preempted" and cut["global_step"] == 4
    assert load_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == 4
    resumed = train(compose_config([*TINY_RUN, *cadence, "resume=true"], out))
    assert resumed["global_step"] == 8
    for key in ("val/log_likelihood", "val/bound", "test/log_likelihood", "train/objective"):
        assert resumed[key] == whole[key], key


# -- sweeps and determinism -----------------------------------------------------------------
# A failing job does not lose the others: the sweep of tests/test_errors_journeys.py's
# test_a_sweep_with_a_failed_job_exits_9_naming_it_and_its_folders_paste_unquoted (the same
# command) checks the summary's rows and the good job's results too.


@requires_mnist
@pytest.mark.slow
def test_same_seed_same_config_gives_identical_metrics(tmp_path):
    # Two run directories: a second run in the first one's would find its checkpoints and CSV
    # logs, which Lightning warns about and overwrites.
    first = train(compose_config(TINY_RUN, tmp_path / "first"))
    second = train(compose_config(TINY_RUN, tmp_path / "second"))
    for key in ("test/log_likelihood", "test/bound", "train/objective"):
        assert first[key] == second[key], key
