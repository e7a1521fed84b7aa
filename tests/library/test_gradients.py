"""The one backward of ``monte_carlo_objective`` equals each estimator's definition.

For every estimator named in ``conf/estimator/*.yaml`` and five model/proposal combinations
(diagonal Normal with event shape (), (D,) and (H, W) and a learned prior; full-covariance
and low-rank Gaussian proposals with an MLP decoder), on the same noise and in float64:
model-parameter gradients equal autograd of the estimator's bound, inference-parameter
gradients equal a two-pass implementation of its definition (``tests/library/models.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributions import MultivariateNormal

from dreg.estimators import DReGCV, estimator_by_name
from dreg.library import detach_parameters, monte_carlo_objective
from tests.estimators.cases import PARAMS, naive_bound
from tests.library.models import DTYPE, MODELS, noise_shape, reference_gradients

ESTIMATOR_NAMES = sorted(
    path.stem for path in (Path(__file__).parents[2] / "conf" / "estimator").glob("*.yaml")
)
# Non-trivial control-variate values (exact in binary), so every term of dreg_cv is exercised.
CV_VALUES = {"alpha": 0.25, "beta": 0.625, "gamma": 0.125, "delta": -0.375}
K, B = 6, 4  # K >= 2 for jvi, dreg_jvi, dreg_rws_norm, dreg_cv; a multiple of miwae's groups
TOL = 1e-10


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> bool:
    return bool(((actual - expected).abs() <= tol * (1 + expected.abs())).all())


def estimator_arg(name: str):
    """The public API's argument: a config name, or an object for the learned ``dreg_cv`` and
    for the estimators whose test parameters differ from their defaults (miwae's groups)."""
    if name == "dreg_cv":
        return DReGCV(**CV_VALUES).double()
    if name in PARAMS and name != "dreg_alpha":  # dreg_alpha: the default alpha, by name
        return estimator_by_name(name, **PARAMS[name]).double()
    return name


def setup(model_name: str, seed: int = 3):
    model = MODELS[model_name]()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((B, model.data_dim), generator=gen, dtype=DTYPE)
    eps = torch.randn((K, *noise_shape(model, B)), generator=gen, dtype=DTYPE)
    return model, x, eps


def library_gradients(model, x, eps, estimator):
    """``(result, model grads, inference grads)`` after one backward of the library's loss."""
    model.zero_grad(set_to_none=True)
    result = monte_carlo_objective(
        model.proposal(x), lambda z: model.log_joint(x, z), K, estimator, noise=eps
    )
    result.loss.backward()
    grads = [
        [p.grad.clone() for p in group]
        for group in (model.model_parameters(), model.inference_parameters())
    ]
    return result, *grads


def test_every_config_estimator_is_covered():
    assert len(ESTIMATOR_NAMES) == 17 and {"dreg_iwae", "dreg_cv", "vae"} <= set(ESTIMATOR_NAMES)
    assert {"miwae", "ciwae", "piwae", "dreg_miwae", "dreg_piwae"} <= set(ESTIMATOR_NAMES)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("name", ESTIMATOR_NAMES)
def test_one_backward_equals_two_pass_definition(name, model_name):
    model, x, eps = setup(model_name)
    result, model_grads, inference_grads = library_gradients(model, x, eps, estimator_arg(name))
    want_model, want_inference = reference_gradients(name, model, x, eps, cv=CV_VALUES)
    # The loss is the negated batch mean of the objective: gradients are -1/B of the sums.
    for got, want in zip(model_grads, want_model, strict=True):
        assert close(got, -want / B)
    for got, want in zip(inference_grads, want_inference, strict=True):
        assert close(got, -want / B)
    # The logged value is the estimator's bound on these samples, not the surrogate.
    params = model.proposal_params(x)
    z = model.reparameterize(params, eps)
    log_w = (model.log_joint(x, z) - model.log_q(params, z)).detach()
    assert close(result.objective, naive_bound(name, log_w))
    assert result.objective.shape == (B,) and not result.objective.requires_grad


@pytest.mark.parametrize("model_name", ["linear_diag", "mlp_mvn", "mlp_lowrank"])
def test_dreg_model_gradient_is_exactly_the_bound_gradient(model_name):
    """The TFP trap: DReG's w~^2 belongs to the inference path only. Every DReG estimator
    gives the model parameters exactly the gradient of its base bound (IWAE; the jackknife
    for dreg_jvi, MIWAE for dreg_miwae), bitwise, on the same noise."""
    model, x, eps = setup(model_name, seed=5)
    dreg_names = [n for n in ESTIMATOR_NAMES if n.startswith("dreg_")]
    grads = {n: library_gradients(model, x, eps, estimator_arg(n))[1] for n in dreg_names}
    for base in ("iwae", "jvi", "miwae"):
        grads[base] = library_gradients(model, x, eps, estimator_arg(base))[1]
    for name in dreg_names:
        base = {"dreg_jvi": "jvi", "dreg_miwae": "miwae"}.get(name, "iwae")
        assert all(torch.equal(a, b) for a, b in zip(grads[name], grads[base], strict=True))

    # The trap is measurable: sum_k w~_k^2 d/dtheta log p (TFP's DREG model gradient) is far
    # from the IWAE model gradient sum_k w~_k d/dtheta log p that the library applies.
    params = tuple(p.detach() for p in model.proposal_params(x))
    z = model.reparameterize(params, eps)
    log_p = model.log_joint(x, z)
    w = torch.softmax((log_p - model.log_q(params, z)).detach(), 0)
    iwae = torch.autograd.grad((w * log_p).sum(), model.model_parameters(), retain_graph=True)
    trap = torch.autograd.grad((w**2 * log_p).sum(), model.model_parameters())
    flat = [torch.cat([g.reshape(-1) for g in gs]) for gs in (grads["iwae"], iwae, trap)]
    applied, iwae_flat, trap_flat = flat
    assert close(applied, -iwae_flat / B)
    assert (trap_flat - iwae_flat).norm() > 0.05 * iwae_flat.norm()


def test_learned_control_variates_get_their_own_gradient():
    """dreg_cv's aux_loss rides on the same backward: its coefficients receive a gradient,
    the model and proposal gradients stay those of the estimator (checked above)."""
    model, x, eps = setup("linear_diag")
    estimator = DReGCV(**CV_VALUES).double()
    library_gradients(model, x, eps, estimator)
    assert all(p.grad is not None and p.grad.abs() > 0 for p in estimator.parameters())


def test_train_model_false_leaves_a_frozen_model_untouched():
    model, x, eps = setup("mlp_mvn")
    _, _, want_inference = library_gradients(model, x, eps, "dreg_iwae")
    for p in model.model_parameters():
        p.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    monte_carlo_objective(
        model.proposal(x), lambda z: model.log_joint(x, z), K, noise=eps, train_model=False
    ).loss.backward()
    for p, want in zip(model.inference_parameters(), want_inference, strict=True):
        assert close(p.grad, want)
    assert all(p.grad is None for p in model.model_parameters())


@pytest.mark.parametrize("parameterization", ["covariance_matrix", "precision_matrix"])
def test_mvn_from_covariance_or_precision_gives_the_scale_tril_gradients(parameterization):
    """Stopping rebuilds a MultivariateNormal from (loc, scale_tril) however it was built: the
    same distribution must give the same gradients (to float64 rounding of the Cholesky)."""
    model, x, eps = setup("mlp_mvn")
    _, want_model, want_inference = library_gradients(model, x, eps, "dreg_iwae")

    def rebuilt(params):
        loc, tril = params
        cov = tril @ tril.transpose(-1, -2)
        matrix = cov if parameterization == "covariance_matrix" else torch.linalg.inv(cov)
        return MultivariateNormal(loc, **{parameterization: matrix})

    model.distribution = rebuilt
    _, got_model, got_inference = library_gradients(model, x, eps, "dreg_iwae")
    for got, want in zip([*got_model, *got_inference], [*want_model, *want_inference], strict=True):
        assert close(got, want, tol=1e-8)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_detach_parameters_rebuilds_the_same_distribution_without_gradient(model_name):
    model, x, eps = setup(model_name)
    proposal = model.proposal(x)
    stopped = detach_parameters(proposal)
    z = model.reparameterize(model.proposal_params(x), eps).detach()
    assert type(stopped) is type(proposal) and stopped.batch_shape == proposal.batch_shape
    assert close(stopped.log_prob(z), proposal.log_prob(z).detach())
    assert proposal.log_prob(z).requires_grad and not stopped.log_prob(z).requires_grad
