"""Gradient estimators for Monte Carlo objectives (one small class each, pure tensor math).

Each estimator maps detached log-weights ``[K, B]`` to per-sample coefficients on the three
gradient paths (:mod:`dreg.estimators.base`); :func:`routed_loss` turns them into parameter
gradients with one backward. Config name -> class: ``conf/estimator/<name>.yaml``; the
diagnostics find an estimator by its ``name`` with :func:`estimator_by_name`.
"""

from typing import Any

from dreg.estimators.base import Estimator, GradientWeights
from dreg.estimators.control_variates import DReGCV
from dreg.estimators.elbo import ELBO
from dreg.estimators.iwae import IWAE, STL, DReGIWAE, DReGIWAENorm
from dreg.estimators.jackknife import JVI, DReGJVI
from dreg.estimators.rainforth import CIWAE, MIWAE, PIWAE, DReGMIWAE, DReGPIWAE
from dreg.estimators.rws import RWS, DReGAlpha, DReGRWS, DReGRWSNorm
from dreg.estimators.surrogates import Particles, routed_loss, surrogate_losses


def estimator_by_name(name: str, **params: Any) -> Estimator:
    """A new estimator whose ``name`` is ``name`` (the config name), with its default
    parameters unless given. Works from an installed package: no config files are read."""
    known = estimator_classes()
    if name not in known:
        raise ValueError(f"unknown estimator '{name}'; choose one of {sorted(known)}")
    return known[name](**params)


def estimator_classes() -> dict[str, type[Estimator]]:
    """Every estimator class by its config name (the subclasses of :class:`Estimator` that
    set a ``name`` of their own; shared bases such as ``GroupedEstimator`` set none)."""

    def subclasses(cls: type[Estimator]) -> list[type[Estimator]]:
        return [c for sub in cls.__subclasses__() for c in (sub, *subclasses(sub))]

    return {cls.name: cls for cls in subclasses(Estimator) if "name" in vars(cls)}


__all__ = [
    "CIWAE",
    "ELBO",
    "IWAE",
    "JVI",
    "MIWAE",
    "PIWAE",
    "RWS",
    "STL",
    "DReGAlpha",
    "DReGCV",
    "DReGIWAE",
    "DReGIWAENorm",
    "DReGJVI",
    "DReGMIWAE",
    "DReGPIWAE",
    "DReGRWS",
    "DReGRWSNorm",
    "Estimator",
    "GradientWeights",
    "Particles",
    "routed_loss",
    "estimator_by_name",
    "estimator_classes",
    "surrogate_losses",
]
