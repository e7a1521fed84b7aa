"""The whole training step recorded once as a CUDA graph and replayed (``model.cuda_graph``).

One step of the paper's model (batch 32, K 64) is about 100 small kernels, so on a GPU it is
bound by kernel launches, not arithmetic. Recorded as one CUDA graph it is a single launch:
batch gather from the on-device split, dynamic binarization, latent noise, forward, the
routed backward, the non-finite check (a device flag) and Adam with ``capturable=True``.

The recorded body is :meth:`dreg.step.Replicas.step`, the one training step, for M >= 1
replicas (a run alone, or every replica of a pack's cohort).

Why replay is correct:

* **Random numbers.** Each replica draws from its own CUDA ``torch.Generator``; each is
  registered with the graph (``register_generator_state``), so every replay reads the
  generator's current Philox offset and advances it by the graph's total: fresh Bernoulli
  bits and fresh eps at every replay, in the order eager steps would draw them.
* **The routing hook.** :func:`~dreg.estimators.routed_loss` registers a gradient hook on z
  during the forward. The hook is Python, so it runs once, during capture, and its
  multiplication by the per-sample ratio is recorded as a kernel of the graph's backward;
  replays recompute the ratio in the same static buffer.
* **Static memory.** The batch's row indices are copied into a static buffer before each
  replay; every intermediate lives in the graph's private memory pool. Gradients are set to
  ``None`` before capture so the captured backward allocates them there and overwrites them
  on every replay.
* **Warm-up without side effects.** Capture needs a few eager iterations first (on a side
  stream, as the PyTorch docs prescribe); they update the parameters and draw noise, so the
  parameters, optimizer state and generator states are restored afterwards, in place (the
  graph holds their addresses).
* **Non-finite steps.** The step's own device flags (:class:`~dreg.step.Replicas`): a bad
  update is undone inside the graph, under ``raise`` the replica stops updating, and the host
  reads the flags once per run of steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dreg.step import Replicas, Split

WARMUP_STEPS = 3  # eager iterations before capture (lazy state, cuBLAS handles, allocator)


class CapturedStep:
    """One optimizer step of every replica of ``replicas``, captured on first use.

    :param replicas: the step (its optimizer built with ``capturable=True``).
    :param data: ``[N, D]`` grey levels of the training split, on the GPU.
    :param split: binarized rows -> ``(x, context)``.
    :param batch_size: rows per batch.
    """

    def __init__(self, replicas: Replicas, data: Tensor, split: Split, batch_size: int) -> None:
        if data.device.type != "cuda":
            raise ValueError("a captured step needs the training data on a CUDA device")
        self.replicas, self.data, self.split = replicas, data, split
        self.rows = torch.zeros(replicas.size, batch_size, dtype=torch.long, device=data.device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def _body(self) -> None:
        self.replicas.step(self.data[self.rows], self.split, Tensor.backward)

    def eager_step(self, rows: Tensor) -> None:
        """The same step without a graph (warm-up, and the reference in tests)."""
        self.rows.copy_(rows)
        self._body()

    def capture(self) -> None:
        replicas, device = self.replicas, self.data.device
        optimizer = replicas.optimizer
        # Everything the warm-up changes: parameters and every optimizer state tensor (Adam's
        # step count included, which _state_tensors leaves out).
        tensors = {id(t): t for t, _ in replicas._state_tensors()}
        for state in optimizer.state.values():
            tensors.update({id(v): v for v in state.values() if isinstance(v, Tensor)})
        tensors = list(tensors.values())
        saved = [t.detach().clone() for t in tensors]
        known = {id(t) for t in tensors}  # alive in ``tensors``: no id is reused meanwhile
        generators = [spec.generator for spec in replicas.specs]
        saved_generators = [g.get_state() for g in generators]
        rows = self.rows.clone()

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.eager_step(rows)
        torch.cuda.current_stream(device).wait_stream(side)

        optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        for generator in generators:
            self.graph.register_generator_state(generator)
        with torch.cuda.graph(self.graph):
            self._body()

        # Undo the warm-up, in place: the graph holds these tensors' addresses.
        with torch.no_grad():
            for tensor, value in zip(tensors, saved, strict=True):
                tensor.copy_(value)
            # State the warm-up created (all of it on a fresh optimizer, or that of parameters
            # without state yet): zeros, what the optimizer's first step starts from.
            for state in optimizer.state.values():
                for value in state.values():
                    if isinstance(value, Tensor) and id(value) not in known:
                        value.zero_()
        for generator, state in zip(generators, saved_generators, strict=True):
            generator.set_state(state)
        replicas.start_run()

    def replay(self, rows: Tensor) -> None:
        """One optimizer step of every replica on the batches at ``rows`` ``[M, B]``."""
        if self.graph is None:
            self.capture()
        self.rows.copy_(rows)
        self.graph.replay()
