"""Resumable, DDP-sharded shuffled batches of an in-memory tensor.

Replaces a DataLoader for training: a batch is one index op on a tensor that already lives on
the training device. Its state (epoch, batches consumed) goes into Lightning checkpoints
(Lightning saves any train loader with ``state_dict``/``load_state_dict``), so a run resumed
in the middle of an epoch continues with exactly the batches the uninterrupted run would
have seen. The shuffling permutation depends only on (seed, epoch), never on global RNG state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor


class ShuffledBatches:
    """Iterate ``data`` ``[N, D]`` in shuffled batches of ``batch_size`` (last partial dropped).

    :param seed: base seed of the per-epoch permutation.
    :param rank: this process's rank; each rank takes a disjoint shard of every permutation.
    :param world_size: number of processes.
    """

    def __init__(
        self, data: Tensor, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.consumed = 0, 0  # consumed: batches of this epoch already trained on

    def __len__(self) -> int:
        return (self.data.shape[0] // self.world_size) // self.batch_size

    def permutation(self, epoch: int) -> Tensor:
        """This rank's shard of the epoch's permutation, ``[len(self) * batch_size]``."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.data.shape[0], generator=generator)
        shard = order[self.rank :: self.world_size][: len(self) * self.batch_size]
        return shard.to(self.data.device)

    def __iter__(self) -> Iterator[Tensor]:
        if self.consumed >= len(self):
            # The last epoch was fully trained on. Lightning stops after len(self) batches
            # without exhausting the iterator, so the epoch advances here, not at StopIteration.
            self.epoch, self.consumed = self.epoch + 1, 0
        order = self.permutation(self.epoch)
        for i in range(self.consumed, len(self)):
            yield self.data[order[i * self.batch_size : (i + 1) * self.batch_size]]

    def mark_consumed(self) -> None:
        """Called when the trainer takes a batch (the fetcher reads one batch ahead)."""
        self.consumed += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("world_size", 1) != self.world_size:
            raise ValueError(
                f"checkpoint was written with {state['world_size']} processes, this run has "
                f"{self.world_size}: resume with the same trainer.devices to continue exactly"
            )
        self.epoch, self.consumed, self.seed = state["epoch"], state["consumed"], state["seed"]
