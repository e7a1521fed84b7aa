"""Gradient estimators for Monte Carlo objectives (one small class each, pure tensor math)."""

from dreg.estimators.base import Estimator, GradientWeights
from dreg.estimators.iwae import IWAE
from dreg.estimators.surrogates import Particles, routed_loss, surrogate_losses

__all__ = [
    "IWAE",
    "Estimator",
    "GradientWeights",
    "Particles",
    "routed_loss",
    "surrogate_losses",
]
