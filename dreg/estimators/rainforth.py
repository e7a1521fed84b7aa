"""MIWAE, CIWAE and PIWAE (Rainforth et al. 2018), and the DReG forms of MIWAE and PIWAE.

Rainforth et al. show that the inference network's gradient of the IWAE bound loses its
signal-to-noise ratio as K grows, while the model's gains it, and propose three objectives
that spend K = M * K' samples differently. Notation: the K samples are split into M groups of
K' consecutive samples (log-weights ``[K, B] -> [M, K', B]``; group m holds samples
m K' .. (m+1) K' - 1), w~_{m,k} = w_{m,k} / sum_j w_{m,j} is normalized within its group and
W~_k = w_k / sum_j w_j over all K::

    MIWAE(M, K') = 1/M sum_m log 1/K' sum_k w_{m,k}       (M = 1: IWAE_K; K' = 1: ELBO)
    CIWAE(beta)  = beta * ELBO_K + (1 - beta) * IWAE_K      ELBO_K = 1/K sum_k log w_k
    PIWAE(M, K') : model network on IWAE_K, inference network on MIWAE(M, K')

Each is a function of the log-weights, so its gradient is sum_k c_k d log w_k with
c_{m,k} = w~_{m,k} / M (MIWAE) or beta / K + (1 - beta) W~_k (CIWAE) on all three paths.
Each group's term of MIWAE is an IWAE bound on K' samples, so the DReG identity (Tucker et al.
2019, eq. 5) applies group by group: replace w~_{m,k} by w~_{m,k}^2 on the stopped path and
drop the score term (``dreg_miwae``, and ``dreg_piwae`` for PIWAE's inference gradient).

``groups`` (M) must divide K: every forward and the config check refuse other K with one line
naming ``estimator.groups`` and ``model.num_samples``.

References:
    Rainforth, Kosiorek, Le, Maddison, Igl, Wood & Teh (2018), Tighter Variational Bounds
    are Not Necessarily Better, ICML (section 4: MIWAE, CIWAE, PIWAE).
    Tucker, Lawson, Gu & Maddison (2019), Doubly Reparameterized Gradient Estimators for
    Monte Carlo Objectives, ICLR (eq. 5).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dreg.estimators.base import Estimator, GradientWeights
from dreg.estimators.ops import iwae_bound, logmeanexp, safe_softmax


def check_groups(name: str, groups: int, num_samples: int) -> None:
    """The one rule for M: K must be a positive multiple of it (one-line ``ValueError``)."""
    if num_samples % groups != 0:
        raise ValueError(
            f"estimator '{name}' splits the K samples into estimator.groups={groups} equal "
            f"groups, but model.num_samples={num_samples} is not a multiple of {groups}; set "
            f"model.num_samples to a multiple of {groups} or estimator.groups to a divisor "
            f"of {num_samples}"
        )


def split_groups(log_w: Tensor, groups: int) -> Tensor:
    """``[K, B] -> [M, K', B]``: group m holds samples m K' .. (m+1) K' - 1 (a view)."""
    return log_w.reshape(groups, log_w.shape[0] // groups, log_w.shape[1])


def group_weights(log_w: Tensor, groups: int) -> Tensor:
    """``[K, B]``: w~_{m,k}, each sample's weight normalized within its group (0, not NaN, for
    a group whose weights are all zero)."""
    return safe_softmax(split_groups(log_w, groups), dim=1).reshape(log_w.shape)  # [K, B]


def miwae_bound(log_w: Tensor, groups: int) -> Tensor:
    """``[K, B] -> [B]``: 1/M sum_m log 1/K' sum_k w_{m,k}; -inf when a group's weights are
    all zero (its true value)."""
    return logmeanexp(split_groups(log_w, groups), dim=1).mean(0)  # [M, B] -> [B]


def check_beta(beta: float) -> None:
    """The one rule for CIWAE's mixing weight."""
    if not (isinstance(beta, int | float) and not isinstance(beta, bool) and 0 <= beta <= 1):
        raise ValueError(f"beta={beta}: ciwae needs estimator.beta in [0, 1] (0.5 by default)")


class GroupedEstimator(Estimator):
    """Shared by the estimators with M groups of K' = K / M samples (not itself an estimator:
    it has no ``name`` of its own, so it has no config name).

    :param groups: M, the number of groups; K must be a multiple of it.
    """

    def __init__(self, groups: int = 8) -> None:
        super().__init__()
        if not (isinstance(groups, int) and not isinstance(groups, bool) and groups >= 1):
            raise ValueError(
                f"estimator.groups={groups}: {self.name} needs an integer >= 1 (8 by default)"
            )
        self.groups = groups
        self.min_samples = groups  # the smallest K it accepts (K = M, K' = 1)

    def validate_num_samples(self, num_samples: int) -> None:
        check_groups(self.name, self.groups, num_samples)
        super().validate_num_samples(num_samples)

    def reference_params(self) -> dict[str, Any]:
        return {"groups": self.groups}  # compared against its base with the same M

    def scaled_group_weights(self, log_w: Tensor, power: int = 1) -> Tensor:
        """``[K, B]``: w~_{m,k}^power / M, the gradient coefficients of MIWAE (power 1) and
        the DReG path coefficients of its inference gradient (power 2)."""
        return group_weights(log_w, self.groups).pow(power) / self.groups

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, groups={self.groups}"


class MIWAE(GroupedEstimator):
    """Multiply importance weighted bound, fully reparameterized for both networks.

    MIWAE(M, K') = 1/M sum_m log 1/K' sum_k w_{m,k} (Rainforth et al. 2018, eq. 8);
    m = a = s = w~_{m,k} / M. M = 1 is IWAE_K, K' = 1 is the ELBO.
    """

    name = "miwae"
    family = "miwae"

    def weights(self, log_w: Tensor, norm_w: Tensor) -> GradientWeights:
        coef = self.scaled_group_weights(log_w)  # [K, B]
        return GradientWeights(
            objective=miwae_bound(log_w, self.groups), model=coef, path=coef, score=coef
        )


class PIWAE(GroupedEstimator):
    """Partially importance weighted: IWAE_K for the model network, MIWAE(M, K') for the
    inference network, on the same K samples (Rainforth et al. 2018, section 4).

    Model: m = W~_k. Inference: a = s = w~_{m,k} / M. The reported objective is IWAE_K, the
    bound the model maximizes (the inference network's MIWAE is never larger).
    """

    name = "piwae"
    objective_is_iwae_bound = True
    family = "piwae"

    def weights(self, log_w: Tensor, norm_w: Tensor) -> GradientWeights:
        coef = self.scaled_group_weights(log_w)  # [K, B]
        return GradientWeights(objective=iwae_bound(log_w), model=norm_w, path=coef, score=coef)


class DReGMIWAE(GroupedEstimator):
    """MIWAE with the doubly reparameterized inference gradient, group by group.

    Model: m = w~_{m,k} / M (MIWAE's). Inference: a = w~_{m,k}^2 / M, s = 0: DReG-IWAE
    (Tucker et al. 2019, eq. 5) within each group, averaged over the M groups. Unbiased for
    :class:`MIWAE` with the same M; objective MIWAE(M, K').
    """

    name = "dreg_miwae"
    family = "miwae"
    needs_independent_samples = True
    uses_score = False

    def weights(self, log_w: Tensor, norm_w: Tensor) -> GradientWeights:
        return GradientWeights(
            objective=miwae_bound(log_w, self.groups),
            model=self.scaled_group_weights(log_w),
            path=self.scaled_group_weights(log_w, power=2),
            score=torch.zeros_like(log_w),
        )


class DReGPIWAE(GroupedEstimator):
    """PIWAE with the doubly reparameterized MIWAE inference gradient.

    Model: m = W~_k (IWAE_K's). Inference: a = w~_{m,k}^2 / M, s = 0 (as :class:`DReGMIWAE`).
    Unbiased for :class:`PIWAE` with the same M; objective IWAE_K.
    """

    name = "dreg_piwae"
    family = "piwae"
    needs_independent_samples = True
    uses_score = False
    objective_is_iwae_bound = True

    def weights(self, log_w: Tensor, norm_w: Tensor) -> GradientWeights:
        return GradientWeights(
            objective=iwae_bound(log_w),
            model=norm_w,
            path=self.scaled_group_weights(log_w, power=2),
            score=torch.zeros_like(log_w),
        )


class CIWAE(Estimator):
    """Combination importance weighted bound, fully reparameterized for both networks.

    CIWAE(beta) = beta * ELBO_K + (1 - beta) * IWAE_K on the same K samples (Rainforth et al.
    2018, eq. 9); m = a = s = beta / K + (1 - beta) W~_k. beta = 1 is the ELBO (``vae``),
    beta = 0 is IWAE. A -inf log-weight makes the ELBO part, and so the objective, -inf (its
    true value) for beta > 0.

    :param beta: weight of the ELBO, in [0, 1] (0.5 by default).
    """

    name = "ciwae"
    family = "ciwae"

    def __init__(self, beta: float = 0.5) -> None:
        super().__init__()
        check_beta(beta)
        self.beta = float(beta)

    def weights(self, log_w: Tensor, norm_w: Tensor) -> GradientWeights:
        coef = self.beta / log_w.shape[0] + (1 - self.beta) * norm_w  # [K, B]
        elbo = log_w.mean(0) if self.beta > 0 else torch.zeros_like(log_w[0])  # [B]
        objective = self.beta * elbo + (1 - self.beta) * iwae_bound(log_w)
        return GradientWeights(objective=objective, model=coef, path=coef, score=coef)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}"
