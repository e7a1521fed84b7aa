"""The estimator interface: per-sample coefficients on the three gradient paths of log w_k.

Every Monte Carlo objective in Tucker et al. (2019) differentiates a function of the K
log-weights ``log w_k = log p(x, z_k) - log q(z_k | x)`` with ``z_k = mu + sigma * eps_k``.
Its gradient, and that of every DReG-style variant, is a weighted sum of three per-sample
gradient paths (model parameters theta, inference-network parameters phi)::

    model gradient      sum_k  m_k  * d/dtheta log p(x, z_k)
    inference gradient  sum_k  a_k  * (d/dz log p(x, z_k) - d/dz log q(z_k; stop(phi))) dz_k/dphi
                      + sum_k  s_k  * (-d/dphi log q(stop(z_k); phi))

``m`` (model), ``a`` (path) and ``s`` (score) are computed from the *values* of the
log-weights alone and carry no gradient. Examples (w~ = softmax_k log w):

    IWAE       m = w~, a = w~,   s = w~
    DReG-IWAE  m = w~, a = w~^2, s = 0
    STL        m = w~, a = w~,   s = 0

An estimator is therefore a pure function ``log_w [K, B] -> GradientWeights``. Turning the
weights into parameter gradients with a single backward pass is the job of
:mod:`dreg.estimators.surrogates`, written once for all estimators.

Sign convention: coefficients multiply gradients of the *objective* (to be maximized); the
losses built from them are negated so optimizers minimize them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dreg.estimators.ops import iwae_bound


@dataclass
class GradientWeights:
    """What an estimator returns for one batch. Every tensor is detached.

    :ivar objective: ``[B]`` the bound being optimized, per data point (what is logged).
    :ivar model: ``[K, B]`` coefficients on d/dtheta log p(x, z_k).
    :ivar path: ``[K, B]`` coefficients on the reparameterization path of log w_k with the
        parameters of log q stopped.
    :ivar score: ``[K, B]`` coefficients on the direct (score-function) derivative
        -d/dphi log q(z_k) with z_k held fixed.
    :ivar aux_loss: optional scalar whose gradient trains the estimator's own parameters
        (learned control variates); ``None`` for stateless estimators.
    """

    objective: Tensor
    model: Tensor
    path: Tensor
    score: Tensor
    aux_loss: Tensor | None = None


class Estimator(nn.Module):
    """Base class of all gradient estimators.

    Subclasses set ``name`` (the config name), ``family`` (which reference gradient the
    bias check compares against: ``"iwae"``, ``"rws"`` or ``"jvi"``) and ``min_samples``, and
    implement :meth:`forward`. They are ``nn.Module`` so that estimators with learned state
    (control variates) are checkpointed and moved between devices like the model.

    :param num_samples: K, the number of importance samples per data point.
    """

    name: str = "estimator"
    family: str = "iwae"
    min_samples: int = 1
    # DReG identities (Tucker et al. 2019, eq. 5) need i.i.d. samples: antithetic pairs make
    # those estimators biased, so the LightningModule refuses the combination.
    needs_independent_samples: bool = False

    def __init__(self, num_samples: int) -> None:
        super().__init__()
        if int(num_samples) != num_samples or num_samples < self.min_samples:
            raise ValueError(
                f"estimator '{self.name}' needs num_samples (K) >= {self.min_samples}, "
                f"got K={num_samples}; set model.num_samples={max(self.min_samples, 2)} or more"
            )
        self.num_samples = int(num_samples)

    def forward(self, log_w: Tensor) -> GradientWeights:  # pragma: no cover - interface
        """Coefficients for the log-weights ``log_w`` of shape ``[K, B]`` (detached)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name}, K={self.num_samples}"


def check_log_weights(log_w: Tensor, num_samples: int) -> Tensor:
    """Validate shape ``[K, B]`` and return ``log_w`` detached (coefficients carry no grad)."""
    if log_w.dim() != 2 or log_w.shape[0] != num_samples:
        raise ValueError(
            f"expected log-weights of shape [K={num_samples}, B], got {tuple(log_w.shape)}"
        )
    return log_w.detach()


def iwae_model_weights(
    log_w: Tensor, norm_w: Tensor, path: Tensor, score: Tensor | None = None
) -> GradientWeights:
    """The common case: the IWAE bound as objective and model gradient (m_k = w~_k), with
    the estimator's own inference coefficients; ``score`` defaults to 0 (the DReG/STL forms
    drop the score term)."""
    return GradientWeights(
        objective=iwae_bound(log_w),
        model=norm_w,
        path=path,
        score=torch.zeros_like(norm_w) if score is None else score,
    )
