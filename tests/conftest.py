"""Shared fixtures: the real composed config with tiny-run overrides, and the data location."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

# One thread per process: the suite's models are small (threads only add spin-waiting), and
# the CPU/DDP subprocesses inherit this, so two processes never fight over two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The variable is read when torch loads (above), so the test process itself is set directly:
# in-process runs on two xdist workers would otherwise use two threads each on two cores.
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
MNIST_FILES = ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz")


class StopAtStep(pl.Callback):
    """Stops training after the call that reaches optimizer step ``step``, as Lightning's
    ``max_time`` does (``should_stop`` in ``on_train_batch_end``): a run's end between the
    logger's rows (``+callbacks.stop._target_=tests.conftest.StopAtStep``)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


# The configs' progress bar, silenced (refresh_rate=0 disables it) so that no tqdm output
# reaches the test output or a subprocess's captured stderr. Removing the callback instead
# would make Lightning add its default bar, refreshed every step. One override, because in a
# multirun every override is part of the job directory's name.
NO_PROGRESS_BAR = ["callbacks.progress_bar.refresh_rate=0"]

# Overrides that make any configuration a run of seconds on a small slice of real data.
TINY_RUN = [
    "logger=csv",
    *NO_PROGRESS_BAR,
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=1",
    "dataset.train_subset=512",
    "dataset.eval_subset=100",
    "dataset.eval_batch_size=50",
    "model.num_samples=8",
    "model.eval_num_samples=50",
]


def mnist_dir() -> Path | None:
    """DREG_DATA_DIR when it holds the MNIST files, else ``None``."""
    data_dir = os.environ.get("DREG_DATA_DIR")
    if data_dir and all((Path(data_dir) / "MNIST" / "raw" / f).exists() for f in MNIST_FILES):
        return Path(data_dir)
    return None


if os.environ.get("CI") and mnist_dir() is None:
    # In CI a skipped end-to-end layer would hide a broken data path: fail loudly instead.
    raise RuntimeError("CI needs DREG_DATA_DIR pointing at a folder with MNIST/raw/*-ubyte.gz")

requires_mnist = pytest.mark.skipif(
    mnist_dir() is None, reason="set DREG_DATA_DIR to a folder with MNIST/raw/*-ubyte.gz"
)


def compose_config(overrides: list[str], output_dir: Path) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides``, writing into ``output_dir``."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        if cfg.get("logger"):
            for logger in cfg.logger.values():
                if "name" in logger and "hydra:" in str(logger._get_node("name")._value()):
                    logger.name = "test"
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path: Path):
    """Factory: the real config plus :data:`TINY_RUN` and extra overrides, in ``tmp_path``."""

    def make(*overrides: str) -> DictConfig:
        return compose_config([*TINY_RUN, *overrides], tmp_path)

    return make


# -- the real command line ------------------------------------------------------------------
def cli(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python train.py *args`` to completion; no stdin, so a prompt fails instead of hanging."""
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


def start_cli(*args: str, cwd: Path = ROOT) -> subprocess.Popen:
    """``python train.py *args`` in the background, from ``cwd`` (stderr kept for the
    assertions)."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )


def error_line(result: subprocess.CompletedProcess) -> str:
    """The last stderr line, which must be the whole message: ``error: ...``, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[-1]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until ``path`` exists (e.g. a checkpoint), while ``proc`` still runs."""
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared"


def assert_same_checkpoint_state(got: dict, want: dict) -> None:
    """Two checkpoints hold the same training state, bitwise: step, weights, Adam state."""
    assert got["global_step"] == want["global_step"]
    assert got["state_dict"].keys() == want["state_dict"].keys()
    for name, tensor in want["state_dict"].items():
        assert torch.equal(got["state_dict"][name], tensor), name
    (got_opt,), (want_opt,) = got["optimizer_states"], want["optimizer_states"]
    assert got_opt["state"].keys() == want_opt["state"].keys()
    for key, state in want_opt["state"].items():
        for field, value in state.items():
            assert torch.equal(got_opt["state"][key][field], value), (key, field)
