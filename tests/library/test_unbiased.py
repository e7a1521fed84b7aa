"""Unbiasedness through the public API on models that are not dreg's VAE (float64, fixed seed).

Each of two data points is copied N times along the batch, and the proposal's per-data-point
parameters (the raw encoder outputs) are leaves, so one call gives N independent K-sample
gradient estimates per data point (the loss is a batch mean: each copy's gradient is its own
draw). Estimators are compared *paired*, on the same noise: the mean of their difference must
lie within 4 standard errors of zero in every coordinate. STL, biased for K > 1, fails the
same check, which shows the test has power.
"""

from __future__ import annotations

import math

import pytest
import torch

from dreg.estimators import DReGCV, estimator_by_name
from dreg.library import monte_carlo_objective
from tests.estimators.cases import GROUPS
from tests.library.models import DTYPE, MODELS, noise_shape

NUM_COPIES = 2000
NUM_POINTS = 2
MAX_SE = 4.0
CV_VALUES = {"alpha": 0.25, "beta": 0.625, "gamma": 0.125, "delta": -0.375}
ALPHA = 0.9  # dreg_alpha's default
NAMES = ["iwae", "stl", "dreg_iwae", "rws", "dreg_rws", "dreg_alpha", "jvi", "dreg_jvi", "dreg_cv"]
GROUPED = ["miwae", "dreg_miwae", "piwae", "dreg_piwae"]  # M = GROUPS divides every K below
NAMES += GROUPED


def per_copy_gradients(model_name: str, num_samples: int, seed: int) -> dict[str, torch.Tensor]:
    """name -> ``[N, NUM_POINTS * E]`` inference gradients w.r.t. the raw encoder outputs."""
    model = MODELS[model_name]().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    points = torch.randn((NUM_POINTS, model.data_dim), generator=gen, dtype=DTYPE)
    x = points.repeat(NUM_COPIES, 1)  # [N * P, Dx]: copy-major
    batch = x.shape[0]
    eps = torch.randn((num_samples, *noise_shape(model, batch)), generator=gen, dtype=DTYPE)
    raw_outputs = model.encode(x).detach()
    grads = {}
    for name in NAMES:
        raw = raw_outputs.clone().requires_grad_(True)
        estimator = DReGCV(**CV_VALUES, learn=False).double() if name == "dreg_cv" else name
        if name in GROUPED:
            estimator = estimator_by_name(name, groups=GROUPS)
        result = monte_carlo_objective(
            model.distribution(model.split(raw)),
            lambda z: model.log_joint(x, z),
            num_samples,
            estimator,
            noise=eps,
        )
        result.loss.backward()
        grads[name] = -batch * raw.grad.reshape(NUM_COPIES, -1)  # undo the negated mean
    return grads


@pytest.fixture(scope="module", params=[("linear_diag", 2), ("mlp_mvn", 8), ("mlp_lowrank", 4)])
def gradients(request):
    model_name, num_samples = request.param
    return per_copy_gradients(model_name, num_samples, seed=num_samples)


def within_standard_errors(diff: torch.Tensor) -> bool:
    """Every coordinate's mean within MAX_SE standard errors of 0. Coordinates that no noise
    reaches (e.g. the upper triangle of a scale_tril's raw parameters) have SE = 0 and must be
    zero up to float rounding."""
    se = diff.std(0) / math.sqrt(diff.shape[0])
    return bool((diff.mean(0).abs() <= MAX_SE * se + 1e-12).all())


@pytest.mark.parametrize(
    ("name", "reference"),
    [("dreg_iwae", "iwae"), ("dreg_rws", "rws"), ("dreg_jvi", "jvi"), ("dreg_cv", "iwae"),
     ("dreg_miwae", "miwae"), ("dreg_piwae", "piwae")],
)  # fmt: skip
def test_dreg_estimator_is_unbiased_for_its_reference(gradients, name, reference):
    assert within_standard_errors(gradients[name] - gradients[reference])


def test_dreg_alpha_estimates_the_alpha_mixture(gradients):
    mixture = (1 - ALPHA) * gradients["iwae"] + ALPHA * gradients["rws"]
    assert within_standard_errors(gradients["dreg_alpha"] - mixture)


def test_the_check_has_power_stl_is_biased(gradients):
    assert not within_standard_errors(gradients["stl"] - gradients["iwae"])
