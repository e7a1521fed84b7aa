"""The estimator table shared by the estimator tests, and naive reference implementations.

Adding an estimator: one row in ``ESTIMATORS`` and one branch in :func:`naive_coefficients`.
The references are written independently of ``dreg.estimators`` (plain loops, O(K^2), float64)
so that a shared bug cannot hide.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from dreg.estimators import (
    CIWAE,
    ELBO,
    IWAE,
    JVI,
    MIWAE,
    PIWAE,
    RWS,
    STL,
    DReGAlpha,
    DReGCV,
    DReGIWAE,
    DReGIWAENorm,
    DReGJVI,
    DReGMIWAE,
    DReGPIWAE,
    DReGRWS,
    DReGRWSNorm,
    Estimator,
)

# Non-trivial control-variate values (exact in float32), so every term of dreg_cv is exercised.
CV_VALUES = {"alpha": 0.25, "beta": 0.625, "gamma": 0.125, "delta": -0.375}
ALPHA = 0.9
# Rainforth et al.'s estimators: M = 2 groups divides every K of these tests but 1 (K = 6:
# K' = 3); a CIWAE beta away from 0, 1/2 and 1.
GROUPS, BETA = 2, 0.3
# Constructor arguments of the estimators with parameters (the library tests pass objects).
PARAMS = {
    "dreg_alpha": {"alpha": ALPHA},
    "dreg_cv": CV_VALUES,
    "ciwae": {"beta": BETA},
    **{name: {"groups": GROUPS} for name in ("miwae", "piwae", "dreg_miwae", "dreg_piwae")},
}

ESTIMATORS: dict[str, Callable[[], Estimator]] = {
    "vae": ELBO,
    "iwae": IWAE,
    "stl": STL,
    "dreg_iwae": DReGIWAE,
    "dreg_iwae_norm": DReGIWAENorm,
    "rws": RWS,
    "dreg_rws": DReGRWS,
    "dreg_rws_norm": DReGRWSNorm,
    "dreg_alpha": lambda: DReGAlpha(alpha=ALPHA),
    "jvi": JVI,
    "dreg_jvi": DReGJVI,
    "dreg_cv": lambda: DReGCV(**CV_VALUES),
    "miwae": lambda: MIWAE(groups=GROUPS),
    "ciwae": lambda: CIWAE(beta=BETA),
    "piwae": lambda: PIWAE(groups=GROUPS),
    "dreg_miwae": lambda: DReGMIWAE(groups=GROUPS),
    "dreg_piwae": lambda: DReGPIWAE(groups=GROUPS),
}
NAMES = list(ESTIMATORS)
GROUPED = ["miwae", "piwae", "dreg_miwae", "dreg_piwae"]  # K must be a multiple of GROUPS
MIN_SAMPLES = {"dreg_rws_norm": 2, "jvi": 2, "dreg_jvi": 2, "dreg_cv": 2}
MIN_SAMPLES |= {name: GROUPS for name in GROUPED}

# Inference-gradient zero at the exact posterior for every draw (no score term survives).
ZERO_AT_POSTERIOR = [
    "stl",
    "dreg_iwae",
    "dreg_iwae_norm",
    "dreg_rws",
    "dreg_rws_norm",
    "dreg_alpha",
    "dreg_jvi",
    "dreg_miwae",
    "dreg_piwae",
]


def naive_iwae_bound(log_w: Tensor) -> Tensor:
    return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])


def naive_jackknife_bound(log_w: Tensor) -> Tensor:
    """K L_K - (K-1)/K sum_k L_{K-1}^(-k), leaving each sample out explicitly (O(K^2))."""
    k = log_w.shape[0]
    loo = [naive_iwae_bound(torch.cat([log_w[:i], log_w[i + 1 :]])) for i in range(k)]
    return k * naive_iwae_bound(log_w) - (k - 1) * torch.stack(loo).mean(0)


def naive_miwae_bound(log_w: Tensor, groups: int = GROUPS) -> Tensor:
    """1/M sum_m log 1/K' sum_k w_{m,k}, group m = samples m K' .. (m+1) K' - 1, by a loop."""
    size = log_w.shape[0] // groups
    terms = [naive_iwae_bound(log_w[m * size : (m + 1) * size]) for m in range(groups)]
    return torch.stack(terms).mean(0)


def naive_bound(name: str, log_w: Tensor) -> Tensor:
    """The bound each estimator states it optimizes (its model gradient and objective)."""
    if name == "vae":
        return log_w.mean(0)
    if name in ("jvi", "dreg_jvi"):
        return naive_jackknife_bound(log_w)
    if name in ("miwae", "dreg_miwae"):
        return naive_miwae_bound(log_w)
    if name == "ciwae":
        return BETA * log_w.mean(0) + (1 - BETA) * naive_iwae_bound(log_w)
    return naive_iwae_bound(log_w)  # piwae, dreg_piwae: the model's IWAE_K


def naive_inference_bound(name: str, log_w: Tensor) -> Tensor:
    """The objective whose reparameterized gradient the inference network of a fully
    reparameterized estimator follows (PIWAE's differs from its model's)."""
    return naive_miwae_bound(log_w) if name == "piwae" else naive_bound(name, log_w)


def naive_group_weights(log_w: Tensor, groups: int = GROUPS) -> Tensor:
    """w~_{m,k}: each sample's weight over the sum of its own group's, by a loop."""
    size, out = log_w.shape[0] // groups, torch.zeros_like(log_w)
    for m in range(groups):
        group = log_w[m * size : (m + 1) * size]
        out[m * size : (m + 1) * size] = torch.exp(group - torch.logsumexp(group, 0))
    return out


def loo_weight_powers(log_w: Tensor, power: int) -> Tensor:
    """sum_{k != j} (w_j / sum_{i != k} w_i)^power by explicit loops."""
    k = log_w.shape[0]
    out = torch.zeros_like(log_w)
    for j in range(k):
        for left_out in range(k):
            if left_out != j:
                others = torch.cat([log_w[:left_out], log_w[left_out + 1 :]])
                out[j] += torch.exp(power * (log_w[j] - torch.logsumexp(others, 0)))
    return out


def naive_coefficients(name: str, log_w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(model, path, score) coefficients ``[K, B]`` of the estimator ``name``, from the formulas
    in the issue's table (score multiplies -d/dphi log q(stop z))."""
    k = log_w.shape[0]
    w = torch.exp(log_w - torch.logsumexp(log_w, 0))  # w~
    zero = torch.zeros_like(w)
    jk1 = k * w - (k - 1) / k * loo_weight_powers(log_w, 1) if k > 1 else None
    gw = naive_group_weights(log_w) if k % GROUPS == 0 else None
    ci = BETA / k + (1 - BETA) * w
    table = {
        "vae": lambda: (zero + 1 / k, zero + 1 / k, zero + 1 / k),
        "iwae": lambda: (w, w, w),
        "stl": lambda: (w, w, zero),
        "dreg_iwae": lambda: (w, w**2, zero),
        "dreg_iwae_norm": lambda: (w, w**2 / (w**2).sum(0), zero),
        "rws": lambda: (w, zero, -w),
        "dreg_rws": lambda: (w, w - w**2, zero),
        "dreg_rws_norm": lambda: (w, (w - w**2) / (w - w**2).sum(0), zero),
        "dreg_alpha": lambda: (w, (1 - ALPHA) * w**2 + ALPHA * (w - w**2), zero),
        "jvi": lambda: (jk1, jk1, jk1),
        "dreg_jvi": lambda: (jk1, k * w**2 - (k - 1) / k * loo_weight_powers(log_w, 2), zero),
        "dreg_cv": lambda: _naive_cv(log_w, w),
        "miwae": lambda: (gw / GROUPS, gw / GROUPS, gw / GROUPS),
        "ciwae": lambda: (ci, ci, ci),
        "piwae": lambda: (w, gw / GROUPS, gw / GROUPS),
        "dreg_miwae": lambda: (gw / GROUPS, gw**2 / GROUPS, zero),
        "dreg_piwae": lambda: (w, gw**2 / GROUPS, zero),
    }
    return table[name]()


def _naive_cv(log_w: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The original's dreg-cv surrogate, term by term, in the (m, a, s) convention."""
    k = log_w.shape[0]
    al, be, ga, de = (CV_VALUES[n] for n in ("alpha", "beta", "gamma", "delta"))
    baseline = torch.stack(
        [torch.logsumexp(torch.cat([log_w[:i], log_w[i + 1 :]]), 0) for i in range(k)]
    )
    signal = naive_iwae_bound(log_w) - (1 - ga) * baseline
    path = (1 - al) * w + be * (w**2 - w)
    score = -(al * signal + (1 - be) * ((1 - de) / k - w))
    return w, path, score


# -- Monte Carlo helpers ----------------------------------------------------------------------
def sample_gradients(
    model, num_samples: int, num_draws: int, names: list[str], seed: int = 0, **draw_kwargs
) -> dict[str, tuple[Tensor, Tensor]]:
    """``name -> (model [N, P_m], inference [N, P_i])`` for every estimator in ``names`` on the
    *same* N independent draws (so differences between estimators are paired)."""
    draw = model.draw(num_samples, num_draws, seed=seed, **draw_kwargs)
    out = {}
    for name in names:
        weights = ESTIMATORS[name]().double()(draw.particles.log_w)
        out[name] = draw.gradients(weights)
    return out


def t_statistics(samples: Tensor, target: Tensor | float = 0.0) -> Tensor:
    """Per-coordinate (mean - target) / standard error over draws (dim 0)."""
    n = samples.shape[0]
    return (samples.mean(0) - target) / (samples.std(0) / math.sqrt(n))
