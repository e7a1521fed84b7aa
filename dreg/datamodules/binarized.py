"""A LightningDataModule for binarized images held as one in-memory tensor.

The step of this model is tiny (batch 32), so per-item DataLoader work would dominate. Each
split is one float tensor of grey levels in [0, 1], kept on the training device. A training
batch is one index op (:class:`~dreg.datamodules.batches.ShuffledBatches`, resumable mid-epoch
and sharded across DDP ranks); evaluation batches use a DataLoader whose dataset returns a
whole batch from one index op (``__getitems__``). Binarization happens on the device:

* training batches get a fresh Bernoulli draw every time (dynamic binarization, as in the
  original code);
* validation/test images are binarized once with a seeded generator, so every evaluation
  of a run (and of every run with the same ``binarization_seed``) sees the same bits.

Subclasses only implement :meth:`load_splits` (readers and split rules). Datasets with a
context (struct-MNIST) override :meth:`split_context`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dreg.datamodules.batches import GroupedBatches, ShuffledBatches

EVAL_STREAMS = {"val": 1, "test": 2}  # separate random streams of the fixed binarization


class _Splits(dict):
    """Splits by name (a dict that can be weakly referenced)."""


# Loaded splits, shared by the datamodules of one process that have the same settings (the
# jobs of a pack, dreg.pack): the grey levels are never written to (binarization makes new
# tensors), so one copy per device serves every job. Freed with the last datamodule holding it.
_SHARED_SPLITS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


@dataclass
class Batch:
    """A binarized batch: the modelled pixels x ``[B, Dx]`` and an optional context ``[B, C]``."""

    x: Tensor
    context: Tensor | None = None


class BatchGroup:
    """The training batches of one call that performs ``len(group)`` optimizer steps.

    Holds row indices, not pixels: :mod:`dreg.step` gathers batch ``i`` from the on-device
    split and binarizes it with the job's own generator when step ``i`` runs, so the random
    draws come in the order of one batch per call (binarize, sample, binarize, sample, ...),
    and a captured CUDA step can do the gather itself from the same indices.

    :ivar rows: ``[n, B]`` row indices into ``data``.
    :ivar data: ``[N, D]`` grey levels of the training split, on the training device.
    :ivar first_batch: position of batch 0 in its epoch (for messages naming a batch).
    """

    def __init__(
        self,
        rows: Tensor,
        data: Tensor,
        first_batch: int,
        split: Callable[[Tensor], Batch],
        source: ShuffledBatches,
    ) -> None:
        self.rows, self.data, self.first_batch = rows, data, first_batch
        self.split, self.source = split, source

    def __len__(self) -> int:
        return self.rows.shape[0]

    def return_unused(self, batches: int) -> None:
        """The last ``batches`` were not trained on (a stop signal or max_steps cut in)."""
        self.source.return_unused(batches)


class TensorRows(Dataset):
    """Rows of one tensor; ``__getitems__`` lets the DataLoader fetch a batch in one index op."""

    def __init__(self, data: Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.data[index]

    def __getitems__(self, indices: list[int]) -> Tensor:
        return self.data[torch.as_tensor(indices, device=self.data.device)]


def _stack(batch: Tensor) -> Tensor:
    return batch  # __getitems__ already returns the stacked batch


class BinarizedDataModule(pl.LightningDataModule):
    """Base class: in-memory grey-level splits, dynamic train / fixed eval binarization.

    :param data_dir: folder that holds the dataset files (``paths.data_dir``).
    :param batch_size: training batch size (32 in the paper).
    :param eval_batch_size: batch size for validation and test.
    :param binarization_seed: seed of the fixed validation/test binarization.
    :param train_subset: use only the first N training images (quick experiments, tests).
    :param eval_subset: use only the first N validation and test images.
    :param num_workers: DataLoader workers (0: batches are cheap index ops in this process).
    :param data_on_device: keep the splits on the training device (GPU memory: ~200 MB for
        MNIST) so batches never cross the host-device boundary.
    """

    def __init__(
        self,
        data_dir: str | Path,
        batch_size: int = 32,
        eval_batch_size: int = 100,
        binarization_seed: int = 0,
        train_subset: int | None = None,
        eval_subset: int | None = None,
        num_workers: int = 0,
        data_on_device: bool = True,
    ) -> None:
        super().__init__()
        if batch_size <= 0 or eval_batch_size <= 0:
            raise ValueError(f"batch sizes must be positive, got {batch_size}, {eval_batch_size}")
        self.data_dir = Path(data_dir)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.binarization_seed = binarization_seed
        self.train_subset, self.eval_subset = train_subset, eval_subset
        self.num_workers, self.data_on_device = num_workers, data_on_device
        self.splits: dict[str, Tensor] = {}
        self.train_batches: ShuffledBatches | None = None
        # Set by the LightningModule (model.steps_per_call) before the train loader is built.
        self.steps_per_call, self.group_boundaries = 1, ()

    def group_batches(self, steps_per_call: int, boundaries: tuple[int, ...]) -> None:
        """Serve training batches as :class:`BatchGroup` of up to ``steps_per_call`` batches,
        cut at every multiple of each of ``boundaries`` batches (see GroupedBatches)."""
        self.steps_per_call, self.group_boundaries = steps_per_call, tuple(boundaries)

    # -- to implement ------------------------------------------------------------------------
    def load_splits(self) -> dict[str, Tensor]:
        """``{"train", "val", "test"}`` -> float32 ``[N, D]`` grey levels in [0, 1]."""
        raise NotImplementedError

    def split_context(self, images: Tensor) -> Batch:
        """Split full binarized rows into (x, context); unconditional datasets have none."""
        return Batch(x=images)

    # -- Lightning hooks ---------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self._load()
        if self.trainer is not None and self.data_on_device:
            # Whole splits on the training device: a batch is then one on-device index op.
            device = self.trainer.strategy.root_device
            key = (self._settings(), str(device))
            on_device = _SHARED_SPLITS.get(key)
            if on_device is None:
                on_device = _Splits({name: d.to(device) for name, d in self.splits.items()})
                _SHARED_SPLITS[key] = on_device
            self._held, self.splits = on_device, dict(on_device)

    def _settings(self) -> tuple:
        """Everything that can change what is loaded: the class and its plain settings."""
        plain = (bool, int, float, str, Path, type(None))
        return (type(self).__qualname__,) + tuple(
            sorted((k, str(v)) for k, v in vars(self).items() if isinstance(v, plain))
        )

    def _load(self) -> None:
        key = self._settings()
        shared = _SHARED_SPLITS.get(key)
        if shared is None:
            shared = _SHARED_SPLITS[key] = _Splits(self._read_splits())
        self._held, self.splits = shared, dict(shared)  # _held keeps the shared copy alive

    def _read_splits(self) -> dict[str, Tensor]:
        splits = self.load_splits()
        limits = {"train": self.train_subset, "val": self.eval_subset, "test": self.eval_subset}
        loaded = {}
        for name, data in splits.items():
            if name != "train":
                # Fixed, seeded bits for comparable evaluations: one stream per split, drawn
                # for the whole split before any subset, so image i gets the same bits whatever
                # eval_subset is and whichever split is loaded.
                stream = np.random.SeedSequence([self.binarization_seed, EVAL_STREAMS[name]])
                generator = torch.Generator().manual_seed(int(stream.generate_state(1)[0]))
                data = torch.bernoulli(data, generator=generator)
            if limits[name] is not None:
                data = data[: limits[name]].clone()  # not a view: the whole split is freed
            loaded[name] = data.contiguous()
        return loaded

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(
            TensorRows(self.splits[split]),
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=_stack,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> ShuffledBatches | GroupedBatches:
        rank, world = (
            (0, 1) if self.trainer is None else (self.trainer.global_rank, self.trainer.world_size)
        )
        # The global seed (seed_everything) fixes the permutation of every epoch.
        self.train_batches = ShuffledBatches(
            self.splits["train"], self.batch_size, torch.initial_seed(), rank, world
        )
        return GroupedBatches(self.train_batches, self.steps_per_call, self.group_boundaries)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def on_after_batch_transfer(self, batch: Tensor, dataloader_idx: int) -> Batch | BatchGroup:
        if self.trainer is not None and self.trainer.training:
            # Row indices of the next steps' batches: gathered and binarized by the step.
            first = self.train_batches.consumed
            self.train_batches.mark_consumed(batch.shape[0])
            return BatchGroup(
                batch, self.splits["train"], first, self.split_context, self.train_batches
            )
        return self.split_context(batch)

    # -- what the model needs to know about the data -----------------------------------------
    def model_kwargs(self) -> dict[str, Any]:
        """Dimensions and training statistics for :class:`dreg.model.VAE`."""
        if not self.splits:
            self._load()
        train = self.splits["train"]
        example = self.split_context(train[:1])
        means = self.split_context(train.mean(0, keepdim=True))
        kwargs: dict[str, Any] = {"data_dim": example.x.shape[1], "train_mean": means.x[0]}
        if example.context is not None:
            kwargs.update(context_dim=example.context.shape[1], context_mean=means.context[0])
        return kwargs
