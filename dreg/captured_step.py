"""The whole training step recorded once as a CUDA graph and replayed (``model.cuda_graph``).

One step of the paper's model (batch 32, K 64) is about 100 small kernels, so on a GPU it is
bound by kernel launches, not arithmetic. Recorded as one CUDA graph it is a single launch:
batch gather from the on-device split, dynamic binarization, latent noise, forward, the
routed backward, the non-finite check (a device flag) and Adam with ``capturable=True``.

Why replay is correct:

* **Random numbers.** PyTorch's CUDA generator is graph-safe: each replay reads the
  generator's current Philox offset and advances it by the graph's total, so every replay
  draws fresh Bernoulli bits and fresh eps, in the order eager steps would.
* **The routing hook.** :func:`~dreg.estimators.routed_loss` registers a gradient hook on z
  during the forward. The hook is Python, so it runs once, during capture, and its
  multiplication by the per-sample ratio is recorded as a kernel of the graph's backward;
  replays recompute the ratio in the same static buffer.
* **Static memory.** The indices of the batch are copied into a static buffer before each
  replay; every intermediate lives in the graph's private memory pool. Gradients are set to
  ``None`` before capture so the captured backward allocates them there and overwrites them
  on every replay (no zeroing kernel needed).
* **Warm-up without side effects.** Capture needs a few eager iterations first (on a side
  stream, as the PyTorch docs prescribe); they update the parameters and draw noise, so the
  parameters, Adam's state and the RNG state are restored afterwards, in place (the graph
  holds their addresses).
* **Non-finite steps.** ``raise``: a device flag records the first bad step of a group; the
  host reads it once per group and raises naming that step. ``skip``: the graph also keeps
  a copy of the parameters and Adam state and puts it back when the step was not finite
  (``torch.where``, so a NaN update never lands), and counts the skips on the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dreg.datamodules.binarized import Batch
from dreg.estimators import routed_loss
from dreg.estimators.ops import iwae_bound

WARMUP_STEPS = 3  # eager iterations before capture (lazy state, cuBLAS handles, allocator)


class CapturedStep:
    """One optimizer step of ``module`` (a DReGModule), captured on first use.

    :param module: provides ``estimate(batch)``, ``net``, ``train_model``.
    :param optimizer: the torch optimizer (Adam/AdamW with ``capturable=True``).
    :param data: ``[N, D]`` grey levels of the training split, on the GPU.
    :param split: grey-level rows -> :class:`Batch` (x and optional context).
    :param batch_size: rows per batch.
    :param skip_nonfinite: ``True`` for ``model.nonfinite=skip`` (restore on a bad step).
    """

    def __init__(
        self,
        module,
        optimizer: torch.optim.Optimizer,
        data: Tensor,
        split,
        batch_size: int,
        skip_nonfinite: bool,
    ) -> None:
        if data.device.type != "cuda":
            raise ValueError("a captured step needs the training data on a CUDA device")
        self.module, self.optimizer, self.data, self.split = module, optimizer, data, split
        self.skip_nonfinite = skip_nonfinite
        device = data.device
        self.rows = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.objective = torch.zeros((), device=device)
        self.iwae_bound = torch.zeros((), device=device)
        self.step_in_group = torch.zeros((), dtype=torch.long, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.skipped = torch.zeros((), dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._backups: list[Tensor] = []

    # -- the step, as recorded -----------------------------------------------------------------
    def _parameters(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _state_tensors(self) -> list[Tensor]:
        """Parameters and every tensor of the optimizer's state, in a fixed order."""
        tensors = []
        for p in self._parameters():
            tensors.append(p.data)
            state = self.optimizer.state.get(p, {})
            tensors += [state[k] for k in sorted(state) if isinstance(state[k], Tensor)]
        return tensors

    def _body(self) -> None:
        """Gather, binarize, sample, forward, backward, check, Adam: the recorded step."""
        batch: Batch = self.split(torch.bernoulli(self.data[self.rows]))
        particles, weights = self.module.estimate(batch)
        loss = routed_loss(particles, weights, train_model=self.module.train_model)
        loss.backward()
        grads = [p.grad for p in self._parameters() if p.grad is not None]
        norms = torch.stack([loss.detach().abs(), torch.nn.utils.get_total_norm(grads)])
        ok = torch.isfinite(norms).all()
        if self.skip_nonfinite and self._backups:
            torch._foreach_copy_(self._backups, self._state_tensors())
        self.optimizer.step()
        if self.skip_nonfinite and self._backups:
            for tensor, backup in zip(self._state_tensors(), self._backups, strict=True):
                tensor.copy_(torch.where(ok, tensor, backup))
            self.skipped.add_((~ok).long())
        first = (~ok) & (self.first_bad < 0)
        self.first_bad.copy_(torch.where(first, self.step_in_group, self.first_bad))
        self.step_in_group.add_(1)
        self.objective.copy_(weights.objective.detach().mean())
        self.iwae_bound.copy_(iwae_bound(particles.log_w).mean())

    def eager_step(self, rows: Tensor) -> None:
        """The same step without a graph (warm-up, and the reference in tests)."""
        self.rows.copy_(rows)
        self.optimizer.zero_grad(set_to_none=True)
        self._body()

    # -- capture and replay --------------------------------------------------------------------
    def capture(self) -> None:
        params = self._parameters()
        saved_params = [p.detach().clone() for p in params]
        had_state = bool(self.optimizer.state)
        saved_state = {
            id(p): {k: v.clone() for k, v in self.optimizer.state[p].items()}
            for p in params
            if p in self.optimizer.state
        }
        saved_rng = torch.cuda.get_rng_state(self.data.device)
        rows = self.rows.clone()

        side = torch.cuda.Stream(self.data.device)
        side.wait_stream(torch.cuda.current_stream(self.data.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.eager_step(rows)
        torch.cuda.current_stream(self.data.device).wait_stream(side)
        # Adam's state exists now: the backups of the skip policy can be allocated.
        self._backups = [t.clone() for t in self._state_tensors()] if self.skip_nonfinite else []

        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._body()

        # Undo the warm-up, in place: the graph holds these tensors' addresses.
        with torch.no_grad():
            for p, value in zip(params, saved_params, strict=True):
                p.copy_(value)
            for p in params:
                for key, tensor in self.optimizer.state.get(p, {}).items():
                    if not isinstance(tensor, Tensor):
                        continue
                    if had_state and id(p) in saved_state:
                        tensor.copy_(saved_state[id(p)][key])
                    else:
                        tensor.zero_()  # what Adam's first step starts from
        torch.cuda.set_rng_state(saved_rng, self.data.device)
        self.skipped.zero_()
        self.first_bad.fill_(-1)

    def start_group(self) -> None:
        """Reset the per-group device flags (three tiny kernels per group)."""
        self.step_in_group.zero_()
        self.first_bad.fill_(-1)
        self.skipped.zero_()

    def replay(self, rows: Tensor) -> None:
        """One optimizer step on the batch at ``rows`` ``[B]``."""
        if self.graph is None:
            self.capture()
        self.rows.copy_(rows)
        self.graph.replay()

    def faults(self) -> tuple[int, int]:
        """``(first bad step of the group or -1, steps skipped)``: one host read per group."""
        first, skipped = torch.stack([self.first_bad, self.skipped]).tolist()
        return int(first), int(skipped)
