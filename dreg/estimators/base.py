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
from typing import Any

import torch
from torch import Tensor, nn

from dreg.estimators.ops import iwae_bound, normalized_weights


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

    Subclasses set ``name`` (the config name), ``family`` (the config name of the reference
    estimator whose gradient the bias check compares against: ``"iwae"``, ``"rws"``,
    ``"jvi"``, ``"miwae"``, ...; ``"mixed"`` when there is none) and ``min_samples``, and
    implement :meth:`weights`, their formula. K is read from the log-weights they are given,
    so one estimator object serves any K (the training K, a diagnostic's K sweep). They are
    ``nn.Module`` so that estimators with learned state (control variates) are checkpointed
    and moved between devices like the model. Estimators with further rules on K (MIWAE's
    groups) override :meth:`validate_num_samples`; those whose reference shares a parameter
    with them override :meth:`reference_params`.
    """

    name: str = "estimator"
    family: str = "iwae"
    min_samples: int = 1
    # DReG identities (Tucker et al. 2019, eq. 5) need i.i.d. samples: antithetic pairs make
    # those estimators biased, so the config check refuses the combination.
    needs_independent_samples: bool = False
    # False when the score coefficients s are zero by construction (DReG forms, STL): the
    # training step then never builds log q(stop z)'s graph (``Particles.log_q_stop_z``).
    uses_score: bool = True
    # True when ``objective`` is the IWAE bound of ``log_w``: the step records it as
    # ``train/iwae_bound`` without computing it twice.
    objective_is_iwae_bound: bool = False

    def forward(self, log_w: Tensor) -> GradientWeights:
        """Coefficients for the log-weights ``log_w`` of shape ``[K, B]``.

        Validates the shape and K once for every estimator, detaches (coefficients carry no
        gradient) and computes the normalized weights w~ that nearly every formula needs.
        """
        if log_w.dim() != 2:
            raise ValueError(f"expected log-weights of shape [K, B], got {tuple(log_w.shape)}")
        self.validate_num_samples(log_w.shape[0])
        log_w = log_w.detach()  # [K, B]
        return self.weights(log_w, normalized_weights(log_w))

    def validate_num_samples(self, num_samples: int) -> None:
        """Raise ``ValueError`` (one line naming the config keys) when this estimator cannot
        use K = ``num_samples``. Every forward, the config check, the callbacks and the
        diagnostics ask here. Default: K >= ``min_samples``."""
        check_num_samples(type(self), num_samples)

    def reference_params(self) -> dict[str, Any]:
        """Constructor arguments that the reference estimator (config name ``family``) must
        share with this one for the bias check, e.g. MIWAE's ``groups``; none by default."""
        return {}

    def weights(self, log_w: Tensor, norm_w: Tensor) -> GradientWeights:  # pragma: no cover
        """The estimator's formula: coefficients from detached ``log_w`` and ``norm_w`` =
        softmax_k(log_w), both ``[K, B]``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name}"


def check_num_samples(estimator: type[Estimator], num_samples: int) -> None:
    """Raise ``ValueError`` when K is too small for ``estimator`` (the one message for this
    rule: the config check and every forward use it)."""
    if num_samples < estimator.min_samples:
        raise ValueError(
            f"estimator '{estimator.name}' needs K >= {estimator.min_samples}, got "
            f"K={num_samples}; set model.num_samples={estimator.min_samples} or more"
        )


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
