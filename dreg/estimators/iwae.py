"""The IWAE family: the importance-weighted bound and its inference-network gradients.

References:
    Burda, Grosse & Salakhutdinov (2016), Importance Weighted Autoencoders.
    Tucker, Lawson, Gu & Maddison (2019), Doubly Reparameterized Gradient Estimators for
    Monte Carlo Objectives, ICLR.
"""

from __future__ import annotations

from torch import Tensor

from dreg.estimators.base import Estimator, GradientWeights, check_log_weights
from dreg.estimators.ops import iwae_bound, normalized_weights


class IWAE(Estimator):
    """IWAE bound, fully reparameterized gradient for both parameter groups.

    L_K = log (1/K sum_k w_k);  dL_K = sum_k w~_k d log w_k  (all three paths).
    Model: m_k = w~_k.  Inference: a_k = w~_k (path), s_k = w~_k (score).
    With K = 1 it is the ELBO (the VAE estimator).
    """

    name = "iwae"
    family = "iwae"

    def forward(self, log_w: Tensor) -> GradientWeights:
        log_w = check_log_weights(log_w, self.num_samples)  # [K, B]
        norm_w = normalized_weights(log_w)  # [K, B], w~
        return GradientWeights(objective=iwae_bound(log_w), model=norm_w, path=norm_w, score=norm_w)
