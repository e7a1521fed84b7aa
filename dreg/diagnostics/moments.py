"""Per-coordinate moments of a gradient estimator and the variance / SNR read off them.

For a flattened gradient g in R^D with per-coordinate first and second moments m1, m2::

    variance  = mean_j (m2_j - m1_j^2)                    (mean over the D coordinates)
    SNR       = mean_j m1_j^2 / mean_j (m2_j - m1_j^2)     (issue 5; a ratio of *squared* scales)

Two ways to get the moments:

* :class:`EMAMoments` follows a *moving* target along a training trajectory (the original
  code's ``var_calc``): exponentially weighted averages with decay d (0.99). The averages start
  at zero and are divided by ``1 - d^t`` (Adam's bias correction), so they are exactly the
  normalized weighted averages ``sum_i d^(t-i) g_i / sum_i d^(t-i)``; the variance is then a
  weighted variance and never negative.
* :class:`SampleMoments` keeps sums of N independent draws at a *fixed* parameter (the SNR vs
  K study). Sums add across processes, so under DDP an all-reduce of the sums gives exactly the
  moments of the union of all ranks' draws. The variance is the unbiased one (N - 1), and the
  mean square is made unbiased too (``mean^2 - var / N``): the plug-in ``mean^2`` is inflated
  by var / N, which would put a floor of 1/N under every SNR.

References: Tucker, Lawson, Gu & Maddison (2019), section 6 and appendix; Rainforth et al.
(2018), "Tighter variational bounds are not necessarily better" (SNR of IWAE gradients).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GradientSummary:
    """Coordinate-averaged statistics of one gradient estimator.

    :ivar variance: mean over coordinates of the per-coordinate variance.
    :ivar mean_square: mean over coordinates of the squared per-coordinate mean.
    :ivar snr: ``mean_square / variance`` (``nan`` when the variance is zero).
    """

    variance: float
    mean_square: float
    snr: float


def summarize(mean: Tensor, var: Tensor, mean_square: Tensor | None = None) -> GradientSummary:
    """:class:`GradientSummary` of per-coordinate means and variances (``[D]`` each).

    :param mean_square: per-coordinate estimate of m1^2, when it is not simply ``mean**2``.
    """
    variance = var.double().mean().item()
    mean_sq = (mean.double() ** 2 if mean_square is None else mean_square.double()).mean().item()
    snr = mean_sq / variance if variance > 0 else float("nan")
    return GradientSummary(variance=variance, mean_square=mean_sq, snr=snr)


class EMAMoments:
    """Bias-corrected exponential moving averages of g and g^2, per coordinate.

    :param decay: weight of the past, d in ``m <- d m + (1 - d) g`` (0.99 as in the original).
    """

    def __init__(self, decay: float = 0.99) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}; 0.99 is the default")
        self.decay = decay
        self.steps = 0
        self.m1: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, grad: Tensor) -> None:
        """Fold in one flattened gradient ``[D]`` (kept in float64 on its device)."""
        g = grad.detach().double()
        if self.m1 is None:
            self.m1, self.m2 = torch.zeros_like(g), torch.zeros_like(g)
        self.m1.mul_(self.decay).add_(g, alpha=1 - self.decay)
        self.m2.mul_(self.decay).add_(g * g, alpha=1 - self.decay)
        self.steps += 1

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue the averages exactly."""
        return {"decay": self.decay, "steps": self.steps, "m1": self.m1, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.steps, self.m1, self.m2 = (
            state["decay"],
            state["steps"],
            state["m1"],
            state["m2"],
        )

    def moments(self) -> tuple[Tensor, Tensor]:
        """Bias-corrected ``(mean, variance)`` per coordinate, ``[D]`` each."""
        if self.m1 is None:
            raise ValueError("EMAMoments has no gradient yet; call update() first")
        correction = 1 - self.decay**self.steps
        mean, second = self.m1 / correction, self.m2 / correction
        return mean, (second - mean**2).clamp_min(0.0)  # clamp: float round-off only

    def summary(self, index: slice | Tensor | None = None) -> GradientSummary:
        """Variance and SNR over all coordinates, or over ``index`` (one parameter tensor's
        slice, or the coordinates of one stochastic layer)."""
        mean, var = self.moments()
        if index is not None:
            mean, var = mean[index], var[index]
        return summarize(mean, var)


class SampleMoments:
    """Sums of independent gradient draws: exact (unbiased) mean and variance per coordinate.

    :param dim: D, the number of coordinates (sized up front so that a rank without draws
        still takes part in the all-reduce).
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.count = 0
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)
        self.total_sq = torch.zeros(dim, dtype=torch.float64, device=device)

    def update(self, grad: Tensor) -> None:
        """Add one flattened draw ``[D]`` (accumulated in float64)."""
        g = grad.detach().double()
        self.total += g
        self.total_sq += g * g
        self.count += 1

    def all_reduce(self, reduce_sum: Callable[[Tensor], Tensor]) -> None:
        """Replace the sums by their sum over processes (``reduce_sum``: an all-reduce)."""
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.total.device)
        self.total, self.total_sq = reduce_sum(self.total), reduce_sum(self.total_sq)
        self.count = int(round(reduce_sum(count).item()))

    def moments(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(mean, variance, mean_square)`` per coordinate: variance with N - 1, and
        ``mean_square = mean^2 - variance / N``, an unbiased estimate of m1^2."""
        if self.count < 2:
            raise ValueError(f"need at least 2 draws for a variance, got {self.count}")
        n = self.count
        mean = self.total / n
        var = ((self.total_sq - n * mean**2) / (n - 1)).clamp_min(0.0)
        return mean, var, mean**2 - var / n

    def summary(self) -> GradientSummary:
        mean, var, mean_square = self.moments()
        return summarize(mean, var, mean_square)
