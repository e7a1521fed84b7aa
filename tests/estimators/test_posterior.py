"""q equal to the exact posterior (Pyro ``test_conjugate_gradients`` pattern).

Then every log-weight equals log p(x), d log w / dz = 0 along the stopped path, and each
bound equals log p(x) exactly. Estimators without a score term have an inference gradient of
exactly zero for every draw (zero variance at the optimum); IWAE-style estimators are zero
only in expectation.
"""

from __future__ import annotations

import pytest
import torch

from dreg.analytic import GaussianModel
from tests.estimators.cases import ESTIMATORS, NAMES, ZERO_AT_POSTERIOR, t_statistics

K = 8
NUM_DRAWS = 500


@pytest.fixture(scope="module")
def draw():
    return GaussianModel.default().at_posterior().draw(K, NUM_DRAWS, seed=21)


@pytest.mark.parametrize("name", NAMES)
def test_bound_is_log_marginal_at_posterior(name, draw):
    model = GaussianModel.default()
    weights = ESTIMATORS[name]().double()(draw.particles.log_w)
    expected = model.log_marginal().repeat(NUM_DRAWS)  # [N*B]
    assert torch.allclose(weights.objective, expected, atol=1e-10)


@pytest.mark.parametrize("name", ZERO_AT_POSTERIOR)
def test_score_free_estimators_vanish_at_posterior(name, draw):
    weights = ESTIMATORS[name]().double()(draw.particles.log_w)
    _, inference = draw.gradients(weights)
    assert inference.abs().max() < 1e-10


@pytest.mark.parametrize("name", ["iwae", "vae", "rws", "jvi"])
def test_score_estimators_are_noisy_but_zero_mean_at_posterior(name, draw):
    weights = ESTIMATORS[name]().double()(draw.particles.log_w)
    _, inference = draw.gradients(weights)
    assert inference.std(0).min() > 1e-3  # not zero per draw...
    assert t_statistics(inference).abs().max() < 4.0  # ...but zero in expectation
