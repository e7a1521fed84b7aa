"""Checkpoints: safe loading, clear errors, and the save-and-stop that makes preemption exact.

Saving (:class:`SafeCheckpointIO`) writes a temporary file in the checkpoint's own folder,
flushes it to the disk and renames it over the target: a kill, or a disk that fills up, while
saving never leaves a torn file under a checkpoint's name, and the previous ``last.ckpt`` stays
intact (tested). A full disk, quota or I/O error is :class:`~dreg.errors.StorageError` (exit 8).
The paths a checkpoint holds (``ModelCheckpoint``'s best and last files) are stored relative
to its folder, so a moved or copied run folder resumes and tests its own files.

Loading never runs code from the file: ``torch.load(weights_only=True)`` with an explicit
allow-list of the few non-tensor types our checkpoints hold (NumPy's RNG state,
``pathlib`` paths, Lightning's ``AttributeDict``). A file that is missing, not a checkpoint,
damaged or carrying anything else gets one line that says which, and what to do.

Preemption goes through Lightning's signal path. On SIGTERM (SLURM's warning before it kills
or requeues a job) Lightning's handler sets ``trainer.received_sigterm``; the training loop
raises ``SIGTERMException`` at the end of the current step; :class:`PreemptionCheckpoint`
saves ``last.ckpt`` in ``on_exception``. SIGINT (Ctrl-C) is routed to the same handler, so it
too stops at a step boundary instead of interrupting a step. The checkpoint holds model,
optimizer, loop position, the train loader's position in its epoch, callback state and,
through this callback, the RNG states that drive sampling and binarization: on CPU a resumed
run is bitwise identical to an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import pathlib
import pickle
import random
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.data import AttributeDict
from pytorch_lightning.utilities.exceptions import SIGTERMException

from dreg.errors import CheckpointError
from dreg.files import atomic_write, storage_error

log = logging.getLogger(__name__)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load`` that runs no code from the file, with one clear error per failure."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise CheckpointError(f"checkpoint {path} {what}; check ckpt_path (or resume=false)")
    with open(path, "rb") as f:
        starts_like_a_zip = f.read(4) == b"PK\x03\x04"  # every torch.save file does
    if not starts_like_a_zip:
        raise CheckpointError(
            f"{path} is not a checkpoint (not a PyTorch archive: a wrong path?); point "
            "ckpt_path at a .ckpt file written by dreg"
        )
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # a type outside the allow-list: possibly malicious
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path} holds objects that are not allowed in a dreg checkpoint ({first_line}); "
            "it was not loaded. Load only checkpoints you trust, written by dreg"
        ) from err
    except Exception as err:  # torch raises many types for a damaged archive
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"checkpoint {path} is damaged, e.g. cut short ({type(err).__name__}: {detail}); "
            f"use another checkpoint (e.g. best-*.ckpt in {path.parent}) or start a new run"
        ) from err


def _numpy_globals() -> list[Any]:
    """What ``np.random.get_state()`` pickles to: an array of uint32 and its dtype."""
    core = np._core if hasattr(np, "_core") else np.core  # NumPy 2 renamed numpy.core
    dtypes = [type(np.dtype(np.uint32)), type(np.dtype(np.float64)), type(np.dtype(np.int64))]
    return [np.ndarray, np.dtype, core.multiarray._reconstruct, *dtypes]


# Every non-tensor type our checkpoints hold; anything else is refused by torch.load.
SAFE_GLOBALS = [
    *_numpy_globals(),
    AttributeDict,
    pathlib.PosixPath,
    pathlib.WindowsPath,
]


class SafeCheckpointIO(TorchCheckpointIO):
    """Every checkpoint Lightning saves or loads: atomic and durable saves, paths relative to
    the checkpoint's folder, and :func:`load_checkpoint` for every load.

    Lightning's own save writes through a temporary folder that may be on another filesystem
    (then its final move is a copy, which a full disk cuts short under the final name).
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        try:
            with atomic_write(path, "wb", durable=True) as f:
                torch.save(with_paths(checkpoint, relative_to(path.parent)), f)
        except OSError as err:
            full = storage_error(err, path)
            if full is None:
                raise
            raise full from err

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        checkpoint = load_checkpoint(path, map_location or "cpu")
        return with_paths(checkpoint, resolved_in(Path(path).parent))


# -- paths inside checkpoints ---------------------------------------------------------------
# ModelCheckpoint's state names the run's checkpoint files (its folder, the best, the last).
# Absolute, they would point a moved or copied run folder back at the old one's files.
PATH_FIELDS = ("dirpath", "best_model_path", "kth_best_model_path", "last_model_path")


def with_paths(checkpoint: dict[str, Any], convert: Any) -> dict[str, Any]:
    """``checkpoint`` with every ``ModelCheckpoint`` path passed through ``convert`` (a copy:
    the callbacks' own state is left as it is)."""
    callbacks = {
        key: _convert_paths(state, convert) if _names_checkpoint_files(state) else state
        for key, state in checkpoint.get("callbacks", {}).items()
    }
    return {**checkpoint, "callbacks": callbacks} if callbacks else checkpoint


def _names_checkpoint_files(state: Any) -> bool:
    return isinstance(state, dict) and "dirpath" in state and "best_model_path" in state


def _convert_paths(state: dict[str, Any], convert: Any) -> dict[str, Any]:
    state = {**state, **{k: convert(state[k]) for k in PATH_FIELDS if state.get(k)}}
    if isinstance(state.get("best_k_models"), dict):
        state["best_k_models"] = {convert(k): v for k, v in state["best_k_models"].items()}
    return state


def relative_to(folder: Path) -> Any:
    """A path inside ``folder`` as relative to it (``.`` for the folder); others unchanged."""

    def convert(path: str) -> str:
        try:
            return str(Path(path).resolve().relative_to(folder.resolve()))
        except ValueError:
            return str(path)

    return convert


def resolved_in(folder: Path) -> Any:
    """A relative path as the absolute one inside ``folder`` (Lightning compares real paths)."""

    def convert(path: str) -> str:
        return path if os.path.isabs(path) else os.path.realpath(folder / path)

    return convert


def load_net_weights(net: torch.nn.Module, ckpt_path: str | Path) -> None:
    """Load only the VAE's weights (``net.*``) from a Lightning checkpoint.

    Starting inference-network-only training or a diagnostic from a checkpoint needs the
    weights, not Lightning's full state (optimizer, step counters, a possibly different
    estimator's learned state).
    """
    state = load_checkpoint(ckpt_path)["state_dict"]
    weights = {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:  # torch lists every mismatched tensor over many lines
        first = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) if len(first) > 1 else first[0]
        raise CheckpointError(
            f"checkpoint {ckpt_path} holds a model of another shape ({detail}); use the "
            "model.net settings it was trained with"
        ) from err


def request_stop(trainer: pl.Trainer, stop: bool = True) -> None:
    """Set what Lightning's own SIGTERM handler sets: the trainer stops at its next step
    boundary and raises ``SIGTERMException`` (a pack's jobs get their signals this way: only
    the main thread's handler runs)."""
    trainer._signal_connector.received_sigterm = stop


class PreemptionCheckpoint(pl.Callback):
    """On SIGTERM/SIGINT: finish the step, save ``dirpath/last.ckpt``, stop.

    ``trainer.fit`` then raises Lightning's ``SIGTERMException``, which :mod:`dreg.run`
    records as a preemption.

    :param dirpath: where the checkpoint goes (the checkpoint folder of the run).
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.saved: Path | None = None
        self._previous_sigint: Any = None
        self._stop_after_validation = False

    # A stop signal during validation takes effect when validation ends. Lightning would stop
    # after the current validation batch and save a checkpoint whose validation is half done,
    # with the random streams part-way through it: a resume cannot redo that validation with
    # the same draws, so the resumed run's numbers would differ from an uninterrupted one's.
    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.received_sigterm and not trainer.sanity_checking:
            request_stop(trainer, False)
            self._stop_after_validation = True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._stop_after_validation:
            self._stop_after_validation = False
            request_stop(trainer)  # stops after this step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning registered its SIGTERM handler before training; Ctrl-C takes the same path.
        # Only the main thread owns signals: a job of a pack (dreg.pack) gets them from its pack.
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, signal.getsignal(signal.SIGTERM))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException) or self.saved is not None:
            return
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        self.saved = path
        if trainer.is_global_zero:
            log.warning(
                "stop signal received: saved %s at step %d; continue with resume=true",
                path,
                trainer.global_step,
            )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        # Captured when the checkpoint is written, i.e. after the step that just finished.
        # Every rank writes a checkpoint together (Lightning saves rank 0's copy), and every
        # rank draws its own noise, so each rank's RNG state is gathered into it.
        mine = rng_state()
        trainer = getattr(self, "_trainer", None)
        if trainer is None or trainer.world_size == 1:
            return {"ranks": [mine]}
        states = [None] * trainer.world_size
        torch.distributed.all_gather_object(states, mine)
        return {"ranks": states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ranks = state.get("ranks", [state])  # checkpoints before per-rank noise held one state
        trainer = getattr(self, "_trainer", None)
        rank = trainer.global_rank if trainer is not None else 0
        if len(ranks) != (trainer.world_size if trainer is not None else 1):
            log.warning(
                "the checkpoint holds RNG states of %d processes, this run has %d: the "
                "resumed noise differs from an uninterrupted run",
                len(ranks),
                trainer.world_size if trainer is not None else 1,
            )
        set_rng_state(ranks[min(rank, len(ranks) - 1)])


def rng_state() -> dict[str, Any]:
    """Every RNG that training draws from (sampling, binarization, data order)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
