"""Exact (non-statistical) properties: K = 1 reductions, construction errors, extreme
log-weights, the identities that define the _norm variants, and dreg_cv's training signal."""

from __future__ import annotations

import math

import pytest
import torch

from dreg.analytic import GaussianModel
from dreg.estimators import (
    CIWAE,
    ELBO,
    IWAE,
    MIWAE,
    PIWAE,
    DReGAlpha,
    DReGCV,
    DReGIWAE,
    DReGMIWAE,
    DReGPIWAE,
    DReGRWS,
    Estimator,
    estimator_by_name,
)
from tests.estimators.cases import ESTIMATORS, GROUPED, GROUPS, MIN_SAMPLES, NAMES

INF = math.inf


def fields(weights) -> dict[str, torch.Tensor]:
    return {k: getattr(weights, k) for k in ("objective", "model", "path", "score")}


# -- K = 1 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "same_as"), [("iwae", "vae"), ("dreg_iwae", "stl")])
def test_k1_reductions(name, same_as):
    draw = GaussianModel.default().draw(1, num_draws=4, seed=0)
    weights = ESTIMATORS[name]().double()(draw.particles.log_w)
    other = ESTIMATORS[same_as]().double()(draw.particles.log_w)
    for key, value in fields(weights).items():
        assert torch.equal(value, fields(other)[key]), key
    for got, want in zip(draw.gradients(weights), draw.gradients(other), strict=True):
        assert torch.equal(got, want)


def test_k1_dreg_rws_inference_gradient_is_exactly_zero():
    draw = GaussianModel.default().draw(1, num_draws=4, seed=0)
    weights = DReGRWS().double()(draw.particles.log_w)
    assert weights.path.eq(0).all() and weights.score.eq(0).all()
    _, inference = draw.gradients(weights)
    assert inference.eq(0).all()


# -- construction ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_too_few_samples_raise_with_the_config_fix(name):
    min_samples = MIN_SAMPLES.get(name, 1)
    estimator = ESTIMATORS[name]()
    assert estimator.min_samples == min_samples
    estimator(torch.zeros(min_samples, 3))  # enough samples: no error
    if name in GROUPED:  # K = 1 is not a multiple of M: the groups message
        match = rf"'{name}' splits .* estimator.groups={GROUPS} .* model.num_samples=1 is not"
    else:
        match = rf"'{name}' needs K >= {min_samples}, got K=1"
    if min_samples > 1:
        with pytest.raises(ValueError, match=match):
            estimator(torch.zeros(1, 3))


@pytest.mark.parametrize("name", GROUPED)
def test_k_not_a_multiple_of_groups_is_refused_in_one_line(name):
    estimator = estimator_by_name(name)  # the default M = 8
    estimator(torch.zeros(16, 3))
    for k in (4, 12):
        with pytest.raises(ValueError) as raised:
            estimator(torch.zeros(k, 3))
        message = str(raised.value)
        assert "\n" not in message
        assert "estimator.groups=8" in message and f"model.num_samples={k} " in message


@pytest.mark.parametrize("groups", [0, -2, 2.5, True])
def test_groups_must_be_a_positive_integer(groups):
    with pytest.raises(ValueError, match=rf"estimator.groups={groups}: miwae needs an integer"):
        MIWAE(groups=groups)


@pytest.mark.parametrize("beta", [-0.1, 1.5])
def test_ciwae_rejects_beta_outside_unit_interval(beta):
    with pytest.raises(ValueError, match=r"estimator.beta in \[0, 1\]"):
        CIWAE(beta=beta)


# -- Rainforth et al.'s estimators at the ends of their parameter ranges -------------------
def reduction_cases():
    """(estimator, same as, fields that must be equal): M = 1 is IWAE_K, M = K is the ELBO;
    CIWAE's beta = 0 is IWAE and beta = 1 the ELBO; their DReG forms reduce likewise."""
    every = ("objective", "model", "path", "score")
    return [
        (MIWAE(groups=1), IWAE(), every),
        (MIWAE(groups=8), ELBO(), every),
        (PIWAE(groups=1), IWAE(), every),
        (CIWAE(beta=0.0), IWAE(), every),
        (CIWAE(beta=1.0), ELBO(), every),
        (DReGMIWAE(groups=1), DReGIWAE(), every),
        (DReGPIWAE(groups=1), DReGIWAE(), every),
        (DReGPIWAE(groups=4), DReGMIWAE(groups=4), ("path", "score")),
        (PIWAE(groups=4), IWAE(), ("objective", "model")),
    ]


@pytest.mark.parametrize("case", range(len(reduction_cases())))
def test_rainforth_reductions(case):
    estimator, same_as, keys = reduction_cases()[case]
    log_w = GaussianModel.default().draw(8, num_draws=3, seed=7).particles.log_w
    got, want = fields(estimator.double()(log_w)), fields(same_as.double()(log_w))
    for key in keys:
        torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-14, msg=key)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_dreg_alpha_rejects_alpha_outside_unit_interval(alpha):
    with pytest.raises(ValueError, match=r"needs a number in \[0, 1\]"):
        DReGAlpha(alpha=alpha)


@pytest.mark.parametrize(("alpha", "family"), [(0.0, "iwae"), (1.0, "rws"), (0.9, "mixed")])
def test_dreg_alpha_family(alpha, family):
    assert DReGAlpha(alpha=alpha).family == family


def test_wrong_shape_raises():
    with pytest.raises(ValueError, match=r"shape \[K, B\]"):
        ESTIMATORS["iwae"]()(torch.zeros(3, 2, 1))


# -- extreme log-weights --------------------------------------------------------------------
def extreme_log_weights(dtype: torch.dtype, with_inf: bool) -> torch.Tensor:
    """``[8, 3]``: columns spread over 1e4 nats; optionally one -inf sample per column."""
    log_w = torch.tensor([0.0, -1e4, -3.0, -5e3, 2.0, -1e4 + 1, -7.0, -9e3], dtype=dtype)
    log_w = torch.stack([log_w - 100, log_w.flip(0) + 50, log_w.roll(3)], dim=1)
    if with_inf:
        log_w[[6, 1, 0], [0, 1, 2]] = -INF
    return log_w


@pytest.mark.parametrize("with_inf", [False, True], ids=["spread", "minus_inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", NAMES)
def test_extreme_log_weights_give_finite_coefficients(name, dtype, with_inf):
    estimator = ESTIMATORS[name]().to(dtype)
    weights = estimator(extreme_log_weights(dtype, with_inf))
    for key, value in fields(weights).items():
        if key == "objective" and name in ("vae", "ciwae") and with_inf:
            # The ELBO of a draw containing a zero-weight sample is -inf: reported truthfully.
            assert value.eq(-INF).all()
            continue
        assert torch.isfinite(value).all(), key
    if weights.aux_loss is not None:
        assert torch.isfinite(weights.aux_loss)


# -- the _norm variants ---------------------------------------------------------------------
def test_norm_variants_rescale_their_unnormalized_forms():
    """dreg_iwae_norm = ESS * dreg_iwae and dreg_rws_norm = dreg_rws / (1 - 1/ESS), per draw,
    with ESS = 1 / sum_k w~_k^2 (the documented definitions)."""
    log_w = GaussianModel.default().draw(16, num_draws=5, seed=4).particles.log_w
    inv_ess = torch.softmax(log_w, 0).square().sum(0)  # [B]
    dreg, norm = DReGIWAE().double()(log_w), ESTIMATORS["dreg_iwae_norm"]().double()(log_w)
    assert torch.allclose(norm.path, dreg.path / inv_ess, atol=1e-12)
    rws, rws_norm = DReGRWS().double()(log_w), ESTIMATORS["dreg_rws_norm"]().double()(log_w)
    assert torch.allclose(rws_norm.path, rws.path / (1 - inv_ess), atol=1e-12)
    assert torch.allclose(norm.path.sum(0), torch.ones_like(inv_ess))
    assert torch.allclose(rws_norm.path.sum(0), torch.ones_like(inv_ess))


# -- dreg_cv --------------------------------------------------------------------------------
def test_dreg_cv_beta_one_is_dreg_iwae():
    log_w = GaussianModel.default().draw(8, num_draws=3, seed=5).particles.log_w
    cv = DReGCV(beta=1.0, learn=False).double()(log_w)
    dreg = DReGIWAE().double()(log_w)
    assert cv.aux_loss is None
    assert torch.allclose(cv.path, dreg.path) and torch.allclose(cv.score, dreg.score)


def test_dreg_cv_aux_loss_trains_only_its_coefficients():
    estimator = DReGCV().double()
    draw = GaussianModel.default().draw(8, num_draws=3, seed=6)
    weights = estimator(draw.particles.log_w)
    assert weights.aux_loss is not None and weights.aux_loss.dim() == 0
    for tensor in (weights.model, weights.path, weights.score, weights.objective):
        assert not tensor.requires_grad  # coefficients stay detached
    weights_before = [p.detach().clone() for p in estimator.parameters()]
    optimizer = torch.optim.SGD(estimator.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        aux = estimator(draw.particles.log_w).aux_loss
        aux.backward()
        losses.append(aux.item())
        optimizer.step()
    assert losses[-1] < losses[0]
    assert any(
        not torch.equal(a, b) for a, b in zip(weights_before, estimator.parameters(), strict=True)
    )


def test_estimators_are_modules_with_names():
    for name in NAMES:
        estimator = ESTIMATORS[name]()
        assert isinstance(estimator, Estimator) and estimator.name == name
        assert estimator.family in ("iwae", "rws", "jvi", "mixed", "miwae", "ciwae", "piwae")
        if estimator.family != "mixed":  # the bias check's reference: an estimator's name
            assert estimator.family in ESTIMATORS


@pytest.mark.parametrize(("name", "reference"), [("dreg_miwae", "miwae"), ("dreg_piwae", "piwae")])
def test_grouped_dreg_reference_is_its_base_with_the_same_groups(name, reference):
    estimator = estimator_by_name(name, groups=4)
    assert estimator.family == reference and estimator.needs_independent_samples
    base = estimator_by_name(estimator.family, **estimator.reference_params())
    assert base.name == reference and base.groups == 4
