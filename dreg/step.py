"""The training step, written once: forward, estimator, routed backward, non-finite policy,
gradient clipping and optimizer step for M >= 1 replicas of one model.

Every way dreg trains goes through :class:`Replicas`: a run alone (M = 1, every call of
``DReGModule.training_step``, N steps per call or one), the captured CUDA graph
(:mod:`dreg.captured_step` records :meth:`Replicas.step`) and a pack of jobs
(:mod:`dreg.pack`, M > 1).

How the replicas are held:

* **Alone** (:meth:`Replicas.alone`): the module's own parameters, seen as ``[1, ...]``
  views, and its own optimizer. Nothing is copied; Lightning's checkpoints, DDP's gradient
  hooks and every callback see the module as they always did.
* **Stacked** (:meth:`Replicas.stacked`): each parameter of the M jobs stacked into one
  ``[M, ...]`` leaf tensor, and one optimizer (built by the jobs' shared optimizer factory)
  over the stacked tensors. Elementwise optimizers (Adam, AdamW, SGD, RMSprop) applied to
  a stacked tensor are exactly the M replicas' optimizers at once. :meth:`Replicas.store`
  copies parameters and optimizer state back into each job after a run of steps, so every
  job's checkpoints, validation and records are those of an ordinary run.

How a step is computed: the model's own code (``net.propose`` and ``net.log_joint``),
evaluated for all replicas at once with :func:`torch.func.vmap` over
:func:`torch.func.functional_call` (or called directly when M = 1). Between the two calls z
is one physical tensor, so the routing hook of :func:`~dreg.estimators.routed_loss` sits on
it as for one model: the replicas' particles are laid side by side as a batch of M * B data
points (``[K, M * B]``), and estimators, which act column by column, need no change.

Random numbers: every replica draws its binarization and latent noise from its own
``torch.Generator``, outside ``vmap``, in the same order alone or packed, so a job's draws
do not depend on its pack.

Non-finite values are found on the device, per replica, with no host sync per step: the
update of a replica whose loss or gradient is not finite is undone (``torch.where`` against
a copy taken before the optimizer step), and flags record the first bad step and the number
of skipped ones. Under ``nonfinite=raise`` a replica that went bad stops updating; the host
reads the flags once per run of steps (:meth:`Replicas.faults`) and fails that job then.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from dreg.estimators import Estimator, GradientWeights, Particles, routed_loss
from dreg.estimators.ops import iwae_bound

#: ``images [B, D] -> (x [B, Dx], context [B, C] or None)``: a dataset's split of a row.
Split = Callable[[Tensor], tuple[Tensor, Tensor | None]]


def draw_noise(
    shape: Sequence[int], generator: torch.Generator, antithetic: bool, like: Tensor
) -> Tensor:
    """``shape = [K, ...]`` standard-normal draws from ``generator``; ``antithetic`` mirrors
    the first K/2 (eps, -eps), as :func:`dreg.library.antithetic_noise`."""
    if not antithetic:
        return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)
    half = torch.randn(
        (shape[0] // 2, *shape[1:]), generator=generator, dtype=like.dtype, device=like.device
    )
    return torch.cat([half, -half], dim=0)


class _Evaluator(nn.Module):
    """Lets ``functional_call`` run any method of the net: ``forward(name, *args)``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, method: str, *args):
        return getattr(self.net, method)(*args)


class Job(Protocol):
    """What the step needs of a job besides its parameters: its model, estimator and
    settings (:class:`dreg.lightning_module.DReGModule` implements it; the run of steps asks
    for more, :class:`dreg.cohort.TrainingJob`)."""

    net: nn.Module
    estimator: Estimator
    nonfinite: str  # "raise" or "skip"
    noise: torch.Generator | None  # the job's training-noise stream
    optimizer_factory: Callable[..., torch.optim.Optimizer]
    train_model: bool

    def step_settings(self) -> dict[str, Any]:
        """What every replica of a stack must share (K, sampling, trained parts, clipping)."""
        ...

    def make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        """The job's configured optimizer over ``groups``."""
        ...


@dataclass
class ReplicaSpec:
    """What the step needs of one job besides its parameters."""

    estimator: Estimator
    generator: torch.Generator
    skip_nonfinite: bool


class Replicas:
    """M replicas of one model, their optimizer, and the training step they take together.

    Build with :meth:`alone` or :meth:`stacked`. After :meth:`step` the device tensors
    ``objective`` and ``iwae_bound`` ``[M]`` hold each replica's batch means of that step.

    :param net: a net of the replicas' shape (its code is what runs).
    :param params: name -> ``[M, ...]`` parameter (stacked leaf, or views of a module's own).
    :param buffers: name -> ``[M, ...]`` buffer.
    :param optimizer: a torch optimizer over the tensors that the step updates.
    :param specs: one :class:`ReplicaSpec` per replica.
    :param num_samples: K.
    :param antithetic: mirrored latent noise.
    :param train_model: ``False``: only the inference network trains.
    :param clip_norm: clip each replica's whole gradient to this 2-norm (``None``: no clip).
    :param extra: estimator parameters per replica ``(tensor, replica)`` (learned control
        variates); stepped by ``optimizer`` with the rest.
    """

    def __init__(
        self,
        net: nn.Module,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        optimizer: torch.optim.Optimizer,
        specs: Sequence[ReplicaSpec],
        num_samples: int,
        antithetic: bool = False,
        train_model: bool = True,
        clip_norm: float | None = None,
        extra: Sequence[tuple[Tensor, int]] = (),
        leaves: Sequence[Tensor] | None = None,
    ) -> None:
        self.net, self.params, self.buffers = net, params, buffers
        # The tensors that own the gradients and the optimizer state: ``params`` itself when
        # stacked, the module's parameters (of which ``params`` are views) alone.
        self.leaves = list(params.values()) if leaves is None else list(leaves)
        self.optimizer, self.specs = optimizer, list(specs)
        self.optimized = [p for group in optimizer.param_groups for p in group["params"]]
        self.num_samples, self.antithetic, self.train_model = num_samples, antithetic, train_model
        self.clip_norm, self.extra = clip_norm, list(extra)
        self.size = len(self.specs)
        first = next(iter(params.values()))
        self.device = first.device
        self.noise_dim = int(getattr(net, "noise_dim", getattr(net, "latent_dim", 0)))
        self.groups = estimator_groups([s.estimator for s in self.specs])
        skip = [s.skip_nonfinite for s in self.specs]
        self.skip = torch.tensor(skip, device=self.device)
        # Device flags, reset by start_run: a run of steps reads them once (faults()).
        self.alive = torch.ones(self.size, dtype=torch.bool, device=self.device)
        self.first_bad = torch.full((self.size,), -1, dtype=torch.long, device=self.device)
        self.skipped = torch.zeros(self.size, dtype=torch.long, device=self.device)
        self.step_in_run = torch.zeros((), dtype=torch.long, device=self.device)
        self.objective = torch.zeros(self.size, device=self.device)
        self.iwae_bound = torch.zeros(self.size, device=self.device)
        self.last: tuple[Tensor, Tensor | None, Tensor] | None = None  # (x, context, eps)
        # replica -> called with the gradients in place, before the update (grad_stats).
        self.observers: dict[int, Callable[[], None]] = {}
        self.owns_copies = False  # stacked copies, written back to the jobs by store()
        self.direct = self.size == 1 and leaves is not None  # the net's own parameters
        if self.direct:
            self._propose, self._log_joint = net.propose, net.log_joint
        else:
            evaluator = _Evaluator(net)
            prefixed = {f"net.{k}": v for k, v in params.items()}
            buffered = {f"net.{k}": v for k, v in buffers.items()}

            def call(method, p, b, *args):
                return functional_call(evaluator, (p, b), (method, *args))

            self._stacked = (prefixed, buffered)
            self._call = call
            self._vmapped: dict[bool, tuple[Callable, Callable]] = {}

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def alone(
        cls, module: Job, optimizer: torch.optim.Optimizer, generator: torch.Generator, **kwargs
    ) -> Replicas:
        """One job, trained in place: its own parameters and optimizer."""
        net = module.net
        params = {k: p.unsqueeze(0) for k, p in net.named_parameters()}
        buffers = {k: b.unsqueeze(0) for k, b in net.named_buffers()}
        spec = ReplicaSpec(module.estimator, generator, module.nonfinite == "skip")
        extra = [(p, 0) for p in module.estimator.parameters() if p.requires_grad]
        leaves = list(net.parameters())
        return cls(net, params, buffers, optimizer, [spec], extra=extra, leaves=leaves, **kwargs)

    @classmethod
    def stacked(
        cls,
        modules: Sequence[Job],
        optimizers: Sequence[torch.optim.Optimizer],
        generators: Sequence[torch.Generator],
        **kwargs,
    ) -> Replicas:
        """M jobs as stacked copies (see :meth:`store`); one optimizer from the first job's
        factory, which every job of a cohort shares. Every job must take the same step: the
        same K, sampling, trained parts, clipping and parameter shapes."""
        _check_same_step(modules, kwargs)
        nets = [m.net for m in modules]
        params, buffers = stack_module_state(nets)
        for name, p in nets[0].named_parameters():
            params[name].requires_grad_(p.requires_grad)
        specs = [
            ReplicaSpec(m.estimator, g, m.nonfinite == "skip")
            for m, g in zip(modules, generators, strict=True)
        ]
        extra = [
            (p, i)
            for i, m in enumerate(modules)
            for p in m.estimator.parameters()
            if p.requires_grad
        ]
        groups = parameter_groups(nets[0], params, modules[0].train_model)
        if extra:
            groups.append({"params": [p for p, _ in extra], "name": "estimator"})
        optimizer = modules[0].make_optimizer(groups)
        replicas = cls(nets[0], params, buffers, optimizer, specs, extra=extra, **kwargs)
        replicas.owns_copies = True
        replicas._load_optimizer_states(nets, optimizers)
        return replicas

    def _pairs(self, nets: Sequence[nn.Module]) -> list[tuple[Tensor, list[Tensor]]]:
        """(stacked tensor, each job's tensor) for every trained parameter."""
        named = [dict(n.named_parameters()) for n in nets]
        return [(p, [n[name] for n in named]) for name, p in self.params.items()]

    def _load_optimizer_states(self, nets, optimizers) -> None:
        for stacked, own in self._pairs(nets):
            states = [opt.state.get(p) for opt, p in zip(optimizers, own, strict=True)]
            if not states[0]:
                continue
            self.optimizer.state[stacked] = {
                key: torch.stack([s[key] for s in states])
                if isinstance(value, Tensor) and value.shape == own[0].shape
                else (value.clone() if isinstance(value, Tensor) else value)
                for key, value in states[0].items()
            }
        for tensor, m in self.extra:
            state = optimizers[m].state.get(tensor)
            if state:
                self.optimizer.state[tensor] = state

    @torch.no_grad()
    def store(self, modules: Sequence[Job], optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Copy every replica's parameters and optimizer state into its job (stacked only)."""
        if not self.owns_copies:
            return
        nets = [m.net for m in modules]
        for stacked, own in self._pairs(nets):
            state = self.optimizer.state.get(stacked, {})
            for m, (p, opt) in enumerate(zip(own, optimizers, strict=True)):
                p.copy_(stacked[m])
                if state:
                    opt.state[p] = {
                        key: value[m].clone()
                        if isinstance(value, Tensor) and value.shape == stacked.shape
                        else (value.clone() if isinstance(value, Tensor) else value)
                        for key, value in state.items()
                    }
        for tensor, m in self.extra:
            if tensor in self.optimizer.state:
                optimizers[m].state[tensor] = self.optimizer.state[tensor]

    # -- one step ------------------------------------------------------------------------------
    def start_run(self) -> None:
        """Reset the per-run flags (a run: the steps between two host reads)."""
        self.first_bad.fill_(-1)
        self.skipped.zero_()
        self.step_in_run.zero_()
        self.alive.fill_(True)

    def particles(self, x: Tensor, context: Tensor | None, eps: Tensor) -> Particles:
        """Particles of every replica, side by side: ``log_p`` etc. ``[K, M * B]``.

        :param x: ``[M, B, Dx]``; ``context``: ``[M, B, C]`` or ``None``; ``eps``:
            ``[M, K, B, noise_dim]``.
        """
        m, b = x.shape[:2]
        k = eps.shape[1]
        lean = self._lean_proposal()  # no replica's estimator has a score term
        if self.direct:
            x0, c0 = x[0], None if context is None else context[0]
            z, log_q_stopped, log_q_stop_z = self._propose(x0, c0, eps[0], *[False] * lean)
            z_for_p = z.view_as(z)
            log_p = self.net.log_joint(x0, z_for_p, c0)
            return Particles(log_p, log_q_stopped, log_q_stop_z, z_for_p)
        params, buffers = self._stacked
        propose, log_joint = self._vmapped_calls(context is not None, lean)
        z, log_q_stopped, *score = propose(params, buffers, x, context, eps)
        log_q_stop_z = score[0] if score else None
        z_flat = z.transpose(0, 1).reshape(k, m * b, z.shape[-1])
        z_for_p = z_flat.view_as(z_flat)  # the routing hook's tensor
        # Contiguous [M, K, B, Dz]: the decoder's output (the largest tensor of a step) then
        # comes out dense, and every elementwise op on it runs at full speed.
        z_in = z_for_p.reshape(k, m, b, -1).transpose(0, 1).contiguous()
        log_p = log_joint(params, buffers, x, z_in, context)

        def side_by_side(t: Tensor) -> Tensor:  # [M, K, B] -> [K, M * B]
            return t.transpose(0, 1).reshape(k, m * b)

        return Particles(
            side_by_side(log_p),
            side_by_side(log_q_stopped),
            None if log_q_stop_z is None else side_by_side(log_q_stop_z),
            z_for_p,
        )

    def _lean_proposal(self) -> bool:
        """No estimator of the replicas uses the score term and the net's ``propose`` can
        leave log q(stop z) out (a ``score`` argument): its graph is then never built."""
        lean = self.__dict__.get("_lean")
        if lean is None:
            accepts = "score" in inspect.signature(self.net.propose).parameters
            lean = accepts and not any(spec.estimator.uses_score for spec in self.specs)
            self._lean = lean
        return lean

    def _vmapped_calls(self, with_context: bool, lean: bool = False) -> tuple[Callable, Callable]:
        """``net.propose`` and ``net.log_joint`` over the replicas (dim 0 of every input;
        an absent context is not mapped); ``lean``: ``propose`` without log q(stop z)."""
        key = (with_context, lean)
        if key not in self._vmapped:
            c = 0 if with_context else None
            call = self._call

            def propose(*args):
                return call("propose", *args, False)[:2] if lean else call("propose", *args)

            self._vmapped[key] = (
                vmap(propose, in_dims=(0, 0, 0, c, 0)),
                vmap(functools.partial(call, "log_joint"), in_dims=(0, 0, 0, 0, c)),
            )
        return self._vmapped[key]

    def weights(self, log_w: Tensor) -> GradientWeights:
        """Each replica's estimator on its own columns of ``log_w [K, M * B]``."""
        b = log_w.shape[1] // self.size
        parts = [
            estimator(log_w[:, start * b : stop * b]) for estimator, start, stop in self.groups
        ]
        if len(parts) == 1:
            return parts[0]
        aux = [p.aux_loss for p in parts if p.aux_loss is not None]
        return GradientWeights(
            objective=torch.cat([p.objective for p in parts]),
            model=torch.cat([p.model for p in parts], dim=1),
            path=torch.cat([p.path for p in parts], dim=1),
            score=torch.cat([p.score for p in parts], dim=1),
            aux_loss=torch.stack(aux).sum() if aux else None,
        )

    def draw(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Binarization ``[M, B, D]`` and latent noise ``[M, K, B, noise_dim]``, each replica
        from its own generator (binarize first, then sample, as steps always have)."""
        bits, eps = [], []
        shape = (self.num_samples, images.shape[1], self.noise_dim)
        if self.size == 1 and not self.antithetic:
            # The same numbers as below (one generator fills both tensors in element order),
            # drawn straight into [1, ...]: no slicing and stacking.
            generator = self.specs[0].generator
            binarized = torch.bernoulli(images, generator=generator)
            return binarized, draw_noise((1, *shape), generator, False, images)
        for m, spec in enumerate(self.specs):
            bits.append(torch.bernoulli(images[m], generator=spec.generator))
            eps.append(draw_noise(shape, spec.generator, self.antithetic, images))
        return torch.stack(bits), torch.stack(eps)

    def step(self, images: Tensor, split: Split, backward: Callable[[Tensor], None]) -> None:
        """One optimizer step of every replica on grey-level ``images [M, B, D]``.

        :param split: a row of binarized pixels -> ``(x, context)``.
        :param backward: runs the backward of the loss (alone: the job's ``lone_backward``,
            Lightning's ``manual_backward`` where DDP or a hook needs it; stacked:
            ``Tensor.backward``).
        """
        bits, eps = self.draw(images)
        x, context = split(bits)
        self.last = (x, context, eps)
        compiled = self.__dict__.get("_compiled")
        loss, log_w, objective, log_q_stop_z = (compiled[0] if compiled else self._loss)(
            x, context, eps
        )
        for tensor in self.optimized:  # optimizer.zero_grad()'s work, in a tenth of its time
            tensor.grad = None
        backward(loss)
        if compiled and not self.observers and self.optimizer.state:
            compiled[1](log_w, objective, log_q_stop_z, None)
            return
        # The gradient's norm only where clipping needs it; finiteness alone is cheaper.
        sq_norm = self._per_replica_sq_norm() if self.clip_norm is not None else None
        if self._all_fine_on_host(loss, sq_norm):
            # The common case on the CPU: every replica alive and finite. The same numbers
            # as the device path (_update) with ``ok`` all true, without computing ``ok``.
            self._clip(sq_norm)
            self._observe(self.alive)
            with torch.no_grad():
                self.optimizer.step()
                self.step_in_run.add_(1)
                self._record_bounds(objective, log_w)
            return
        self._update(log_w, objective, log_q_stop_z, sq_norm)

    def compiled(self, **options) -> Replicas:
        """Run :meth:`step` compiled (``model.compile=step``): ``torch.compile`` of the
        forward, estimator and routed loss (the routing hook is traced into the backward
        graph AOTAutograd compiles) and of everything after the backward: flags, clipping,
        the optimizer's update (masked per replica, fused) and the records. Eager between
        them: the two draws (each replica's own ``torch.Generator``), ``split`` and the
        ``backward`` callable. With observers the
        part after the backward runs eagerly (they read gradients on the host), and so does
        the first update: the optimizer creates its state lazily, and an update traced
        before that state exists does not undo a skipped step's moments. Same numbers as
        eager up to float32 round-off. ``options`` go to ``torch.compile``."""
        self._lean_proposal()  # decided eagerly: inspect is no graph material
        for group in self.optimizer.param_groups:
            # torch does not trace into a fused optimizer (torch.compiler.disable: three graph
            # breaks); the compiled update fuses the single-tensor loop itself.
            if group.get("fused"):
                group["fused"] = False
        # Static shapes: after a shape change (another cohort's M, another model in the same
        # process), Dynamo's automatic dynamic shapes crashed while building Inductor's guards
        # (torch 2.13, CPU); a cohort's shapes never change, so one static graph per cohort.
        options.setdefault("dynamic", False)
        self._compiled = (
            torch.compile(self._loss, **options),
            torch.compile(self._update, **options),
        )
        return self

    def _loss(
        self, x: Tensor, context: Tensor | None, eps: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``(loss, log_w, objective, log q(stop z) or None)``: the forward of a step."""
        particles = self.particles(x, context, eps)
        log_w = particles.log_w
        weights = self.weights(log_w)
        aux, weights.aux_loss = weights.aux_loss, None
        # routed_loss averages over the M * B columns; each replica's loss is its batch mean.
        loss = routed_loss(particles, weights, self.train_model)
        if self.size > 1:
            loss = loss * self.size
        if aux is not None:
            loss = loss + aux
        score = particles.log_q_stop_z
        return loss, log_w, weights.objective, None if score is None else score.detach()

    def _update(
        self,
        log_w: Tensor,
        objective: Tensor,
        log_q_stop_z: Tensor | None,
        sq_norm: Tensor | None,
    ) -> None:
        """After the backward, on the device: per-replica flags, clipping, observers, the
        masked update and the records (no host read except the observers' own)."""
        if sq_norm is None:
            sq_norm = self._per_replica_sq_norm()
        ok = self._finite(log_w, log_q_stop_z, sq_norm) & self.alive
        self._clip(sq_norm)
        self._observe(ok)
        self._masked_update(ok)
        self._record(ok, objective, log_w)

    # -- parts of a step ---------------------------------------------------------------------
    def _grads(self) -> list[Tensor]:
        return [p.grad for p in self.leaves if p.grad is not None]

    def _per_replica_sq_norm(self) -> Tensor:
        """``[M]`` squared 2-norm of each replica's whole gradient."""
        total = torch.zeros(self.size, device=self.device)
        for g in self._grads():
            total = total + g.reshape(self.size, -1).float().square().sum(1)
        for tensor, m in self.extra:
            if tensor.grad is not None:
                total[m] = total[m] + tensor.grad.float().square().sum()
        return total

    def _all_fine_on_host(self, loss: Tensor, sq_norm: Tensor | None) -> bool:
        """On the CPU (eager): whether every replica is alive and its loss and gradient are
        finite, read on the host: the flags are already in host memory, so this waits for
        nothing. ``False`` on accelerators and under ``torch.compile`` (no host read there:
        the device path decides per replica), and whenever anything is off; the device path
        then computes the exact per-replica flags.

        One number: the loss (non-finite whenever any term of any replica is, since every
        coefficient multiplies a value: 0 * inf is NaN) plus the square of the sum of the
        gradient tensors' norms (``torch._foreach_norm``; the squared norms themselves when
        clipping computed them). That square bounds the squared norm from above, so a
        finite number here means the device path would find every replica finite too."""
        if self.device.type != "cpu" or torch.compiler.is_compiling():
            return False
        total = loss.detach()
        if sq_norm is not None:
            total = total + sq_norm.sum()
        else:
            grads = self._grads() + [t.grad for t, _ in self.extra if t.grad is not None]
            if grads:
                norms = torch._foreach_norm(grads)
                norm_sum = functools.reduce(torch.add, norms)
                total = total + norm_sum * norm_sum
        if not math.isfinite(total.item()):
            return False
        return bool(self.alive) if self.size == 1 else bool(self.alive.all())

    def _finite(self, log_w: Tensor, log_q_stop_z: Tensor | None, sq_norm: Tensor) -> Tensor:
        """``[M]``: the replica's loss terms and its gradient (its squared norm) are all
        finite (a replica's loss is a sum of its own columns, so another replica's NaN
        cannot reach it). The terms: ``log_w = log p - log q(z; stop phi)`` (already
        computed), plus log q(stop z; phi) where the estimator has a score term."""
        terms = log_w
        if log_q_stop_z is not None:
            terms = terms + log_q_stop_z
        if self.size == 1:
            finite_terms = torch.isfinite(terms).all().reshape(1)
        else:
            b = terms.shape[1] // self.size
            finite_terms = torch.isfinite(terms.reshape(terms.shape[0], self.size, b)).all(2)
            finite_terms = finite_terms.all(0)
        return finite_terms & torch.isfinite(sq_norm)

    def _clip(self, sq_norm: Tensor | None) -> None:
        if self.clip_norm is None or sq_norm is None:
            return
        norm = sq_norm.sqrt()
        factor = (self.clip_norm / (norm + 1e-6)).clamp(max=1.0)  # torch.nn.utils.clip_grad_norm_
        for g in self._grads():
            g.mul_(factor.reshape(-1, *([1] * (g.dim() - 1))).to(g.dtype))
        for tensor, m in self.extra:
            if tensor.grad is not None:
                tensor.grad.mul_(factor[m].to(tensor.grad.dtype))

    def _state_tensors(self) -> list[tuple[Tensor, int | None]]:
        """Every tensor the optimizer step changes, with its replica (``None``: stacked)."""
        out = []
        for p in self.leaves:
            if not p.requires_grad:
                continue
            out.append((p, None))
            for value in self.optimizer.state.get(p, {}).values():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    out.append((value, None))
        for tensor, m in self.extra:
            out.append((tensor, m))
            for value in self.optimizer.state.get(tensor, {}).values():
                if isinstance(value, Tensor) and value.shape == tensor.shape:
                    out.append((value, m))
        return out

    @torch.no_grad()
    def _masked_update(self, ok: Tensor) -> None:
        """The optimizer step, undone for replicas whose ``ok`` is false: a copy of what the
        step changes, then a per-replica ``torch.where`` (no host sync, no branch; compiled,
        the copy and the selection fuse into the update). On the CPU only steps with a bad
        replica come here (:meth:`_all_fine_on_host`)."""
        before = [(t, t.detach().clone(), m) for t, m in self._state_tensors()]
        self._optimizer_step()
        for tensor, saved, m in before:
            keep = ok[m] if m is not None else ok.reshape(-1, *([1] * (tensor.dim() - 1)))
            tensor.copy_(torch.where(keep, tensor, saved))

    def _optimizer_step(self) -> None:
        """``optimizer.step()``; under ``torch.compile`` its undecorated body (already under
        ``no_grad`` here): ``Optimizer.step``'s wrappers call ``torch._dynamo.graph_break()``
        around it, which would split the compiled update in three (pytorch#104053 explains
        why they break: to see a no-grad graph, as this one is). Step hooks and the
        profiler's record_function, which those wrappers also run, are skipped there."""
        if not torch.compiler.is_compiling():
            self.optimizer.step()
            return
        step = type(self.optimizer).step
        while hasattr(step, "__wrapped__"):
            step = step.__wrapped__
        step(self.optimizer)

    @torch.no_grad()
    def _record(self, ok: Tensor, objective: Tensor, log_w: Tensor) -> None:
        fresh = ~ok & self.alive  # went bad at this step
        first = fresh & (self.first_bad < 0)
        self.first_bad.copy_(torch.where(first, self.step_in_run, self.first_bad))
        self.skipped.add_(fresh & self.skip)
        # Under raise a replica that went bad stops updating: its job fails at the next read.
        self.alive &= ok | self.skip
        self.step_in_run.add_(1)
        self._record_bounds(objective, log_w)

    def _record_bounds(self, objective: Tensor, log_w: Tensor) -> None:
        """Each replica's batch means of its objective and of the IWAE bound."""
        if self.size == 1:  # sum / B is mean()'s own arithmetic, in fewer operators
            self.objective.copy_(objective.sum() / objective.shape[0])
        else:
            self.objective.copy_(objective.reshape(self.size, -1).mean(1))
        if all(estimator.objective_is_iwae_bound for estimator, _, _ in self.groups):
            self.iwae_bound.copy_(self.objective)  # the same numbers: no second logsumexp
            return
        bound = iwae_bound(log_w)
        self.iwae_bound.copy_(bound.reshape(self.size, -1).mean(1))

    def _observe(self, ok: Tensor) -> None:
        """Call the observers of the replicas whose step is finite (a skipped update's
        gradient must not enter a job's statistics). One host read, only with observers:
        they read the gradients on the host anyway."""
        if not self.observers:
            return
        finite = ok.tolist()
        for m, observe in self.observers.items():
            if finite[m]:
                observe(m)

    @torch.no_grad()
    def show(self, m: int, net: nn.Module) -> None:
        """Make ``net`` hold replica ``m``'s current parameters and gradients, for observers
        (the one gradient accessor of both layouts). Alone, ``net`` is the replica: nothing
        to do. Stacked, the job's own tensors are stale until :meth:`store`: its parameters
        get the replica's values and its ``.grad`` a view of the replica's gradient."""
        if not self.owns_copies:
            return
        for name, p in net.named_parameters():
            stacked = self.params[name]
            p.copy_(stacked[m])
            p.grad = None if stacked.grad is None else stacked.grad[m]

    def inputs_of(self, m: int) -> tuple[Tensor, Tensor | None, Tensor]:
        """Replica ``m``'s last step: binarized x, context and latent noise ``[K, B, D]``."""
        x, context, eps = self.last
        return x[m], None if context is None else context[m], eps[m]

    def faults(self) -> tuple[list[int], list[int]]:
        """Per replica ``(first bad step of the run or -1, skipped steps)``: one host read."""
        first, skipped = torch.stack([self.first_bad, self.skipped]).tolist()
        return [int(f) for f in first], [int(s) for s in skipped]


# The config key of each step setting, for the messages.
_SETTING_KEYS = {
    "num_samples": "model.num_samples",
    "antithetic": "model.antithetic",
    "train_model": "train_model",
    "clip_norm": "model.clip_grad_norm",
}


def _check_same_step(modules: Sequence[Job], settings: dict) -> None:
    """One clear line when the jobs of a stack would not take the same step (a different K
    would silently train every replica at the first job's K)."""
    shapes = [tuple(p.shape) for p in modules[0].net.parameters()]
    for i, module in enumerate(modules):
        for key, value in module.step_settings().items():
            if settings.get(key, value) != value:
                name = _SETTING_KEYS.get(key, key)
                raise ValueError(
                    f"job {i} of a stacked pack has {name}={value}, the pack steps with "
                    f"{name}={settings[key]}: replicas must share K and sampling; put such "
                    "jobs in separate packs (dreg.packed_launcher.pack_key keeps them apart)"
                )
        if [tuple(p.shape) for p in module.net.parameters()] != shapes:
            raise ValueError(
                f"job {i} of a stacked pack has other parameter shapes than job 0; only "
                "jobs of the same network sizes stack (model.net must match)"
            )


def parameter_groups(net: nn.Module, params: dict[str, Tensor], train_model: bool) -> list[dict]:
    """The optimizer's groups (``model`` then ``inference``) over ``params`` by name."""
    model_ids = {id(p) for p in net.model_parameters()}
    names = {id(p): name for name, p in net.named_parameters()}
    model = [params[names[id(p)]] for p in net.model_parameters()]
    inference = [params[name] for name, p in net.named_parameters() if id(p) not in model_ids]
    groups = [{"params": inference, "name": "inference"}]
    if train_model:
        groups.insert(0, {"params": model, "name": "model"})
    return groups


def estimator_groups(estimators: Sequence[Estimator]) -> list[tuple[Estimator, int, int]]:
    """``(estimator, first replica, end)`` for runs of replicas whose estimators compute the
    same coefficients: one call per run. Estimators with parameters get a call each."""
    groups: list[tuple[Estimator, int, int]] = []
    for i, estimator in enumerate(estimators):
        if groups and not any(True for _ in estimator.parameters()):
            last, start, _ = groups[-1]
            if same_estimator(last, estimator):
                groups[-1] = (last, start, i + 1)
                continue
        groups.append((estimator, i, i + 1))
    return groups


def same_estimator(a: Estimator, b: Estimator) -> bool:
    """Same class and settings, and no parameters of their own."""
    if type(a) is not type(b) or any(True for _ in a.parameters()):
        return False
    return (
        repr(a) == repr(b)
        and vars(a).get("_buffers") == vars(b).get("_buffers")
        and (
            {k: v for k, v in vars(a).items() if not k.startswith("_")}
            == {k: v for k, v in vars(b).items() if not k.startswith("_")}
        )
    )
