"""Several optimizer steps per Lightning training call (``model.steps_per_call``).

A training step of the paper's model is ~100 small kernels; Lightning's own per-call work
(hooks, progress counters, logger bookkeeping) costs about as much again, so on a GPU the
framework, not the model, sets the pace. With ``steps_per_call = N`` one ``training_step``
call performs up to N (batch, forward, backward, optimizer step) iterations under Lightning's
manual optimization, and the framework's cost is paid once per call.

What stays counted in optimizer steps, exactly as with one step per call:

* ``trainer.global_step`` (manual optimization counts every ``optimizer.step()``; a skipped
  non-finite update is counted too, as Lightning's automatic loop counts it);
* the batches: the train loader (:class:`~dreg.datamodules.batches.GroupedBatches`) serves
  the same batches in the same order, binarized just before their step, so every random draw
  comes in the same order and CPU results are bitwise those of one step per call;
* validation, log rows and ``max_steps``: groups end at every multiple of
  ``val_check_interval``, ``log_every_n_steps`` and at ``max_steps``, and
  :func:`align_cadence` points Lightning's per-call triggers at those calls;
* preemption: a stop signal ends the group after the current step, and the batches not
  trained on are given back, so ``last.ckpt`` is at a step boundary like any other.

What falls back to one step per call (one log line says why): see :func:`fallback_reason`.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.plugins.precision import Precision
from pytorch_lightning.strategies import SingleDeviceStrategy

from dreg.datamodules.binarized import BinarizedDataModule


def fallback_reason(trainer: pl.Trainer) -> str | None:
    """Why this run cannot group steps, or ``None`` when it can."""
    if trainer.world_size > 1:
        return "DDP: gradient synchronisation is wired to one backward per call (eager fallback)"
    if not isinstance(trainer.datamodule, BinarizedDataModule):
        return "the datamodule does not serve grouped batches"
    if not isinstance(trainer.val_check_interval, int) or trainer.check_val_every_n_epoch:
        return "validation is scheduled by epoch fraction, not by step"
    if trainer.limit_train_batches not in (1.0, None):
        return "limit_train_batches counts calls, not steps"
    return None


def has_gradient_hooks(trainer: pl.Trainer) -> bool:
    """Whether a callback reads every step's gradients (``on_before_optimizer_step``):
    :mod:`dreg.step` then calls the hook between backward and update."""
    return any(
        type(c).on_before_optimizer_step is not Callback.on_before_optimizer_step
        for c in trainer.callbacks
    )


def needs_lightning_backward(trainer: pl.Trainer) -> bool:
    """Whether a backward must go through Lightning's ``manual_backward``: a strategy that
    wires into it (DDP's gradient synchronisation), a precision plugin of its own, or a hook
    on it (``on_before_backward``, ``on_after_backward``, ``backward``) in a callback or the
    module. Otherwise ``Tensor.backward`` computes the same gradient without the hooks'
    dispatch (~0.2 ms a step, a tenth of a tiny model's step)."""
    strategy, module = trainer.strategy, trainer.lightning_module
    hooked = [(type(c), Callback) for c in trainer.callbacks] + [
        (type(module), pl.LightningModule)
    ]
    return (
        type(strategy) is not SingleDeviceStrategy
        or type(strategy.precision_plugin) is not Precision
        or type(module).backward is not pl.LightningModule.backward
        or any(
            getattr(cls, hook) is not getattr(base, hook)
            for cls, base in hooked
            for hook in ("on_before_backward", "on_after_backward")
        )
    )


def group_boundaries(trainer: pl.Trainer, log_every_n_steps: int) -> tuple[int, ...]:
    """Steps after which a group must end: validation, log rows, the last step."""
    bounds = [trainer.val_check_interval, log_every_n_steps]
    if trainer.max_steps and trainer.max_steps > 0:
        bounds.append(trainer.max_steps)
    return tuple(int(b) for b in bounds if b and b > 0)


def align_cadence(
    trainer: pl.Trainer, steps_done: int, val_every: int, log_every: int, stepped: bool = True
) -> None:
    """Make Lightning's per-call triggers fire after this call exactly when a run of one step
    per call would fire them after step ``steps_done``; never after a call that took no step
    (a stop signal before its first step), which would validate the same step twice.

    Lightning validates when ``(calls done) % trainer.val_check_batch == 0`` and writes a log
    row when ``(calls done) % trainer.log_every_n_steps == 0``. With groups of varying length
    the call count says nothing about the step, so each trigger is set to the number of calls
    done (fires) or one more (cannot fire, as the count is smaller). Called at the end of
    every call, and when training (re)starts, for the check Lightning makes on a resume.
    """
    loop = trainer.fit_loop.epoch_loop
    calls = loop.total_batch_idx + 1
    trainer.val_check_batch = calls if stepped and steps_done % val_every == 0 else calls + 1
    logged_calls = loop._batches_that_stepped + 1  # the count Lightning's should_update_logs uses
    fire = stepped and steps_done % log_every == 0
    trainer.log_every_n_steps = logged_calls if fire else logged_calls + 1


def count_optimizer_step(trainer: pl.Trainer) -> None:
    """Count one optimizer step that did not go through ``LightningOptimizer.step``.

    A skipped non-finite update (one step per call counts it too) and a captured CUDA step
    (Adam runs inside the graph) advance ``trainer.global_step`` through the same counter
    that ``optimizer.step()`` advances under manual optimization.
    """
    progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
    progress.increment_ready()
    progress.increment_completed()


def set_step_count(trainer: pl.Trainer, steps: int) -> None:
    """Set the optimizer steps done (a run of steps that ended early at a bad update)."""
    progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
    progress.total.ready = progress.total.completed = steps


def carry_step_count(trainer: pl.Trainer) -> None:
    """Continue the step count of a checkpoint written under automatic optimization.

    Lightning keeps separate step counters for automatic (one step per call, which
    checkpoints of earlier versions used) and manual optimization (every step now); a resume
    of such a checkpoint reads the manual counter, which it did not advance.
    """
    loop = trainer.fit_loop.epoch_loop
    automatic = loop.automatic_optimization.optim_progress.optimizer.step
    manual = loop.manual_optimization.optim_step_progress
    if manual.total.completed < automatic.total.completed:
        manual.load_state_dict(automatic.state_dict())
