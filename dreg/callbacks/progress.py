"""The training progress bar, counted in optimizer steps (``callbacks.progress_bar``).

Lightning's bar counts training calls, and each call takes up to ``model.steps_per_call``
optimizer steps (:mod:`dreg.grouped_step`): at step 476 it said ``100/1562`` and its ETA was
off by that factor. Here the position is ``trainer.global_step``, the total ``max_steps``
(or, for a run bounded by epochs, the epoch's steps), so the rate is steps per second and
the ETA is the run's.

A pack (:mod:`dreg.pack`) runs its jobs in one process, one step for all at a time: only its
first job draws bars, labelled with the pack's size; the others draw none.
"""

from __future__ import annotations

import threading
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm, _update_n, convert_inf

from dreg.pack import current_pack


def step_position(
    global_step: int, max_steps: int, epoch_start: int, epoch_steps: float | None
) -> tuple[int, int | None]:
    """``(position, total)`` of the bar: the run's steps out of ``max_steps`` when it bounds
    the run, else the steps of this epoch (from ``epoch_start``) out of ``epoch_steps``."""
    if max_steps > 0:
        return global_step, max_steps
    total = convert_inf(epoch_steps)
    return global_step - epoch_start, int(total) if total is not None else None


def shows_bars() -> bool:
    """Alone: yes. In a pack: only its first job (thread ``pack-job-0``)."""
    return current_pack() is None or threading.current_thread().name == "pack-job-0"


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bars, training counted in optimizer steps; ``refresh_rate`` is in
    steps too (0: no bars)."""

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False):
        super().__init__(refresh_rate, process_position, leave)
        self._epoch_start = 0  # global_step when the epoch began (epoch-bounded runs)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not shows_bars():
            self.disable()  # Lightning still calls every hook; the bars stay silent

    @property
    def train_description(self) -> str:
        pack = current_pack()
        return "steps" if pack is None else f"pack of {pack.size} jobs, steps"

    def init_train_tqdm(self) -> Tqdm:
        bar = super().init_train_tqdm()
        bar.unit = "step"
        return bar

    def _position(self, trainer: pl.Trainer) -> tuple[int, int | None]:
        return step_position(
            trainer.global_step, trainer.max_steps, self._epoch_start, self.total_train_batches
        )

    def on_train_start(self, trainer: pl.Trainer, *_: Any) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self._reset(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        self._epoch_start = trainer.global_step
        if trainer.max_steps <= 0:  # one bar per epoch; a step-bounded run keeps its bar
            self._reset(trainer)
        epoch = f"epoch {trainer.current_epoch}"
        self.train_progress_bar.set_description(f"{self.train_description} ({epoch})")

    def _reset(self, trainer: pl.Trainer) -> None:
        # Starts at the steps already done (a resumed run), so the rate and the ETA are
        # those of this session's steps.
        position, total = self._position(trainer)
        bar = self.train_progress_bar
        bar.reset(total=total)
        bar.initial = bar.n = position

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any):
        bar = self.train_progress_bar
        position, total = self._position(trainer)
        # A call takes several steps: refresh once refresh_rate steps have passed, not when
        # the count hits a multiple of it (which steps of 4 can jump over).
        due = position - bar.n >= self.refresh_rate or position == total
        if self.is_enabled and due:
            _update_n(bar, position)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.is_enabled:
            _update_n(self.train_progress_bar, self._position(trainer)[0])
        super().on_train_epoch_end(trainer, pl_module)
