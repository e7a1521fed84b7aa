"""Jackknife variational inference (JVI) and its doubly reparameterized form.

The jackknife bound removes the leading O(1/K) bias of the IWAE bound::

    L_JK = K * L_K - (K - 1) * 1/K sum_k L_{K-1}^(-k),
    L_{K-1}^(-k) = log (1/(K-1) sum_{j != k} w_j)          (leave sample k out)

It is a function of the log-weights, so its gradient is sum_j c_j d log w_j with
c_j = dL_JK / d log w_j = K w~_j - (K-1)/K sum_{k != j} w~_j^(-k), where
w~_j^(-k) = w_j / sum_{i != k} w_i. Each L_{K-1}^(-k) is an IWAE bound on K-1 samples, so the
DReG identity applies term by term: replace w~ by w~^2 on the stopped path and drop the score.

The leave-one-out sums are O(K): sum_{k != j} (w_j / S_{-k})^p
= exp(p log w_j + log sum_{k != j} exp(-p log S_{-k})), a second leave-one-out log-sum-exp
over the vector -p log S_{-k}. The original code tiled a [B, K, K] tensor.

References:
    Nowozin (2018), Debiasing Evidence Approximations: On Importance-weighted Autoencoders
    and Jackknife Variational Inference, ICLR.
    Tucker, Lawson, Gu & Maddison (2019), Doubly Reparameterized Gradient Estimators for
    Monte Carlo Objectives, ICLR (section 6, JVI).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dreg.estimators.base import Estimator, GradientWeights
from dreg.estimators.ops import iwae_bound, leave_one_out_logsumexp, shift_to_max


def jackknife_bound(log_w: Tensor) -> Tensor:
    """``[K, B] -> [B]``: K L_K - (K-1) mean_k L_{K-1}^(-k), in O(K). Needs K >= 2."""
    k = log_w.shape[0]
    loo_bounds = leave_one_out_logsumexp(log_w) - math.log(k - 1)  # [K, B]: L_{K-1}^(-k)
    return k * iwae_bound(log_w) - (k - 1) * loo_bounds.mean(0)


def leave_one_out_weight_powers(log_w: Tensor, power: int) -> Tensor:
    """``[K, B]``: entry j is sum_{k != j} (w~_j^(-k))^power, with w~_j^(-k) = w_j / S_{-k}."""
    log_w = shift_to_max(log_w)  # [K, B], <= 0: ratios unchanged, no overflow
    log_loo = leave_one_out_logsumexp(log_w)  # [K, B]: log S_{-k}
    log_sum = leave_one_out_logsumexp(-power * log_loo)  # [K, B]: log sum_{k != j} S_{-k}^-p
    powers = (power * log_w + log_sum).exp()
    # A -inf weight contributes exactly 0 (avoids -inf + inf when another S_{-k} is 0).
    return torch.where(log_w > -math.inf, powers, torch.zeros_like(powers))


def jackknife_weights(log_w: Tensor, power: int = 1) -> Tensor:
    """``[K, B]``: K w~_j^p - (K-1)/K sum_{k != j} (w~_j^(-k))^p.

    ``power=1``: the exact gradient coefficients dL_JK / d log w_j. ``power=2``: the DReG
    path coefficients of the jackknife inference gradient.
    """
    k = log_w.shape[0]
    norm_w_pow = torch.softmax(log_w, dim=0).pow(power)  # [K, B]
    return k * norm_w_pow - (k - 1) / k * leave_one_out_weight_powers(log_w, power)


class JVI(Estimator):
    """Jackknife bound, fully reparameterized gradient for both parameter groups.

    Model and inference: c_j = K w~_j - (K-1)/K sum_{k != j} w~_j^(-k) on all three paths
    (m = a = s = c). The objective is the jackknife bound itself (not guaranteed to be a lower
    bound). Needs K >= 2.
    """

    name = "jvi"
    family = "jvi"
    min_samples = 2

    def weights(self, log_w: Tensor, norm_w: Tensor) -> GradientWeights:
        coef = jackknife_weights(log_w, power=1)  # [K, B]
        return GradientWeights(objective=jackknife_bound(log_w), model=coef, path=coef, score=coef)


class DReGJVI(Estimator):
    """Jackknife bound with the doubly reparameterized inference gradient ("jk-dreg").

    Model: c_j of :class:`JVI` (the jackknife bound's exact gradient).
    Inference: sum_j [K w~_j^2 - (K-1)/K sum_{k != j} (w~_j^(-k))^2] d(stopped log w_j),
    s = 0: the DReG-IWAE form of each of the K + 1 IWAE terms. Unbiased for :class:`JVI`.
    Needs K >= 2.
    """

    name = "dreg_jvi"
    family = "jvi"
    needs_independent_samples = True
    min_samples = 2
    uses_score = False

    def weights(self, log_w: Tensor, norm_w: Tensor) -> GradientWeights:
        return GradientWeights(
            objective=jackknife_bound(log_w),
            model=jackknife_weights(log_w, power=1),
            path=jackknife_weights(log_w, power=2),
            score=torch.zeros_like(log_w),
        )
