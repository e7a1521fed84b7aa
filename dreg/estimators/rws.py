"""The reweighted wake-sleep (RWS) family: wake-phase inference-network updates.

The model (decoder) is trained on the IWAE bound, whose value is the reported objective. The
wake-phi step fits q to the posterior by minimizing KL(p(z|x) || q) with self-normalized
importance sampling: it maximizes sum_k w~_k log q(stop(z_k)). Coefficient convention of
:mod:`dreg.estimators.base`: the score slot multiplies -d/dphi log q, so RWS has s_k = -w~_k.

Reparameterizing the score term once more (the DReG identity applied to
E_q[w~_k d/dphi log q(z_k)]) gives the doubly reparameterized form
sum_k (w~_k - w~_k^2) d(stopped log w_k) with the same expectation.

References:
    Bornschein & Bengio (2015), Reweighted Wake-Sleep.
    Le, Kosiorek, Siddharth, Teh & Wood (2019), Revisiting Reweighted Wake-Sleep.
    Tucker, Lawson, Gu & Maddison (2019), Doubly Reparameterized Gradient Estimators for
    Monte Carlo Objectives, ICLR (section 5, eq. 7 and DReG(alpha)).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dreg.estimators.base import Estimator, GradientWeights, iwae_model_weights
from dreg.estimators.ops import (
    leave_one_out_logsumexp,
    log_one_minus_normalized,
    safe_softmax,
)


def check_alpha(alpha: float) -> None:
    """The one rule for DReG(alpha)'s mixing weight."""
    if not (isinstance(alpha, int | float) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha={alpha}: dreg_alpha needs a number in [0, 1] (0.9 in the paper)")


def rws_dreg_weights(log_w: Tensor) -> Tensor:
    """``[K, B]`` w~_k - w~_k^2 = w~_k (1 - w~_k), computed in log space so that it is accurate
    (not 1 - 1 = 0) when one weight dominates; exactly 0 for K = 1."""
    log_norm_w = torch.log_softmax(log_w, dim=0)  # [K, B]
    return (log_norm_w + log_one_minus_normalized(log_w)).exp()


class RWS(Estimator):
    """Wake-phase q update of reweighted wake-sleep.

    Inference: sum_k w~_k d/dphi log q(stop(z_k)), i.e. a_k = 0, s_k = -w~_k.
    With K = 1 its expectation is zero (a score function alone carries no signal).
    """

    name = "rws"
    family = "rws"
    objective_is_iwae_bound = True

    def weights(self, log_w: Tensor, norm_w: Tensor) -> GradientWeights:
        return iwae_model_weights(log_w, norm_w, path=torch.zeros_like(norm_w), score=-norm_w)


class DReGRWS(Estimator):
    """Doubly reparameterized RWS wake-phi gradient (Tucker et al. 2019, eq. 7).

    Inference: sum_k (w~_k - w~_k^2) d(stopped log w_k), i.e. a_k = w~_k - w~_k^2, s_k = 0.
    Unbiased for :class:`RWS`; exactly zero for K = 1 and when q is the exact posterior.
    """

    name = "dreg_rws"
    family = "rws"
    needs_independent_samples = True
    uses_score = False
    objective_is_iwae_bound = True

    def weights(self, log_w: Tensor, norm_w: Tensor) -> GradientWeights:
        return iwae_model_weights(log_w, norm_w, path=rws_dreg_weights(log_w))


class DReGRWSNorm(Estimator):
    """DReG-RWS with its weights renormalized to sum to one ("rws-dreg-norm").

    Inference: sum_k [(w~_k - w~_k^2) / (1 - sum_j w~_j^2)] d(stopped log w_k)
    = dreg_rws / (1 - 1/ESS); the weights are softmax_k(log w_k + log sum_{j != k} w_j).

    What it estimates: dreg_rws inflated by the random factor 1 / (1 - 1/ESS) >= K/(K-1), so
    not the RWS gradient for finite K; as K -> infinity the factor tends to 1 and it converges
    to the same limit as RWS, E_{p(z|x)}[d/dphi log q(z)] = -d/dphi KL(p(z|x) || q).
    Needs K >= 2 (for K = 1 the normalizer is 0/0). Where every w~_k (1 - w~_k) underflows
    to 0 (a single finite weight) the coefficients are 0.
    """

    name = "dreg_rws_norm"
    family = "rws"
    needs_independent_samples = True
    min_samples = 2
    uses_score = False
    objective_is_iwae_bound = True

    def weights(self, log_w: Tensor, norm_w: Tensor) -> GradientWeights:
        # w~_k (1 - w~_k) is proportional to w_k * sum_{j != k} w_j.
        path = safe_softmax(log_w + leave_one_out_logsumexp(log_w), dim=0)  # [K, B]
        return iwae_model_weights(log_w, norm_w, path=path)


class DReGAlpha(Estimator):
    """DReG(alpha): interpolation between DReG-IWAE (alpha = 0) and DReG-RWS (alpha = 1).

    Inference: sum_k [(1 - alpha) w~_k^2 + alpha (w~_k - w~_k^2)] d(stopped log w_k).
    Its expectation is (1 - alpha) * IWAE gradient + alpha * RWS gradient. ``family`` is
    ``"iwae"`` for alpha = 0, ``"rws"`` for alpha = 1 and ``"mixed"`` otherwise (no single
    reference estimator).

    :param alpha: weight of the RWS part, in [0, 1] (0.9 in the paper).
    """

    name = "dreg_alpha"
    family = "mixed"
    needs_independent_samples = True
    uses_score = False
    objective_is_iwae_bound = True

    def __init__(self, alpha: float = 0.9) -> None:
        super().__init__()
        check_alpha(alpha)
        self.alpha = float(alpha)
        self.family = {0.0: "iwae", 1.0: "rws"}.get(self.alpha, "mixed")

    def weights(self, log_w: Tensor, norm_w: Tensor) -> GradientWeights:
        path = (1 - self.alpha) * norm_w.square() + self.alpha * rws_dreg_weights(log_w)
        return iwae_model_weights(log_w, norm_w, path=path)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}"
