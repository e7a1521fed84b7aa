"""The evidence lower bound (config name ``vae``): the standard VAE objective.

References:
    Kingma & Welling (2014), Auto-Encoding Variational Bayes.
    Rezende, Mohamed & Wierstra (2014), Stochastic Backpropagation and Approximate Inference
    in Deep Generative Models.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dreg.estimators.base import Estimator, GradientWeights


class ELBO(Estimator):
    """ELBO averaged over K independent samples, fully reparameterized.

    L = 1/K sum_k log w_k;  dL = 1/K sum_k d log w_k  (all three paths).
    Model: m_k = 1/K.  Inference: a_k = 1/K (path), s_k = 1/K (score).
    With K = 1 it equals :class:`~dreg.estimators.iwae.IWAE`. A ``-inf`` log-weight makes the
    ELBO estimate ``-inf``: that is its true value, reported as such.
    """

    name = "vae"
    family = "iwae"

    def weights(self, log_w: Tensor, norm_w: Tensor) -> GradientWeights:
        uniform = torch.full_like(log_w, 1.0 / log_w.shape[0])  # [K, B]
        return GradientWeights(objective=log_w.mean(0), model=uniform, path=uniform, score=uniform)
