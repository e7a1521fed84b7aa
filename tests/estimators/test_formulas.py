"""One fixed draw: every estimator's gradients equal hand-written per-particle formulas.

Pyro's ``test_particle_gradient`` pattern: the coefficients are recomputed by naive loops in
``cases.py`` from log-weights recomputed by hand, and the parameter gradients from the
closed-form per-particle derivatives of ``tests/analytic.py``; both must match autograd through
the real ``Particles`` / ``surrogate_losses`` / ``routed_loss`` code to 1e-10 (float64).
"""

from __future__ import annotations

import math

import pytest
import torch

from dreg.analytic import GaussianModel
from tests.estimators.cases import (
    ESTIMATORS,
    NAMES,
    naive_bound,
    naive_coefficients,
    naive_inference_bound,
)

K = 6
TOL = 1e-10


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> bool:
    return bool(((actual - expected).abs() <= tol * (1 + expected.abs())).all())


@pytest.fixture(scope="module")
def model() -> GaussianModel:
    return GaussianModel.default()


@pytest.mark.parametrize("name", NAMES)
def test_coefficients_and_gradients_match_hand_formulas(name, model):
    draw = model.draw(K, num_draws=2, seed=1)
    log_w = model.log_weights(draw)  # [K, N*B], by hand
    assert close(draw.particles.log_w, log_w)
    weights = ESTIMATORS[name]().double()(draw.particles.log_w)
    m, a, s = naive_coefficients(name, log_w)
    for got, want in ((weights.model, m), (weights.path, a), (weights.score, s)):
        assert close(got, want)
    assert close(weights.objective, naive_bound(name, log_w))

    model_grad, inference_grad = draw.gradients(weights)
    hand_model, hand_inference = model.hand_gradients(draw, m, a, s)
    assert close(model_grad, hand_model)
    assert close(inference_grad, hand_inference)


# Per-sample offsets on log p: a 1e4-nat spread, and the same with one -inf sample.
OFFSETS = {
    "spread": torch.tensor([0.0, -1e4, -5.0, -2e3, 3.0, -1e4 + 1.0]),
    "minus_inf": torch.tensor([0.0, -1e4, -math.inf, -2e3, 3.0, -40.0]),
}


@pytest.mark.parametrize("offset", ["none", *OFFSETS])
@pytest.mark.parametrize("name", NAMES)
def test_routed_single_backward_equals_per_group_surrogates(name, offset, model):
    """``routed_loss`` (one backward, hook on z) == autograd of each surrogate on its group."""
    log_p_offset = OFFSETS.get(offset)
    draw = model.draw(K, num_draws=2, seed=2, log_p_offset=log_p_offset)
    weights = ESTIMATORS[name]().double()(draw.particles.log_w)
    model_grad, inference_grad = draw.gradients(weights)
    routed_model, routed_inference = draw.routed_gradients(weights)
    for grad in (model_grad, inference_grad, routed_model, routed_inference):
        assert torch.isfinite(grad).all()
    assert close(routed_model, model_grad)
    assert close(routed_inference, inference_grad)


@pytest.mark.parametrize("name", NAMES)
def test_model_gradient_is_gradient_of_stated_bound(name, model):
    """The DReG trick never leaks into the decoder: d/dtheta of the bound, computed naively."""
    draw = model.draw(K, num_draws=3, seed=3)
    weights = ESTIMATORS[name]().double()(draw.particles.log_w)
    model_grad, _ = draw.routed_gradients(weights)

    again = model.draw(K, num_draws=3, seed=3)  # same noise, fresh graph
    p = again.particles
    bound = naive_bound(name, p.log_p - p.log_q_stopped)  # [N*B], depends on theta via log p
    (theta_grad,) = torch.autograd.grad(bound.sum(), again.model_params)
    assert close(model_grad, theta_grad.reshape(3, -1))


@pytest.mark.parametrize("name", ["vae", "iwae", "jvi", "miwae", "ciwae", "piwae"])
def test_inference_gradient_is_gradient_of_stated_objective(name, model):
    """Fully reparameterized estimators: the inference gradient is autograd of the objective
    (naive, float64) through every path of log w = log p(x, z(phi)) - log q(z(phi); phi);
    PIWAE's is MIWAE's, not its model's IWAE_K."""
    draw = model.draw(K, num_draws=3, seed=4)
    weights = ESTIMATORS[name]().double()(draw.particles.log_w)
    _, inference_grad = draw.routed_gradients(weights)

    again = model.draw(K, num_draws=3, seed=4)  # same noise, fresh graph
    p = again.particles
    # log q(z(phi); phi): the stopped-parameter path plus the direct (score) derivative.
    log_q = p.log_q_stopped + p.log_q_stop_z - p.log_q_stop_z.detach()
    bound = naive_inference_bound(name, p.log_p - log_q)  # [N*B]
    grads = torch.autograd.grad(bound.sum(), again.inference_params)
    assert close(inference_grad, torch.cat([g.reshape(3, -1) for g in grads], 1))
