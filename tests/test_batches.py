"""ShuffledBatches: per-epoch permutations, disjoint DDP shards, exact mid-epoch resume."""

from __future__ import annotations

import pytest
import torch

from dreg.datamodules.batches import ShuffledBatches

DATA = torch.arange(103, dtype=torch.float32).unsqueeze(1)  # [N, 1]: row i holds i


def rows(batches) -> list[int]:
    return [int(v) for batch in batches for v in batch[:, 0]]


def consume(loader: ShuffledBatches) -> list[int]:
    """Iterate as Lightning does: mark each batch consumed, stop after len() batches."""
    out = []
    for _, batch in zip(range(len(loader)), loader, strict=False):
        loader.mark_consumed()
        out += [int(v) for v in batch[:, 0]]
    return out


def test_an_epoch_is_a_permutation_and_epochs_differ():
    loader = ShuffledBatches(DATA, batch_size=10, seed=3)
    first, second = consume(loader), consume(loader)
    assert len(loader) == 10 and len(first) == 100 == len(set(first))  # last 3 rows dropped
    assert first != second and loader.epoch == 1  # no empty epoch in between
    assert consume(ShuffledBatches(DATA, 10, seed=3)) == first  # depends on (seed, epoch) only


def test_ranks_get_disjoint_equal_shards():
    shards = [rows(ShuffledBatches(DATA, 5, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 50
    assert not set(shards[0]) & set(shards[1])


def test_resume_mid_epoch_continues_with_the_same_batches():
    reference = ShuffledBatches(DATA, 10, seed=0)
    full = [b.clone() for b in reference]
    interrupted = ShuffledBatches(DATA, 10, seed=0)
    seen = []
    for batch in interrupted:
        seen.append(batch.clone())
        interrupted.mark_consumed()
        if len(seen) == 4:
            break
    resumed = ShuffledBatches(DATA, 10, seed=123)  # the state carries the seed
    resumed.load_state_dict(interrupted.state_dict())
    rest = list(resumed)
    assert all(torch.equal(a, b) for a, b in zip(seen + rest, full, strict=True))


def test_resuming_with_another_world_size_is_refused():
    state = ShuffledBatches(DATA, 10, seed=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="same trainer.devices"):
        ShuffledBatches(DATA, 10, seed=0).load_state_dict(state)
