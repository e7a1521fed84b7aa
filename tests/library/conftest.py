"""Library tests: float64, fixed seeds, one CPU thread (the machine's cores are shared; one
thread is faster than two contending ones for these small tensors)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
