"""The IWAE family: the importance-weighted bound and its inference-network gradients.

All four estimators here share the model (decoder) gradient of the IWAE bound
L_K = log (1/K sum_k w_k), namely sum_k w~_k d/dtheta log p(x, z_k), and report L_K as their
objective. They differ only in the inference-network gradient. "Stopped" below means log q
evaluated with the encoder parameters detached, z_k still on its reparameterization path.

References:
    Burda, Grosse & Salakhutdinov (2016), Importance Weighted Autoencoders.
    Roeder, Wu & Duvenaud (2017), Sticking the Landing.
    Tucker, Lawson, Gu & Maddison (2019), Doubly Reparameterized Gradient Estimators for
    Monte Carlo Objectives, ICLR (eq. 5 and section 4).
"""

from __future__ import annotations

from torch import Tensor

from dreg.estimators.base import (
    Estimator,
    GradientWeights,
    iwae_model_weights,
)
from dreg.estimators.ops import iwae_bound, normalized_weights


class IWAE(Estimator):
    """IWAE bound, fully reparameterized gradient for both parameter groups.

    L_K = log (1/K sum_k w_k);  dL_K = sum_k w~_k d log w_k  (all three paths).
    Model: m_k = w~_k.  Inference: a_k = w~_k (path), s_k = w~_k (score).
    With K = 1 it is the ELBO (the VAE estimator).
    """

    name = "iwae"
    family = "iwae"
    objective_is_iwae_bound = True

    def weights(self, log_w: Tensor, norm_w: Tensor) -> GradientWeights:
        return GradientWeights(objective=iwae_bound(log_w), model=norm_w, path=norm_w, score=norm_w)


class STL(Estimator):
    """Sticking the landing (Roeder et al. 2017): drop the score term of the IWAE gradient.

    Inference: sum_k w~_k d(stopped log w_k), i.e. a_k = w~_k, s_k = 0.
    Unbiased only for K = 1; for K > 1 it is biased (Tucker et al. 2019, section 3), but its
    gradient is exactly zero when q is the true posterior (all w_k equal, d log w_k/dz = 0).
    """

    name = "stl"
    family = "iwae"
    uses_score = False
    objective_is_iwae_bound = True

    def weights(self, log_w: Tensor, norm_w: Tensor) -> GradientWeights:
        return iwae_model_weights(log_w, norm_w, path=norm_w)


class DReGIWAE(Estimator):
    """Doubly reparameterized IWAE gradient (Tucker et al. 2019, eq. 5).

    Inference: sum_k w~_k^2 d(stopped log w_k), i.e. a_k = w~_k^2, s_k = 0.
    Unbiased for the IWAE inference gradient: the score term E[w~_k d/dphi log q(z_k)] is
    rewritten by reparameterizing it a second time. Its SNR grows with K where IWAE's falls.
    """

    name = "dreg_iwae"
    family = "iwae"
    needs_independent_samples = True
    uses_score = False
    objective_is_iwae_bound = True

    def weights(self, log_w: Tensor, norm_w: Tensor) -> GradientWeights:
        return iwae_model_weights(log_w, norm_w, path=norm_w * norm_w)  # square(), 1 kernel


class DReGIWAENorm(Estimator):
    """DReG-IWAE with the squared weights renormalized to sum to one ("dreg-norm").

    Inference: sum_k (w~_k^2 / sum_j w~_j^2) d(stopped log w_k) = ESS * dreg_iwae, with the
    effective sample size ESS = 1 / sum_j w~_j^2; the weights are softmax_k(2 log w_k).

    What it estimates: not the IWAE gradient (it is dreg_iwae scaled by a random factor in
    [1, K]). As K -> infinity it converges to E_q[w^2 d log w/dz dz/dphi] / E_q[w^2]
    = -1/2 d/dphi log E_q[w^2] = -1/2 d/dphi D_2(p(z|x) || q), the gradient of half the Renyi
    divergence of order 2 from the posterior to q; for K = 1 it equals STL.
    """

    name = "dreg_iwae_norm"
    family = "iwae"
    needs_independent_samples = True
    uses_score = False
    objective_is_iwae_bound = True

    def weights(self, log_w: Tensor, norm_w: Tensor) -> GradientWeights:
        return iwae_model_weights(log_w, norm_w, path=normalized_weights(2 * log_w))  # w~^2/sum
