"""Numerically stable log-space helpers shared by the estimators (pure tensor functions).

Every function takes detached log-weights ``log_w`` of shape ``[K, B]`` (K samples along
dim 0) and stays finite when entries are ``-inf`` or spread over thousands of nats, as long as
at least one entry per column is finite (the cases where the quantity itself is finite).

Leave-one-out sums (jackknife, VIMCO baseline) use exclusive prefix and suffix log-sum-exps:
O(K) time and memory per data point instead of the O(K^2) tiling of the original code.
"""

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


def safe_softmax(logits: Tensor, dim: int = 0) -> Tensor:
    """softmax along ``dim``, but all zeros (not NaN) where every logit is -inf."""
    any_finite = (logits > -math.inf).any(dim=dim, keepdim=True)
    probs = torch.softmax(torch.where(any_finite, logits, torch.zeros_like(logits)), dim=dim)
    return torch.where(any_finite, probs, torch.zeros_like(probs))


def leave_one_out_logsumexp(log_w: Tensor) -> Tensor:
    """``[K, B] -> [K, B]``: entry k is log sum_{j != k} exp(log_w_j), in O(K).

    The exclusive prefix (samples before k) and suffix (samples after k) log-sum-exps come from
    one cumulative pass each way; subtracting w_k from the full sum instead would cancel
    catastrophically when w_k dominates. ``-inf`` where every other entry is ``-inf`` (K = 1).
    """
    neg_inf = torch.full_like(log_w[:1], -math.inf)  # [1, B]
    prefix = torch.cat([neg_inf, torch.logcumsumexp(log_w, dim=0)[:-1]])  # [K, B]: j < k
    suffix = torch.logcumsumexp(log_w.flip(0), dim=0).flip(0)  # [K, B]: j >= k
    suffix = torch.cat([suffix[1:], neg_inf])  # [K, B]: j > k
    return torch.logaddexp(prefix, suffix)


def log_one_minus_normalized(log_w: Tensor) -> Tensor:
    """log(1 - w~_k) = log sum_{j != k} w_j - log sum_j w_j, accurate even when w~_k -> 1."""
    return leave_one_out_logsumexp(log_w) - torch.logsumexp(log_w, dim=0, keepdim=True)


def shift_to_max(log_w: Tensor) -> Tensor:
    """log_w - max_k log_w (per column): ratios of weights are unchanged, magnitudes <= 0."""
    top = log_w.max(dim=0, keepdim=True).values  # [1, B]
    return log_w - torch.where(torch.isfinite(top), top, torch.zeros_like(top))
