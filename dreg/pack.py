"""Packs: several training jobs as replicas of one model, stepped together in one process.

A pack runs each job's whole pipeline (:func:`dreg.run.main`: run folder, Lightning trainer,
loggers, checkpoints, records) in a thread of its own, **one thread at a time**. Training
steps meet at a barrier (:meth:`Pack.step`): once every unfinished job of the pack waits
there, one joint step runs the forward passes of all replicas and a single backward, and each
job goes on with its own non-finite check and its own optimizer step. So every job stays a
normal run with its own records, while the model's kernels are shared.

Why the jobs cannot change each other's numbers:

* **One thread runs at a time.** A thread holds the pack's lock from its start to the barrier
  and from the barrier to its end, so no two jobs ever race on shared state.
* **Private random streams.** Switching threads swaps the global RNG states (torch CPU and
  CUDA, NumPy, ``random``) and Hydra's job config, like an OS swaps registers: every job draws
  its binarization, latent noise and evaluation noise from its own stream, exactly as it would
  alone, and saves and restores that stream in its checkpoints as a solo run does. The joint
  step draws replica m's noise with m's state in place, in the order its solo step draws it.
* **Separate parameters and optimizers.** Replica m's gradient comes from its own loss alone
  (batched: the losses are summed for one backward, and d(sum)/d(loss_m) = 1), so a NaN in
  one replica reaches no other, and ``model.nonfinite`` acts on each job alone (raise: that
  job fails and leaves the pack; skip: only its update is dropped).

How a step is computed (:func:`joint_step`):

* ``batched=False``: one replica's solo step after another (the same operations, so a job's
  numbers in a pack are **bitwise** those of the job run alone). The default on CPU, where a
  step is bound by the decoder's matrix products and batching gains nothing.
* ``batched=True``: the replicas' weights stacked ``[M, ...]`` and every layer one batched
  matrix product (:func:`stacked_particles`), so a kernel does M replicas' work: the point of
  packing on a GPU. Equal to the solo step to float round-off (batched and single matrix
  products sum in different orders), tested in float64.

A normal run is a pack of one: :class:`~dreg.lightning_module.DReGModule` computes every
grouped training step (``model.steps_per_call``, default 4) through :func:`joint_step`, alone
or in a pack. A job that trains one step per call (DDP, ``estimator_compare``, epoch-fraction
validation) never reaches the barrier: in a pack it trains through, holding its turn, and
the others go on when it ends.
"""

from __future__ import annotations

import ctypes
import logging
import math
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from torch import Tensor, nn

from dreg.checkpointing import rng_state, set_rng_state
from dreg.datamodules.binarized import Batch
from dreg.estimators import GradientWeights, Particles, routed_loss
from dreg.library import antithetic_noise, diagonal_normal_log_prob, standard_normal_noise
from dreg.model import SCALE_OFFSET, VAE

log = logging.getLogger(__name__)

_LOG_2PI = math.log(2 * math.pi)
_local = threading.local()  # .pack, .member: the pack and member of a job's thread
M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


# -- one training step of several replicas ---------------------------------------------------------
@dataclass
class StepRequest:
    """One replica's part of a joint step: its module and batch in, particles and loss out.

    :ivar module: the job's :class:`~dreg.lightning_module.DReGModule`.
    :ivar batch: the binarized training batch of this step.
    :ivar member: the job's place in its pack (whose RNG state draws the noise), or ``None``
        for a run alone (the live RNG state is its own).
    """

    module: Any
    batch: Batch
    member: _Member | None = None
    particles: Particles | None = None
    weights: GradientWeights | None = None
    loss: Tensor | None = None
    error: BaseException | None = None
    done: bool = False

    @contextmanager
    def own_rng(self) -> Iterator[None]:
        """The global RNG is this replica's own stream inside the block."""
        if self.member is None:
            yield
            return
        set_rng_state(self.member.rng)
        try:
            yield
        finally:
            self.member.rng = rng_state()


def joint_step(requests: Sequence[StepRequest], batched: bool = False) -> None:
    """Forward and backward of every replica: each one's parameters get its own gradient.

    Fills ``particles``, ``weights`` and ``loss`` of each request. Unbatched, it is a solo
    step per replica, one after another (the same operations, so bitwise a run alone, and one
    replica's activations in memory at a time). ``batched`` computes the model passes of all
    replicas with stacked weights (when :func:`stackable`) and takes one backward for the sum
    of their losses: d(sum)/d(loss_m) = 1, so each replica still gets its own gradient.
    """
    if not (batched and len(requests) > 1 and stackable([r.module.net for r in requests])):
        for request in requests:
            with request.own_rng():
                request.particles, request.weights = request.module.estimate(request.batch)
            module = request.module
            request.loss = routed_loss(request.particles, request.weights, module.train_model)
            module.manual_backward(request.loss)  # Lightning's backward, as in a run alone
        return
    every = stacked_particles(
        [r.module.net for r in requests],
        [r.batch.x for r in requests],
        requests[0].module.num_samples,
        [_noise_in_own_stream(r) for r in requests],
    )
    for request, particles in zip(requests, every, strict=True):
        request.particles = particles
        request.weights = request.module.estimator(particles.log_w)
        request.loss = routed_loss(particles, request.weights, request.module.train_model)
    torch.autograd.backward([r.loss for r in requests])


def _noise_in_own_stream(request: StepRequest) -> Callable[..., Tensor]:
    sampler = antithetic_noise if request.module.antithetic else standard_normal_noise

    def draw(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        with request.own_rng():
            return sampler(shape, dtype, device)

    return draw


def stackable(nets: Sequence[nn.Module]) -> bool:
    """Whether :func:`stacked_particles` can run these nets together: unconditional
    :class:`~dreg.model.VAE` replicas with equal shapes, on one device."""
    first = nets[0]
    if any(type(n) is not VAE or n.context_dim for n in nets):
        return False
    shapes = [[(p.shape, p.dtype, p.device) for p in n.parameters()] for n in nets]
    return all(s == shapes[0] for s in shapes) and all(
        [type(m) for m in n.modules()] == [type(m) for m in first.modules()] for n in nets
    )


def stacked_mlp(mlps: Sequence[nn.Sequential], inputs: Tensor) -> Tensor:
    """``[M, *, in] -> [M, *, out]``: replica m's MLP on ``inputs[m]``, each layer one batched
    matrix product of the stacked weights (gradients flow back to every replica's tensors)."""
    m, *middle, _ = inputs.shape
    h = inputs.reshape(m, -1, inputs.shape[-1])
    for i, layer in enumerate(mlps[0]):
        if isinstance(layer, nn.Linear):
            weight = torch.stack([mlp[i].weight for mlp in mlps])  # [M, out, in]
            bias = torch.stack([mlp[i].bias for mlp in mlps])  # [M, out]
            h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
        else:
            h = layer(h)  # the activation: stateless, the same in every replica
    return h.reshape(m, *middle, h.shape[-1])


def stacked_particles(
    nets: Sequence[VAE],
    xs: Sequence[Tensor],
    num_samples: int,
    noise: Sequence[Callable[..., Tensor]],
) -> list[Particles]:
    """:meth:`VAE.particles` of M replicas at once, each on its own batch and noise.

    The same quantities and expressions as ``VAE.particles`` (through
    :func:`~dreg.library.make_particles`), with one stacked encoder and decoder pass. Each
    replica's z gets its own alias ``z_for_p`` before stacking, so the routing hook of
    :func:`~dreg.estimators.routed_loss` sees only that replica's gradient.
    """
    x = torch.stack(list(xs))  # [M, B, Dx]
    inputs = x - torch.stack([net.train_mean for net in nets]).unsqueeze(1)
    mean, raw_scale = stacked_mlp([net.encoder.net for net in nets], inputs).chunk(2, dim=-1)
    scale = F.softplus(raw_scale + SCALE_OFFSET)  # [M, B, Dz]
    zs, aliases = [], []
    for m, draw in enumerate(noise):
        eps = draw(torch.Size((num_samples, *mean.shape[1:])), mean.dtype, mean.device)
        z = mean[m] + scale[m] * eps  # [K, B, Dz]
        zs.append(z)
        aliases.append(z.view_as(z))
    z_for_p = torch.stack(aliases)  # [M, K, B, Dz]
    log_prior = (-0.5 * z_for_p**2 - 0.5 * _LOG_2PI).sum(-1)
    logits = stacked_mlp([net.decoder for net in nets], z_for_p)  # [M, K, B, Dx]
    log_lik = -F.binary_cross_entropy_with_logits(
        logits, x.unsqueeze(1).expand_as(logits), reduction="none"
    ).sum(-1)
    log_p = log_prior + log_lik  # [M, K, B]
    return [
        Particles(
            log_p=log_p[m],
            log_q_stopped=diagonal_normal_log_prob(z, mean[m].detach(), scale[m].detach(), 1),
            log_q_stop_z=diagonal_normal_log_prob(z.detach(), mean[m], scale[m], 1),
            z_for_p=aliases[m],
        )
        for m, z in enumerate(zs)
    ]


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


def _ask_to_stop(trainer: Any) -> None:
    """What Lightning's own SIGTERM handler does (it is registered in the main thread only):
    the trainer stops at its next step boundary and raises ``SIGTERMException``."""
    trainer._signal_connector.received_sigterm = True


# -- the scheduler -------------------------------------------------------------------------------
@dataclass
class _Member:
    """A job of a pack: what its thread leaves behind while another one runs."""

    index: int
    name: str
    rng: dict[str, Any] = field(default_factory=dict)
    hydra_cfg: Any = None
    request: StepRequest | None = None
    trainer: Any = None
    finished: bool = False


def current_pack() -> Pack | None:
    """The pack whose job runs in this thread (``None`` for a run alone)."""
    return getattr(_local, "pack", None)


class Pack:
    """Runs jobs in threads, one at a time, and steps their replicas together.

    :param batched: compute joint steps with stacked weights (:func:`stacked_particles`);
        otherwise one replica after another, bitwise the solo steps.
    """

    def __init__(self, batched: bool = False) -> None:
        self.batched = batched
        self._cond = threading.Condition()  # its lock is the right to run
        self._members: list[_Member] = []
        self._stopping = False
        self.steps = 0  # joint steps taken (for the log)

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
                    self._step_if_all_waiting()

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
                _ask_to_stop(member.trainer)

    def attach(self, trainer: Any) -> None:
        """The calling job trains with ``trainer`` (stop signals reach it through the pack)."""
        _local.member.trainer = trainer
        if self._stopping:
            _ask_to_stop(trainer)

    # -- the barrier ---------------------------------------------------------------------------
    def step(self, request: StepRequest) -> None:
        """Wait until every unfinished job has a step to take, then take them together."""
        member: _Member = _local.member
        request.member, member.request = member, request
        member.rng, member.hydra_cfg = rng_state(), HydraConfig.instance().cfg
        self._step_if_all_waiting()
        while not request.done:
            self._cond.wait()  # lets the next job run
        set_rng_state(member.rng)
        HydraConfig.instance().cfg = member.hydra_cfg
        if request.error is not None:
            raise request.error

    def _step_if_all_waiting(self) -> None:
        """Called with the lock held whenever a job arrives or ends."""
        live = [m for m in self._members if not m.finished]
        if not live or any(m.request is None for m in live):
            return
        requests = [m.request for m in live]
        try:
            joint_step(requests, self.batched)
        except Exception as err:  # e.g. out of memory: every job of this step reports it
            for request in requests:
                request.error = err
        for member in live:
            member.request.done, member.request = True, None
        self.steps += 1
        self._cond.notify_all()
