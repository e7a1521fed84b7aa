"""Numerically stable log-space helpers shared by the estimators (pure tensor functions)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def logmeanexp(log_w: Tensor, dim: int = 0) -> Tensor:
    """log (1/K sum_k exp(log_w_k)) along ``dim``; finite if any entry is finite."""
    return torch.logsumexp(log_w, dim=dim) - math.log(log_w.shape[dim])


def normalized_weights(log_w: Tensor, dim: int = 0) -> Tensor:
    """w~_k = softmax_k(log w); exact zeros for -inf entries, never NaN if one entry is finite."""
    return torch.softmax(log_w, dim=dim)


def iwae_bound(log_w: Tensor) -> Tensor:
    """The K-sample importance-weighted bound log (1/K sum_k w_k): ``[K, B] -> [B]``."""
    return logmeanexp(log_w, dim=0)
