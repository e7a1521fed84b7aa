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
        # Modulo 2**63: an unseeded process's torch.initial_seed() takes all 64 bits.
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
        order = torch.randperm(self.data.shape[0], generator=generator)
        shard = order[self.rank :: self.world_size][: len(self) * self.batch_size]
        return shard.to(self.data.device)

    def start_epoch(self) -> Tensor:
        """The order of the epoch that iteration continues, ``[len(self), batch_size]`` indices."""
        if self.consumed >= len(self):
            # The last epoch was fully trained on. Lightning stops after len(self) batches
            # without exhausting the iterator, so the epoch advances here, not at StopIteration.
            self.epoch, self.consumed = self.epoch + 1, 0
        return self.permutation(self.epoch).reshape(len(self), self.batch_size)

    def __iter__(self) -> Iterator[Tensor]:
        order = self.start_epoch()
        for i in range(self.consumed, len(self)):
            yield self.data[order[i]]

    def mark_consumed(self, batches: int = 1) -> None:
        """Called when the trainer takes a batch (the fetcher reads one batch ahead)."""
        self.consumed += batches

    def return_unused(self, batches: int) -> None:
        """Give back taken batches that were not trained on (a group cut short by a stop)."""
        self.consumed -= batches

    @property
    def total_consumed(self) -> int:
        """Batches taken since the start of the run, across epochs (every epoch is as long)."""
        return self.epoch * len(self) + self.consumed

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


class GroupedBatches:
    """The batches of a :class:`ShuffledBatches`, in its order, as groups of index rows.

    Each item is ``[n, batch_size]`` row indices into ``batches.data``: the next ``n``
    batches of the epoch, for one training call that performs ``n`` optimizer steps. A group
    ends after ``group_size`` batches, at the end of the epoch (so the trainer's epochs are the
    data's epochs), and after every multiple of each of ``boundaries`` batches counted from the
    start of the run (validation, logging and the last step happen between calls, at the same
    step as in a run of one batch per call). Gathering and binarization are left to the
    training step. The state (position in the epoch) is the wrapped iterator's.
    """

    def __init__(
        self, batches: ShuffledBatches, group_size: int, boundaries: tuple[int, ...] = ()
    ) -> None:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.batches, self.group_size = batches, group_size
        self.boundaries = tuple(b for b in boundaries if b > 0)

    def __len__(self) -> int:
        # An upper bound: the boundaries can cut more groups than this. The trainer ends the
        # epoch when the iterator is exhausted, so only the progress bar's total is affected.
        return len(self.batches)

    def group_length(self, epoch_position: int, total: int) -> int:
        """Batches in the group that starts at ``epoch_position`` (``total`` from the start)."""
        n = min(self.group_size, len(self.batches) - epoch_position)
        for boundary in self.boundaries:
            n = min(n, boundary - total % boundary)
        return n

    def __iter__(self) -> Iterator[Tensor]:
        order = self.batches.start_epoch()
        position, epoch_start = self.batches.consumed, self.batches.epoch * len(self.batches)
        while position < len(self.batches):
            n = self.group_length(position, epoch_start + position)
            yield order[position : position + n]
            position += n

    def state_dict(self) -> dict[str, Any]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state)
