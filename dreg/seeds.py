"""Seeds derived from integer keys, and a block run under a fixed seed.

Used wherever a random stream must be a pure function of the run's seed and an index: the
diagnostics' draws (seed, K, draw), each DDP rank's training noise (seed, rank).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

#: The key of a job's training-noise stream: derived_seed(seed, rank, NOISE_STREAM).
NOISE_STREAM = 1


def reseed_rank(rank: int) -> None:
    """Give DDP rank ``rank`` > 0 global streams of its own, derived from (seed, rank)
    (every rank was seeded alike so that every rank built the same initial model)."""
    seed = derived_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)), rank)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def derived_seed(*keys: int) -> int:
    """A well-mixed 32-bit seed from integer keys (e.g. run seed, K, draw index)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with the global RNG of ``device`` seeded, restoring it afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
