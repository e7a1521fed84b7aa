"""Gradient estimators for Monte Carlo objectives (one small class each, pure tensor math).

Each estimator maps detached log-weights ``[K, B]`` to per-sample coefficients on the three
gradient paths (:mod:`dreg.estimators.base`); :func:`routed_loss` turns them into parameter
gradients with one backward. Config name -> class: ``conf/estimator/<name>.yaml``.
"""

from dreg.estimators.base import Estimator, GradientWeights
from dreg.estimators.control_variates import DReGCV
from dreg.estimators.elbo import ELBO
from dreg.estimators.iwae import IWAE, STL, DReGIWAE, DReGIWAENorm
from dreg.estimators.jackknife import JVI, DReGJVI
from dreg.estimators.rws import RWS, DReGAlpha, DReGRWS, DReGRWSNorm
from dreg.estimators.surrogates import Particles, routed_loss, surrogate_losses

__all__ = [
    "ELBO",
    "IWAE",
    "JVI",
    "RWS",
    "STL",
    "DReGAlpha",
    "DReGCV",
    "DReGIWAE",
    "DReGIWAENorm",
    "DReGJVI",
    "DReGRWS",
    "DReGRWSNorm",
    "Estimator",
    "GradientWeights",
    "Particles",
    "routed_loss",
    "surrogate_losses",
]
