"""DReG with learned control-variate coefficients (config name ``dreg_cv``).

The original code ("dreg-cv" in ``dreg_estimators/model.py`` of google-research) mixes four
zero-mean corrections into the IWAE inference gradient with scalar coefficients
(alpha, beta, gamma, delta), all initialised to 0 and trained to minimize the squared
inference gradient. With P_k = d(stopped log w_k) (reparameterization path) and
S_k = d/dphi log q(stop(z_k)) (score), its inference surrogate's gradient is::

    alpha * sum_k (L_K - (1 - gamma) log sum_{j != k} w_j) S_k         (VIMCO-style baseline)
  + (1 - alpha) * sum_k w~_k P_k                                       (STL)
  + (1 - beta) * sum_k ((1 - delta)/K - w~_k) S_k
  + beta * sum_k (w~_k^2 - w~_k) P_k

For every value of the coefficients its expectation is the IWAE inference gradient: it uses
E[sum_k L_K S_k] = E[sum_k w~_k P_k] (score function = reparameterization), E[S_k] = 0,
E[b_k S_k] = 0 for b_k independent of z_k, and the DReG identity
E[w~_k S_k] = E[(w~_k - w~_k^2) P_k]. At alpha = gamma = delta = 0, beta = 1 it is DReG-IWAE.

In the :mod:`dreg.estimators.base` convention: a_k = (1 - alpha) w~_k + beta (w~_k^2 - w~_k),
s_k = -[alpha (L_K - (1 - gamma) b_k) + (1 - beta) ((1 - delta)/K - w~_k)],
b_k = log sum_{j != k} w_j (O(K), no log(K - 1) offset, exactly as the original).

Training signal (a documented approximation). The original minimized
mean_i (grad_phi_i)^2 over the encoder parameters, a second-order quantity: it needs the
per-parameter inference gradient as a differentiable function of the coefficients (a double
backward through the whole network). The estimator interface sees only the log-weights, and
one training step allows one backward, so ``aux_loss`` is the squared inference gradient under
the assumption that the per-sample gradient vectors {P_k, S_k} are orthonormal:
mean_b sum_k (a_k^2 + s_k^2). This keeps the estimator unbiased for any coefficient values
(only the variance reduction differs from the original), costs O(K), and its gradient trains
the four coefficients through ``GradientWeights.aux_loss``. On the analytic Gaussian model
it drives them to about the DReG point (beta ~ 1, alpha ~ 0; ``benchmarks/estimator_variance``).

References:
    Tucker, Lawson, Gu & Maddison (2019), Doubly Reparameterized Gradient Estimators for
    Monte Carlo Objectives, ICLR; code: google-research/google-research,
    dreg_estimators/model.py ("dreg-cv") and main_loop.py (the coefficients' training loss).
    Mnih & Rezende (2016), Variational Inference for Monte Carlo Objectives (VIMCO).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dreg.estimators.base import Estimator, GradientWeights
from dreg.estimators.ops import iwae_bound, leave_one_out_logsumexp


class DReGCV(Estimator):
    """DReG with learned control-variate coefficients (the original's "dreg-cv").

    Model: IWAE (m_k = w~_k). Inference: see the module docstring; unbiased for IWAE for any
    coefficients. The coefficients are ``nn.Parameter`` scalars trained by ``aux_loss``.

    :param alpha: initial weight of the VIMCO-style score term against STL (0 in the original).
    :param beta: initial weight of the DReG correction (w~^2 - w~) on the path (0).
    :param gamma: initial shrinkage of the leave-one-out baseline (0).
    :param delta: initial shrinkage of the 1/K score baseline (0).
    :param learn: train the coefficients (``False``: fixed, no ``aux_loss``).
    """

    name = "dreg_cv"
    family = "iwae"
    needs_independent_samples = True
    min_samples = 2
    objective_is_iwae_bound = True

    def __init__(
        self,
        alpha: float = 0.0,
        beta: float = 0.0,
        gamma: float = 0.0,
        delta: float = 0.0,
        learn: bool = True,
    ) -> None:
        super().__init__()
        self.learn = learn
        for key, value in {"alpha": alpha, "beta": beta, "gamma": gamma, "delta": delta}.items():
            self.register_parameter(key, nn.Parameter(torch.tensor(float(value)), learn))

    def coefficients(
        self, log_w: Tensor, norm_w: Tensor, cv: tuple[Tensor, Tensor, Tensor, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """``(path, score)``, each ``[K, B]``, for control-variate values ``cv``; differentiable
        in ``cv`` (``log_w`` is detached)."""
        alpha, beta, gamma, delta = cv
        k = log_w.shape[0]
        bound = iwae_bound(log_w)  # [B]
        baseline = leave_one_out_logsumexp(log_w)  # [K, B]: b_k, independent of z_k
        # b_k = -inf only if every other weight is 0; any constant is a valid baseline then.
        baseline = torch.where(torch.isfinite(baseline), baseline, torch.zeros_like(baseline))
        signal = bound - (1 - gamma) * baseline  # [K, B]
        path = (1 - alpha) * norm_w + beta * (norm_w.square() - norm_w)
        score = -(alpha * signal + (1 - beta) * ((1 - delta) / k - norm_w))
        return path, score

    def weights(self, log_w: Tensor, norm_w: Tensor) -> GradientWeights:
        cv = (self.alpha, self.beta, self.gamma, self.delta)
        path, score = self.coefficients(log_w, norm_w, tuple(c.detach() for c in cv))
        aux_loss = None
        if self.learn and torch.is_grad_enabled():
            cv_path, cv_score = self.coefficients(log_w, norm_w, cv)
            aux_loss = (cv_path.square() + cv_score.square()).sum(0).mean()
        return GradientWeights(
            objective=iwae_bound(log_w),
            model=norm_w,
            path=path,
            score=score,
            aux_loss=aux_loss,
        )

    def extra_repr(self) -> str:
        names = ("alpha", "beta", "gamma", "delta")
        values = ", ".join(f"{n}={getattr(self, n).detach().item():.3g}" for n in names)
        return f"{super().extra_repr()}, {values}"
