"""Save-and-stop on SIGTERM/SIGINT, and the RNG state that makes resumed runs exact.

SLURM sends SIGTERM before it kills or requeues a job, and Ctrl-C sends SIGINT. The handler
only sets a flag; at the end of the current training step every rank agrees to stop, a
checkpoint is written (atomically, see :mod:`dreg.checkpointing`) and training ends. Resuming
from it (``resume=true``) restores model, optimizer, loop position, the train loader's
position in its epoch (:class:`dreg.datamodules.batches.ShuffledBatches`), callback state
and, through this callback, the RNG states that drive sampling and binarization: on CPU the
resumed run is bitwise identical to an uninterrupted one.
"""

from __future__ import annotations

import logging
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)


class Preempted(Exception):  # noqa: N818 - a stop request, not an error
    """Raised after the preemption checkpoint is written; ``dreg.run`` records the stop."""


class PreemptionCheckpoint(pl.Callback):
    """On SIGTERM/SIGINT: finish the step, save ``dirpath/last.ckpt``, stop.

    :param dirpath: where the checkpoint goes (the checkpoint folder of the run).
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.requested: str | None = None
        self.preempted = False
        self._previous: dict[int, Any] = {}

    def _request(self, signum: int, frame: Any) -> None:
        self.requested = signal.Signals(signum).name

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._request)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        # Every rank must stop at the same step, so the flag is agreed on across ranks.
        stop = trainer.strategy.reduce_boolean_decision(self.requested is not None, all=False)
        if not stop or self.preempted:
            return
        self.preempted = True
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        message = (
            f"{self.requested or 'stop signal'} received: saved {path} at step "
            f"{trainer.global_step}; continue with resume=true"
        )
        if trainer.is_global_zero:
            log.warning(message)
        # Stop now, not through trainer.should_stop: that would run a validation (consuming
        # RNG and time a preempted job may not have) and checkpoint again after it.
        raise Preempted(message)

    def state_dict(self) -> dict[str, Any]:
        # Captured when the checkpoint is written, i.e. after the step that just finished.
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
