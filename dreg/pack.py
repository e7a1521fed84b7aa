"""Packs: the jobs of a sweep as replicas of one batched model, stepped together in one process.

A pack runs each job's whole pipeline (:func:`dreg.run.main`: run folder, Lightning trainer,
loggers, checkpoints, validation, test, records) in a thread of its own, **one thread at a
time**, so every job stays an ordinary run with its own records. What the jobs share is the
training itself: each job's training call (a run of ``model.steps_per_call`` steps) waits at
a barrier (:meth:`Pack.train`), and once every unfinished job waits there, the pack takes
those steps for all of them at once through :class:`dreg.cohort.Cohorts`, the run of steps
that a run alone takes too: the replicas' parameters stacked ``[M, ...]``
(:class:`dreg.step.Replicas`), the model's own code under ``torch.func.vmap``, one backward,
one optimizer step for all (on a CPU, large replicas step one at a time, each alone in
place: ``hydra.launcher.replicas_per_pass``, :func:`dreg.cohort.replicas_per_pass`). So a
step's host work (Lightning's loop, the optimizer, the non-finite check, the thread hand-off)
is paid once per pack and run of steps, not once per job and step.

Why the jobs cannot change each other's numbers:

* **One thread runs at a time.** A thread holds the pack's lock from its start to the barrier
  and from the barrier to its end, so no two jobs ever race on shared state.
* **Private random streams.** A job's training noise comes from its own ``torch.Generator``
  (:mod:`dreg.step`), the same numbers alone or packed. Its other draws (initialization,
  evaluation) use the global streams, which are swapped with Hydra's job config when the
  barrier hands over to another thread, as an OS swaps registers (once per run of steps).
* **Separate gradients and updates.** Replica m's gradient comes from its own loss alone
  (d(sum)/d(loss_m) = 1), so a NaN in one replica reaches no other, and ``model.nonfinite``
  acts on each job alone (raise: that job fails at the end of the run, its parameters at
  their last good values; skip: only its update is undone).

Replicas whose optimizers differ (settings, or Adam's step count after a resume) form
separate cohorts, each one stacked model; a cohort of one trains in place, so a pack of one
is a normal run, bitwise (tests/test_paths.py checks every path against a run alone). With
``model.cuda_graph=true`` on CUDA a cohort's whole joint step is one captured graph
(:mod:`dreg.captured_step`).

What stays, and why: the threads, because each job keeps its own Lightning loop and records;
the swap of global RNG states and Hydra's config at the barrier, because evaluation and
set-up draw from the global streams and read the job's config; one malloc arena
(:func:`one_malloc_arena`), measured at M = 16 on CPU: 0.6 GB instead of 2.3 GB.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.hydra_config import HydraConfig
from pytorch_lightning.callbacks import Timer
from pytorch_lightning.trainer.states import RunningStage

from dreg.checkpointing import request_stop, rng_state, set_rng_state
from dreg.cohort import Cohorts, Request, RunResult, TrainingJob
from dreg.datamodules.binarized import BatchGroup

log = logging.getLogger(__name__)

_local = threading.local()  # .pack, .member: the pack and member of a job's thread
M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def one_malloc_arena() -> None:
    """Let every thread allocate from glibc's main arena (no-op without glibc).

    By default glibc gives threads arenas of their own, up to 8 per core, and each keeps the
    blocks freed in it: with the joint step running in whichever job's thread arrives last,
    every arena grows to a step's peak (measured at M = 16 on CPU: 2.3 GB instead of 0.6 GB).
    One thread of a pack runs at a time, so sharing one arena costs nothing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        pass



# -- the scheduler -------------------------------------------------------------------------------
@dataclass
class _Member:
    """A job of a pack: what its thread leaves behind while another one runs."""

    index: int
    name: str
    rng: dict[str, Any] = field(default_factory=dict)
    hydra_cfg: Any = None
    request: Request | None = None
    trainer: Any = None
    finished: bool = False


def current_pack() -> Pack | None:
    """The pack whose job runs in this thread (``None`` for a run alone)."""
    return getattr(_local, "pack", None)


class Pack:
    """Runs jobs in threads, one at a time, and trains their replicas together."""

    def __init__(self, replicas_per_pass: int | str = "auto") -> None:
        self._cond = threading.Condition()  # its lock is the right to run
        self._members: list[_Member] = []
        self._stopping = False
        self._cohorts = Cohorts(replicas_per_pass)  # the run of steps, as for a run alone

    @property
    def steps(self) -> int:
        """Joint steps taken."""
        return self._cohorts.steps

    @property
    def size(self) -> int:
        """Jobs in the pack."""
        return len(self._members)

    # -- running jobs -------------------------------------------------------------------------
    def run(self, jobs: Sequence[tuple[str, Callable[[], Any]]]) -> list[Any]:
        """Run ``(name, job)`` pairs to their end; returns each job's result or exception.

        In the main thread, SIGTERM and SIGINT ask every job to stop at its next step
        boundary (each saves its ``last.ckpt``, as a run alone does on these signals).
        """
        self._members = [_Member(i, name) for i, (name, _) in enumerate(jobs)]
        results: list[Any] = [None] * len(jobs)

        def body(member: _Member, job: Callable[[], Any]) -> None:
            _local.pack, _local.member = self, member
            with self._cond:
                try:
                    results[member.index] = job()
                except BaseException as err:  # SystemExit too: the launcher decides
                    results[member.index] = err
                finally:
                    member.finished = True
                    self._discount_work_after_training(member)
                    self._run_if_all_waiting()

        threads = [
            threading.Thread(target=body, args=(member, job), name=f"pack-job-{member.index}")
            for member, (_, job) in zip(self._members, jobs, strict=True)
        ]
        previous = self._catch_stop_signals()
        one_malloc_arena()
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.2)  # wakes up for signal handlers
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return results

    def _catch_stop_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, self._on_stop_signal)
        return previous

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        log.warning("signal %d: every job of the pack stops after its current step", signum)
        self._stopping = True
        for member in self._members:
            if member.trainer is not None:
                request_stop(member.trainer)

    def _discount_work_after_training(self, member: _Member) -> None:
        """What a job did after its training (test, records) ran while the jobs still
        training waited: their ``train_seconds`` should not count it, as a run alone's does
        not count another run's test (each Timer's start moves on by that time)."""
        timer = _timer(member.trainer)
        if timer is None or timer.end_time(RunningStage.TRAINING) is None:
            return
        after_training = time.monotonic() - timer.end_time(RunningStage.TRAINING)
        for other in self._members:
            clock = _timer(other.trainer)
            if other.finished or clock is None:
                continue
            if clock.end_time(RunningStage.TRAINING) is not None:  # its training is over
                continue
            if (started := clock.start_time(RunningStage.TRAINING)) is not None:
                _start_train_clocks([other.trainer], started + after_training)

    def attach(self, trainer: Any) -> None:
        """The calling job trains with ``trainer`` (stop signals reach it through the pack)."""
        _local.member.trainer = trainer
        if self._stopping:
            request_stop(trainer)

    # -- the barrier ---------------------------------------------------------------------------
    def train(self, job: TrainingJob, group: BatchGroup) -> RunResult:
        """Take the steps of ``group`` with every other job's: wait until each unfinished job
        has a run of steps to take, then take them together."""
        member: _Member = _local.member
        request = member.request = Request(job, group)
        member.rng, member.hydra_cfg = rng_state(), HydraConfig.instance().cfg
        self._run_if_all_waiting()
        while not request.done:
            self._cond.wait()  # lets the next job run
        set_rng_state(member.rng)
        HydraConfig.instance().cfg = member.hydra_cfg
        if request.error is not None:
            raise request.error
        return request.result

    def _run_if_all_waiting(self) -> None:
        """Called with the lock held whenever a job arrives or ends."""
        live = [m for m in self._members if not m.finished]
        if not live or any(m.request is None for m in live):
            return
        requests = [m.request for m in live]
        if not self.steps:
            _start_train_clocks([r.job.trainer for r in requests])
        try:
            self._cohorts.run(requests)
        except Exception as err:  # e.g. out of memory: every job of this run reports it
            for request in requests:
                request.error, request.done = err, True
        for member in live:
            if member.request.done:
                member.request = None
        self._cond.notify_all()


def _start_train_clocks(trainers: Sequence[Any], at: float | None = None) -> None:
    """A pack's training starts when its last job is ready: the jobs are set up one after
    another, and a job's ``train_seconds`` (Lightning's ``Timer``) should not count the
    others' set-up, as a run alone does not count its own. ``at``: that time (default now)."""
    at = time.monotonic() if at is None else at
    for trainer in trainers:
        if (timer := _timer(trainer)) is not None:
            timer._start_time[RunningStage.TRAINING] = at  # Timer has no setter


def _timer(trainer: Any) -> Timer | None:
    """A job's ``Timer`` (what ``train_seconds`` reads), if its trainer has one."""
    return next((c for c in getattr(trainer, "callbacks", ()) if isinstance(c, Timer)), None)
