"""Generalized DReG (Bauer & Mnih 2021) for q(z1 | x) q(z2 | z1), on a two-layer linear-Gaussian
model whose posterior is known exactly (``tests/hierarchical/models.py``), float64.

What it guards against: the common implementation stops q(z2 | z1) by detaching the tensors
mu2(z1), sigma2(z1), which drops d log q(z2 | z1) / d z1. At the exact posterior the correct
DReG inference gradient is zero for every draw, the naive one is not; on the same noise the
correct one is unbiased for IWAE's gradient, the naive one is measurably biased at K = 4.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Independent, Normal

from dreg.estimators import DReGCV, DReGIWAE, routed_loss
from dreg.library import (
    HierarchicalProposal,
    make_hierarchical_particles,
    make_particles,
    monte_carlo_objective,
)
from tests.estimators.cases import ZERO_AT_POSTERIOR, naive_bound
from tests.hierarchical.models import (
    DTYPE,
    LinearGaussianTwoLayer,
    full_log_q,
    reference_particles,
)
from tests.library.models import inference_surrogate
from tests.library.test_gradients import CV_VALUES, ESTIMATOR_NAMES, estimator_arg

K, B = 6, 4  # K: a multiple of the grouped estimators' test groups (tests/estimators/cases.py)
COVARIANCES = ["tril", "diag"]


def setup(covariance: str, perturb: float = 0.0, seed: int = 3):
    """Model, exact (or perturbed) layers, x ``[B, Dx]`` and noise ``[K, B, D1 + D2]``."""
    diagonal = covariance == "diag"  # a diagonal posterior needs diagonal A and C
    model = LinearGaussianTwoLayer((2, 2, 2) if diagonal else (3, 2, 2), diagonal=diagonal)
    layer1, layer2 = model.exact_layers(covariance, perturb=perturb)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((B, model.data_dim), generator=gen, dtype=DTYPE)
    eps = torch.randn((K, B, model.dim1 + model.dim2), generator=gen, dtype=DTYPE)
    return model, layer1, layer2, x, eps


def proposal(layer1, layer2, x) -> HierarchicalProposal:
    return HierarchicalProposal([lambda: layer1(x), layer2])


def inference_grads(layer1, layer2) -> list[torch.Tensor]:
    return [p.grad.clone() for layer in (layer1, layer2) for p in layer.parameters()]


def library_grads(model, layer1, layer2, x, eps, estimator):
    for module in (model, layer1, layer2):
        module.zero_grad(set_to_none=True)
    result = monte_carlo_objective(
        proposal(layer1, layer2, x), lambda z: model.log_joint(x, z), K, estimator, noise=eps
    )
    result.loss.backward()
    return (
        result,
        [p.grad.clone() for p in model.model_parameters()],
        inference_grads(layer1, layer2),
    )


def max_abs(grads: list[torch.Tensor]) -> float:
    return max(g.abs().max().item() for g in grads)


# -- the exact posterior: zero for every draw -----------------------------------------------------
@pytest.mark.parametrize("covariance", COVARIANCES)
def test_exact_posterior_generalized_dreg_is_zero_naive_and_iwae_are_not(covariance):
    model, layer1, layer2, x, eps = setup(covariance)
    result, _, generalized = library_grads(model, layer1, layer2, x, eps, "dreg_iwae")
    # q is the posterior: log w_k = log p(x) for every sample (the model is set up right).
    assert (result.particles.log_w - model.log_marginal(x)).abs().max() < 1e-12
    assert max_abs(generalized) <= 1e-12

    # The naive stop (tensors mu2(z1), sigma2(z1) detached) on the same noise is not zero.
    for layer in (layer1, layer2):
        layer.zero_grad(set_to_none=True)
    naive = reference_particles(model, layer1, layer2, x, eps, stop="tensors")
    routed_loss(naive, DReGIWAE()(naive.log_w)).backward()
    naive_grads = inference_grads(layer1, layer2)
    assert max_abs(naive_grads) > 1e-3
    # Exactly what it drops: layer 2's own gradient is right, layer 1's (through z1) is not.
    assert max_abs(naive_grads[len(list(layer1.parameters())) :]) <= 1e-12

    # IWAE keeps the score term, which is zero only in expectation.
    _, _, iwae = library_grads(model, layer1, layer2, x, eps, "iwae")
    assert max_abs(iwae) > 1e-2


@pytest.mark.parametrize("name", ZERO_AT_POSTERIOR)
def test_exact_posterior_every_score_free_estimator_is_zero(name):
    model, layer1, layer2, x, eps = setup("tril")
    _, _, grads = library_grads(model, layer1, layer2, x, eps, estimator_arg(name))
    assert max_abs(grads) <= 1e-12


# -- every estimator: one backward equals its two-pass definition ---------------------------------
@pytest.mark.parametrize("covariance", COVARIANCES)
def test_library_particles_equal_the_reference(covariance):
    model, layer1, layer2, x, eps = setup(covariance, perturb=0.3)
    got = make_hierarchical_particles(
        proposal(layer1, layer2, x), lambda z: model.log_joint(x, z), K, noise=eps
    )
    want = reference_particles(model, layer1, layer2, x, eps)
    for field in ("log_p", "log_q_stopped", "log_q_stop_z", "z_for_p"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=0, atol=1e-12)


@pytest.mark.parametrize("covariance", COVARIANCES)
@pytest.mark.parametrize("name", ESTIMATOR_NAMES)
def test_one_backward_equals_two_pass_definition(name, covariance):
    """Model gradient: autograd of the bound with z fixed; inference gradient: autograd of
    each estimator's definition (``tests/library/models.py``) with log q stopped by a frozen
    copy of each layer (written without dreg.library's hierarchical code)."""
    model, layer1, layer2, x, eps = setup(covariance, perturb=0.3)
    result, model_grads, got_inference = library_grads(
        model, layer1, layer2, x, eps, estimator_arg(name)
    )
    reference = reference_particles(model, layer1, layer2, x, eps)
    z = reference.z_for_p
    # Model gradient: z fixed (it does not depend on theta), log q a constant.
    log_w_theta = model.log_joint(x, z.detach()) - full_log_q(layer1, layer2, x, z).detach()
    want_model = torch.autograd.grad(naive_bound(name, log_w_theta).sum(), model.model_parameters())
    log_p = model.log_joint(x, z)
    surrogate = inference_surrogate(
        name,
        log_w_full=log_p - full_log_q(layer1, layer2, x, z),
        log_w_path=log_p - reference.log_q_stopped,
        log_q_score=reference.log_q_stop_z,
        cv=CV_VALUES,
    )
    want_inference = torch.autograd.grad(surrogate, [*layer1.parameters(), *layer2.parameters()])
    # The loss is the negated batch mean: gradients are -1/B of the sums.
    for got, want in zip(
        [*model_grads, *got_inference], [*want_model, *want_inference], strict=True
    ):
        torch.testing.assert_close(got, -want / B, rtol=1e-10, atol=1e-12)
    want_objective = naive_bound(name, log_w_theta.detach())
    torch.testing.assert_close(result.objective, want_objective, rtol=0, atol=1e-12)


# -- unbiasedness, paired on the same noise -------------------------------------------------------
NUM_COPIES, UNBIASED_K, MAX_T = 50_000, 4, 4.0


def per_copy_gradients(covariance: str) -> dict[str, torch.Tensor]:
    """name -> ``[N, P]`` inference gradients, one row per copy of one data point (each copy
    has its own layer parameters, so one backward gives N independent estimates)."""
    diagonal = covariance == "diag"
    model = LinearGaussianTwoLayer((2, 2, 2) if diagonal else (3, 2, 2), diagonal=diagonal)
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn((1, model.data_dim), generator=gen, dtype=DTYPE).expand(NUM_COPIES, -1)
    noise_shape = (UNBIASED_K, NUM_COPIES, model.dim1 + model.dim2)
    eps = torch.randn(noise_shape, generator=gen, dtype=DTYPE)

    def gradients(loss_of_layers) -> torch.Tensor:
        layer1, layer2 = model.exact_layers(covariance, copies=NUM_COPIES, perturb=0.3)
        loss_of_layers(layer1, layer2).backward()
        params = [*layer1.parameters(), *layer2.parameters()]
        return torch.cat([-NUM_COPIES * p.grad.reshape(NUM_COPIES, -1) for p in params], 1)

    def library(name):
        def loss(layer1, layer2):
            return monte_carlo_objective(
                proposal(layer1, layer2, x),
                lambda z: model.log_joint(x, z),
                UNBIASED_K,
                name,
                noise=eps,
            ).loss

        return loss

    def naive(layer1, layer2):
        particles = reference_particles(model, layer1, layer2, x, eps, stop="tensors")
        return routed_loss(particles, DReGIWAE()(particles.log_w))

    grads = {name: gradients(library(name)) for name in ("iwae", "dreg_iwae", "jvi", "dreg_jvi")}
    grads["naive_dreg_iwae"] = gradients(naive)
    return grads


@pytest.fixture(scope="module", params=COVARIANCES)
def unbiased_gradients(request):
    return per_copy_gradients(request.param)


def max_t(diff: torch.Tensor) -> float:
    """Largest |mean| / standard error over the coordinates of the paired difference."""
    se = diff.std(0) / math.sqrt(diff.shape[0])
    return (diff.mean(0).abs() / se.clamp_min(1e-300)).max().item()


@pytest.mark.parametrize(("name", "reference"), [("dreg_iwae", "iwae"), ("dreg_jvi", "jvi")])
def test_generalized_dreg_is_unbiased_for_its_reference(unbiased_gradients, name, reference):
    assert max_t(unbiased_gradients[name] - unbiased_gradients[reference]) < MAX_T


def test_the_check_has_power_naive_dreg_is_biased(unbiased_gradients):
    assert max_t(unbiased_gradients["naive_dreg_iwae"] - unbiased_gradients["iwae"]) > MAX_T


# -- reductions -----------------------------------------------------------------------------------
def test_independent_second_layer_reduces_to_single_layer_dreg():
    """q(z2 | z1) that ignores z1: q(z1, z2) is one diagonal Gaussian over cat(z1, z2), and the
    generalized estimator must give single-layer DReG's gradients (every estimator)."""
    torch.manual_seed(0)
    model = LinearGaussianTwoLayer((3, 2, 2))
    x = torch.randn(B, 3, dtype=DTYPE)
    eps = torch.randn(K, B, 4, dtype=DTYPE)
    encoder = torch.nn.Linear(3, 4, dtype=DTYPE)  # q(z1 | x): loc and log-scale
    loc2 = torch.nn.Parameter(torch.randn(2, dtype=DTYPE))
    log_scale2 = torch.nn.Parameter(0.3 * torch.randn(2, dtype=DTYPE))

    class Independent2(torch.nn.Module):  # q(z2 | z1) = N(loc2, scale2^2), batch [B]
        def __init__(self):
            super().__init__()
            self.loc, self.log_scale = loc2, log_scale2

        def forward(self, z1):
            shape = (z1.shape[-2], 2)
            return Independent(
                Normal(self.loc.expand(shape), self.log_scale.exp().expand(shape)), 1
            )

    def q1():
        loc, log_scale = encoder(x).chunk(2, -1)
        return Independent(Normal(loc, log_scale.exp()), 1)

    def single():  # the same Gaussian, one layer over cat(z1, z2)
        first = q1().base_dist
        loc = torch.cat([first.loc, loc2.expand(B, 2)], -1)
        scale = torch.cat([first.scale, log_scale2.exp().expand(B, 2)], -1)
        return Independent(Normal(loc, scale), 1)

    params = [*encoder.parameters(), loc2, log_scale2]
    for name in ESTIMATOR_NAMES:
        grads = []
        for build in (lambda: HierarchicalProposal([q1, Independent2()]), single):
            for p in params:
                p.grad = None
            monte_carlo_objective(
                build(), lambda z: model.log_joint(x, z), K, estimator_arg(name), noise=eps
            ).loss.backward()
            grads.append([p.grad for p in params])
        for got, want in zip(*grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_dreg_rws_inference_gradient_is_zero_at_k1():
    """K = 1: w~ = 1, so DReG-RWS's coefficient w~ - w~^2 is 0 and so is its gradient."""
    model, layer1, layer2, x, eps = setup("tril", perturb=0.3)
    for layer in (layer1, layer2):
        layer.zero_grad(set_to_none=True)
    monte_carlo_objective(
        proposal(layer1, layer2, x), lambda z: model.log_joint(x, z), 1, "dreg_rws", noise=eps[:1]
    ).loss.backward()
    assert all(torch.equal(g, torch.zeros_like(g)) for g in inference_grads(layer1, layer2))


def test_dreg_cv_learns_its_coefficients_through_a_hierarchical_proposal():
    model, layer1, layer2, x, eps = setup("tril", perturb=0.3)
    estimator = DReGCV(**CV_VALUES).double()
    library_grads(model, layer1, layer2, x, eps, estimator)
    assert all(p.grad is not None and p.grad.abs() > 0 for p in estimator.parameters())


def test_single_layer_list_is_make_particles():
    """A one-layer hierarchy is an ordinary proposal: the same particles as make_particles."""
    model, layer1, _, x, eps = setup("diag", perturb=0.3)
    layer1_eps = eps[..., : model.dim1]

    def log_joint(z):
        return model.log_joint(x, torch.cat([z, z], -1))

    got = make_hierarchical_particles([lambda: layer1(x)], log_joint, K, noise=layer1_eps)
    want = make_particles(layer1(x), log_joint, K, noise=layer1_eps)
    for field in ("log_p", "log_q_stopped", "log_q_stop_z", "z_for_p"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
