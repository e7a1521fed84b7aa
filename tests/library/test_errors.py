"""Bad input to the library gets one clear line naming the problem and the fix; a distribution
type added with ``register_proposal`` gets the DReG gradient."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Independent, Laplace, Normal

from dreg import library
from dreg.library import (
    antithetic_noise,
    make_particles,
    monte_carlo_objective,
    register_proposal,
)

K, B, D = 4, 3, 2


def gaussian(batch_shape=(B, D), event_ndims: int = 1):
    loc = torch.zeros(batch_shape, dtype=torch.float64, requires_grad=True)
    return Independent(Normal(loc, torch.ones_like(loc)), event_ndims)


def log_joint(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * z.square().sum(-1)  # [K, B]


def one_line_error(error_type, match: str, call):
    with pytest.raises(error_type, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize(
    "proposal",
    [
        Bernoulli(probs=torch.full((B,), 0.3)),
        Categorical(logits=torch.zeros(B, 5)),
        Independent(Bernoulli(probs=torch.full((B, D), 0.3)), 1),
    ],
    ids=["Bernoulli", "Categorical", "Independent-Bernoulli"],
)
def test_non_reparameterizable_proposal(proposal):
    message = one_line_error(
        TypeError, "cannot be reparameterized", lambda: make_particles(proposal, log_joint, K)
    )
    assert "has_rsample" in message and type(proposal).__name__ in message


def test_unsupported_distribution_names_what_is_needed_and_the_fix():
    proposal = Laplace(torch.zeros(B), torch.ones(B))
    message = one_line_error(
        TypeError,
        "no rule to stop the parameters of a Laplace proposal",
        lambda: monte_carlo_objective(proposal, lambda z: -z.abs(), K),
    )
    assert "has_rsample" in message and "register_proposal(Laplace" in message


@pytest.mark.parametrize(
    ("bad_log_joint", "got"),
    [
        (lambda z: -0.5 * z.square(), r"\[4, 3, 2\]"),  # forgot to sum over the event dims
        (lambda z: -0.5 * z.square().sum((0, -1)), r"\[3\]"),  # summed over K as well
        (lambda z: z.detach().sum().item(), "float"),
    ],
    ids=["unsummed-event", "summed-over-K", "not-a-tensor"],
)
def test_log_joint_of_the_wrong_shape(bad_log_joint, got):
    message = one_line_error(
        ValueError,
        f"log_joint returned {got}",
        lambda: make_particles(gaussian(), bad_log_joint, K),
    )
    assert "[K, B] = [4, 3]" in message and "event dims [2]" in message


@pytest.mark.parametrize(
    ("batch_shape", "match"),
    [
        ((B, D), r"got \[3, 2\]; wrap it in Independent\(q, 1\)"),  # Independent forgotten
        ((), r"got \[\]; give its parameters a leading batch dim of size 1"),
    ],
    ids=["extra-dims", "no-batch-dim"],
)
def test_batch_shape_must_be_one_dim_per_data_point(batch_shape, match):
    proposal = Normal(torch.zeros(batch_shape), torch.ones(batch_shape))
    one_line_error(
        ValueError,
        r"batch shape must be \[B\].*" + match,
        lambda: make_particles(proposal, log_joint, K),
    )


def test_proposal_must_be_a_distribution():
    one_line_error(
        TypeError,
        "must be a torch.distributions.Distribution, got Tensor",
        lambda: make_particles(torch.zeros(B, D), log_joint, K),
    )


def test_noise_of_the_wrong_shape():
    one_line_error(
        ValueError,
        r"noise has shape \[4, 3\].*\[4, 3, 2\]",
        lambda: make_particles(gaussian(), log_joint, K, noise=torch.zeros(K, B)),
    )


@pytest.mark.parametrize("num_samples", [0, 2.0, True])
def test_num_samples_must_be_a_positive_integer(num_samples):
    one_line_error(
        ValueError,
        "K must be an integer >= 1",
        lambda: make_particles(gaussian(), log_joint, num_samples),
    )


def test_estimator_errors():
    one_line_error(
        ValueError,
        "unknown estimator 'dreg'",
        lambda: monte_carlo_objective(gaussian(), log_joint, K, "dreg"),
    )
    one_line_error(
        ValueError,
        "estimator 'jvi' needs num_samples >= 2, got 1",
        lambda: monte_carlo_objective(gaussian(), log_joint, 1, "jvi"),
    )
    one_line_error(  # K = 12 in M = 8 groups: refused before any model pass
        ValueError,
        "estimator 'miwae' splits .* estimator.groups=8 .* model.num_samples=12 is not",
        lambda: monte_carlo_objective(gaussian(), log_joint, 12, "miwae"),
    )
    one_line_error(
        ValueError,
        "'dreg_cv' learns its own parameters.*optimizer",
        lambda: monte_carlo_objective(gaussian(), log_joint, K, "dreg_cv"),
    )
    one_line_error(
        TypeError,
        "estimator must be a name",
        lambda: monte_carlo_objective(gaussian(), log_joint, K, 3),
    )


def test_antithetic_noise_is_refused_for_dreg_and_needs_even_k():
    one_line_error(
        ValueError,
        "'dreg_iwae' needs independent samples",
        lambda: monte_carlo_objective(gaussian(), log_joint, K, noise=antithetic_noise),
    )
    one_line_error(
        ValueError,
        "even K, got K=3",
        lambda: monte_carlo_objective(gaussian(), log_joint, 3, "iwae", noise=antithetic_noise),
    )
    z = make_particles(gaussian(), log_joint, K, noise=antithetic_noise).z_for_p.detach()
    assert torch.equal(z[: K // 2], -z[K // 2 :]) and not torch.equal(z[0], z[1])


def test_registered_distribution_gets_the_dreg_gradient(monkeypatch):
    """A Laplace proposal after ``register_proposal``: the inference gradient of dreg_iwae is
    sum_k w~_k^2 d/dz (log p - log q(.; stop phi)) dz/dphi, recomputed here on the same draw."""
    monkeypatch.setattr(library, "_RULES", dict(library._RULES))  # leave the table unchanged
    register_proposal(Laplace, lambda q: Laplace(q.loc.detach(), q.scale.detach()))
    loc = torch.tensor([0.3, -0.2, 1.0], dtype=torch.float64, requires_grad=True)
    log_scale = torch.tensor([0.1, -0.4, 0.2], dtype=torch.float64, requires_grad=True)

    def target(z):  # an unnormalized Gaussian log-joint, [K, B]
        return -0.5 * (z - 0.5) ** 2

    torch.manual_seed(11)
    monte_carlo_objective(Laplace(loc, log_scale.exp()), target, K, "dreg_iwae").loss.backward()
    torch.manual_seed(11)  # the same uniform noise, a fresh graph
    q = Laplace(loc, log_scale.exp())
    z = q.rsample((K,))
    stopped = Laplace(loc.detach(), log_scale.detach().exp())
    log_w_path = target(z) - stopped.log_prob(z)
    w = torch.softmax((target(z) - q.log_prob(z)).detach(), 0)
    want = torch.autograd.grad((w**2 * log_w_path).sum(), [loc, log_scale])
    for got, expected in zip((loc.grad, log_scale.grad), want, strict=True):
        torch.testing.assert_close(got, -expected / B, rtol=1e-10, atol=1e-12)
    one_line_error(
        ValueError,
        "noise= needs a Gaussian proposal.*Laplace draws its own noise",
        lambda: make_particles(q, target, K, noise=torch.zeros(K, B)),
    )
    one_line_error(
        TypeError, "Bernoulli has no rsample", lambda: register_proposal(Bernoulli, lambda q: q)
    )
