"""The run of steps, written once: a run alone and a pack's joint run are the same code.

A training call of a job asks for a run of optimizer steps (a :class:`Request`: its
``BatchGroup`` of ``model.steps_per_call`` batches). :class:`Cohorts` takes the steps of any
number of requests together: it sorts the jobs into cohorts (jobs whose replicas share one
stacked model and optimizer; alike jobs beyond ``hydra.launcher.replicas_per_pass`` go in
further cohorts, and a cohort of one steps its job alone, in place), steps every cohort once
per step, counts each job's step, stops when a job is asked to stop, and reads the device
flags once at the end of the run (:meth:`dreg.step.Replicas.faults`). A run alone is a pack
of one: one request, one cohort of one, whose replica is the module itself
(:meth:`dreg.step.Replicas.alone`), stepped with Lightning's ``manual_backward`` where DDP
or a backward hook needs it. A pack (:mod:`dreg.pack`) hands it every waiting job's request
at its barrier.

What else is wired here, once for every way to train:

* **Observers** (``grad_stats``, ``estimator_compare``): before each update a job whose
  callbacks read gradients sees its replica's parameters and gradients in its own module
  (:meth:`dreg.step.Replicas.show`) and its hooks run. A replica whose step is not finite is
  not shown: its update is undone, so its gradient must not enter the statistics either.
* **The captured CUDA graph** (``model.cuda_graph=true``): a cohort whose jobs all want it
  replays its whole step as one graph (:mod:`dreg.captured_step`).
* **The compiled step** (``model.compile=step``): a cohort's step under ``torch.compile``
  (:meth:`dreg.step.Replicas.compiled`); jobs that compile and jobs that do not are never
  in one cohort.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from dreg.captured_step import CapturedStep
from dreg.datamodules.binarized import BatchGroup
from dreg.step import Job, Replicas, Split

log = logging.getLogger(__name__)

#: ``replicas_per_pass=auto`` on a CPU: a job whose decoder output ``[K, B, D]`` takes at
#: least this many bytes steps alone, in place (the paper model at K = 64: 6.4 MB); smaller
#: ones share one stacked model (docs/benchmarks.md, "Packed sweeps").
OWN_PASS_BYTES = 2 * 2**20


class TrainingJob(Job, Protocol):
    """What a run of steps needs of a job besides what the step needs (:class:`Job`);
    :class:`dreg.lightning_module.DReGModule` implements it."""

    trainer: Any  # the job's pl.Trainer (its loops, loggers and clocks)

    def training_optimizer(self) -> torch.optim.Optimizer:
        """The job's own optimizer (its state is what checkpoints hold)."""
        ...

    def split(self, bits: Tensor) -> tuple[Tensor, Tensor | None]:
        """A row of binarized pixels -> ``(x, context)``."""
        ...

    def lone_backward(self) -> Callable[[Tensor], None]:
        """The backward of the job trained in place: Lightning's ``manual_backward`` where
        its strategy, precision or hooks need it (DDP), else ``Tensor.backward``."""
        ...

    def observes_gradients(self) -> bool:
        """A callback reads every step's gradients (then :meth:`before_update` is called)."""
        ...

    def before_update(self, step_inputs: tuple) -> None:
        """Run the job's ``on_before_optimizer_step`` hooks (gradients in ``p.grad``)."""
        ...

    def wants_captured_step(self) -> bool:
        """Replay the step as one CUDA graph (``model.cuda_graph=true`` on CUDA)."""
        ...

    def compiles_step(self) -> bool:
        """Take the step compiled (``model.compile=step``)."""
        ...

    def stop_requested(self) -> bool:
        """A stop signal arrived, or the job has taken its last step."""
        ...

    def count_step(self) -> None:
        """Count one optimizer step in the job's trainer."""
        ...


@dataclass
class RunResult:
    """What a run of steps did for one job.

    :ivar steps: steps taken (fewer than the group's when a stop signal arrived).
    :ivar first_bad: index in the run of the first non-finite step, or -1.
    :ivar skipped: updates undone under ``nonfinite=skip``.
    :ivar objective: ``[]`` device tensor, the last step's objective (batch mean).
    :ivar iwae_bound: ``[]`` device tensor, the last step's IWAE bound (batch mean).
    """

    steps: int
    first_bad: int
    skipped: int
    objective: Tensor
    iwae_bound: Tensor


@dataclass
class Request:
    """A job's run of steps: its batches, and how far it got."""

    job: TrainingJob
    group: BatchGroup  # the call's batches: rows [N, B] of data
    offset: int = 0  # steps of the group already taken
    first_bad: int = -1
    skipped: int = 0
    done: bool = False
    error: BaseException | None = None
    result: RunResult | None = None


@dataclass
class Cohort:
    """Jobs stepped as one model: their replicas and, with ``model.cuda_graph=true`` on CUDA,
    the captured step."""

    replicas: Replicas
    backward: Callable[[Tensor], None]
    split: Split
    captured: CapturedStep | None = None

    def step(self, rows: Tensor, data: Tensor) -> None:
        """One step of every replica on the batches at ``rows`` ``[M, B]`` of ``data``."""
        if self.captured is not None:  # the whole step, one graph replay
            self.captured.replay(rows)
        else:
            # index_select: a third of advanced indexing's host time for the same rows.
            images = data.index_select(0, rows.reshape(-1)).view(*rows.shape, data.shape[1])
            self.replicas.step(images, self.split, self.backward)


def cohort_key(job: TrainingJob) -> tuple:
    """Jobs whose replicas can share one stacked model and optimizer: the same optimizer
    settings and step count (Adam's bias correction), step settings and device."""
    state = next(iter(job.training_optimizer().state.values()), {})
    return (
        repr(job.optimizer_factory),
        int(state["step"]) if "step" in state else 0,
        tuple(sorted(job.step_settings().items())),
        str(next(job.net.parameters()).device),
        job.compiles_step(),
    )


class Cohorts:
    """Takes runs of steps for jobs, in cohorts kept while the same jobs train together."""

    def __init__(self, replicas_per_pass: int | str = "auto") -> None:
        self._cohorts: dict[tuple[int, ...], Cohort] = {}  # by the ids of its jobs
        self.steps = 0  # joint steps taken
        self.per_pass_setting = replicas_per_pass  # how many alike jobs one stack takes

    def run(self, requests: Sequence[Request]) -> None:
        """As many steps as every request still has, for all of them (one cohort after
        another); a request is ``done`` when its group is used up, it was stopped, or it went
        bad under ``nonfinite=raise``. The others wait for the next run."""
        n = min(len(r.group) - r.offset for r in requests)
        cohorts = self._cohorts_of(requests)
        run_rows = []  # per cohort, [n, M, B]: every step's rows, stacked once per run
        for cohort, members in cohorts:
            cohort.replicas.start_run()
            rows = [r.group.rows[r.offset : r.offset + n] for r in members]
            run_rows.append(torch.stack(rows, 1))
        taken = 0
        for _ in range(n):
            if any(r.job.stop_requested() for r in requests):
                break
            for (cohort, members), rows in zip(cohorts, run_rows, strict=True):
                cohort.step(rows[taken], members[0].group.data)
            for request in requests:
                request.job.count_step()
            taken += 1
            self.steps += 1
        for cohort, members in cohorts:
            _close_run(cohort.replicas, members, taken, stopped=taken < n)

    def _cohorts_of(self, requests: Sequence[Request]) -> list[tuple[Cohort, list[Request]]]:
        by_key: dict[tuple, list[Request]] = {}
        for request in requests:
            by_key.setdefault(cohort_key(request.job), []).append(request)
        cohorts, used = [], set()
        for alike in by_key.values():
            stacks = self._stacks(alike)
            built = False
            for members in stacks:
                ids = tuple(id(r.job) for r in members)
                used.add(ids)
                if ids not in self._cohorts:
                    self._cohorts[ids] = _build_cohort([r.job for r in members], members[0].group)
                    built = True
                cohorts.append((self._cohorts[ids], members))
            if built and len(alike) > 1:
                self._log_stacks([len(members) for members in stacks])
        for ids in set(self._cohorts) - used:  # membership changed: restacked from the jobs
            del self._cohorts[ids]
        return cohorts

    def _stacks(self, alike: list[Request]) -> list[list[Request]]:
        """Jobs that could share one stacked model, in stacks of :func:`replicas_per_pass`."""
        size = replicas_per_pass(self.per_pass_setting, [r.job for r in alike], alike[0].group)
        return [alike[i : i + size] for i in range(0, len(alike), size)]

    def _log_stacks(self, sizes: list[int]) -> None:
        """One line: how a group of alike jobs takes its steps."""
        setting = f"hydra.launcher.replicas_per_pass={self.per_pass_setting}"
        if len(sizes) == 1:
            how = "share one stacked model"
        elif max(sizes) == 1:
            how = "step one at a time, each alone in place"
        else:
            how = f"step as stacked models of {', '.join(map(str, sizes))} jobs"
        log.info("%d alike jobs %s (%s)", sum(sizes), how, setting)


def _close_run(replicas: Replicas, members: list[Request], taken: int, stopped: bool) -> None:
    """After a run: copy the replicas back into their jobs, read the flags once, and finish
    the requests that are done."""
    jobs = [r.job for r in members]
    replicas.store(jobs, [job.training_optimizer() for job in jobs])
    first_bad, skipped = replicas.faults() if taken else ([-1] * len(jobs), [0] * len(jobs))
    for i, request in enumerate(members):
        if request.first_bad < 0 and first_bad[i] >= 0:
            request.first_bad = request.offset + first_bad[i]
        request.skipped += skipped[i]
        request.offset += taken
        dead = request.first_bad >= 0 and request.job.nonfinite == "raise"
        if request.offset == len(request.group) or stopped or dead:
            request.done = True
            request.result = RunResult(
                request.offset,
                request.first_bad,
                request.skipped,
                replicas.objective[i].clone(),
                replicas.iwae_bound[i].clone(),
            )


def replicas_per_pass(setting: int | str, jobs: Sequence[TrainingJob], group: BatchGroup) -> int:
    """How many of ``jobs`` (alike: they could share one stacked model) an eager stacked
    step takes through forward and backward at once (``hydra.launcher.replicas_per_pass``);
    the rest go in further stacks, and a stack of one is the job stepped alone, in place.
    ``auto``: all of them on an accelerator (one launch per operator for the whole pack is
    what packing buys there); on a CPU one at a time once a replica's decoder output
    ``[K, B, D]`` takes ``OWN_PASS_BYTES``: a stack of such replicas outgrows the cache and
    costs more per replica than one alone (the paper model, M = 4: a packed job's step 1.20x
    its step alone in one stack), while small replicas gain from sharing a step (tiny model,
    M = 48: 925 model-steps/s in one stack, ~430 one at a time). A compiled or captured step
    stays one graph for all of them."""
    if _one_graph(jobs):
        return len(jobs)
    if setting != "auto":
        return min(int(setting), len(jobs))
    first = next(jobs[0].net.parameters())
    if first.device.type != "cpu":
        return len(jobs)
    k = jobs[0].step_settings()["num_samples"]
    batch, width = group.rows.shape[1], group.data.shape[1]
    return 1 if k * batch * width * first.element_size() >= OWN_PASS_BYTES else len(jobs)


def _one_graph(jobs: Sequence[TrainingJob]) -> bool:
    """The jobs' step is compiled (every job of a group is alike: :func:`cohort_key`) or
    captured as one CUDA graph (every job wants it)."""
    return jobs[0].compiles_step() or all(job.wants_captured_step() for job in jobs)


def _build_cohort(jobs: list[TrainingJob], group: BatchGroup) -> Cohort:
    """One stacked model for ``jobs``; a cohort of one trains in place, as a run alone."""
    optimizers = [job.training_optimizer() for job in jobs]
    settings = jobs[0].step_settings()
    compiled = jobs[0].compiles_step()  # every job of a cohort does (cohort_key)
    captured = not compiled and _one_graph(jobs)
    if len(jobs) == 1:
        replicas = Replicas.alone(jobs[0], optimizers[0], jobs[0].noise, **settings)
        backward = jobs[0].lone_backward()
    else:
        replicas = Replicas.stacked(jobs, optimizers, [job.noise for job in jobs], **settings)
        backward = Tensor.backward
    for m, job in enumerate(jobs):
        if job.observes_gradients():
            replicas.observers[m] = _observer(replicas, job)
    cohort = Cohort(replicas, backward, jobs[0].split)
    if compiled:
        # Every cohort compiles the same code again (its own tensors); past Dynamo's default
        # of 8 recompiles it would silently fall back to eager.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        replicas.compiled()
    elif captured:
        cohort.captured = CapturedStep(replicas, group.data, jobs[0].split, group.rows.shape[1])
    return cohort


def _observer(replicas: Replicas, job: TrainingJob) -> Callable[[int], None]:
    """Shows ``job`` its replica's parameters and gradients and calls its hooks."""

    def observe(m: int) -> None:
        replicas.show(m, job.net)
        job.before_update(replicas.inputs_of(m))

    return observe
