"""The library's hierarchical proposals: the factory contract (modules, closures with
``module=``), any number of layers and Gaussian types, the noise argument, and one-line errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.distributions import (
    Independent,
    Laplace,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
)

from dreg.library import (
    HierarchicalProposal,
    make_hierarchical_particles,
    make_particles,
    monte_carlo_objective,
    particles_from_draws,
)

K, B, D = 4, 3, 2
DTYPE = torch.float64


def one_line_error(error_type, match: str, call) -> str:
    with pytest.raises(error_type, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


class GaussianLayer(nn.Module):
    """z_prev -> N(f(z_prev)) with a small tanh network; ``kind`` picks the Gaussian type."""

    def __init__(self, in_dim: int, out_dim: int, kind: str = "diag", seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.kind, self.out_dim = kind, out_dim
        extra = {"diag": out_dim, "tril": out_dim * out_dim, "lowrank": 2 * out_dim}[kind]
        self.net = nn.Sequential(nn.Linear(in_dim, 5), nn.Tanh(), nn.Linear(5, out_dim + extra))
        self.net.to(DTYPE)

    def forward(self, z_prev):
        out = self.net(z_prev)
        loc, rest = out[..., : self.out_dim], out[..., self.out_dim :]
        if self.kind == "diag":
            return Independent(Normal(loc, nn.functional.softplus(rest) + 0.3), 1)
        if self.kind == "tril":
            raw = rest.reshape(*rest.shape[:-1], self.out_dim, self.out_dim)
            diag = nn.functional.softplus(raw.diagonal(dim1=-2, dim2=-1)) + 0.3
            return MultivariateNormal(loc, scale_tril=raw.tril(-1) + torch.diag_embed(diag))
        factor = rest[..., : self.out_dim].unsqueeze(-1)  # rank 1
        return LowRankMultivariateNormal(
            loc, factor, nn.functional.softplus(rest[..., self.out_dim :]) + 0.3
        )


def data(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, generator=gen, dtype=DTYPE)


def sum_log_joint(z):
    return -0.5 * (z - 0.3).square().sum(-1)


def chain(kinds=("diag", "diag"), dims=(D, D)):
    """A first layer q(z1 | x) and conditional module layers of the given kinds."""
    x = data()
    first = GaussianLayer(3, dims[0], kinds[0], seed=10)
    rest = [GaussianLayer(dims[i - 1], dims[i], kinds[i], seed=10 + i) for i in range(1, len(dims))]
    return x, first, rest


def proposal_params(first, rest):
    return [p for layer in (first, *rest) for p in layer.parameters()]


# -- the contract ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kinds", [("diag", "diag", "diag"), ("tril", "lowrank", "diag"), ("diag", "tril", "lowrank")]
)
def test_three_layers_of_any_gaussian_stop_parameters_not_z(kinds):
    """log_q_stopped equals frozen copies of the layers evaluated along the live samples: its
    gradient reaches phi only through z (every z_i, z_{i-1} inside q(z_i | z_{i-1}) too)."""
    x, first, rest = chain(kinds, dims=(2, 3, 2))
    torch.manual_seed(0)
    particles = make_hierarchical_particles(
        [lambda: first(x), *rest], sum_log_joint, K
    )  # default noise: one standard-normal draw per sample and noise coordinate
    z = particles.z_for_p
    assert z.shape == (K, B, 7) and particles.log_q_stopped.shape == (K, B)
    torch.testing.assert_close(particles.log_q_stopped, particles.log_q_stop_z, rtol=0, atol=1e-12)

    frozen = [copy.deepcopy(layer).requires_grad_(False) for layer in (first, *rest)]
    z1, z2, z3 = z.split([2, 3, 2], -1)
    want = (
        frozen[0](x).log_prob(z1) + frozen[1](z1).log_prob(z2) + frozen[2](z2).log_prob(z3)
    ).sum()
    params = proposal_params(first, rest)
    got_grads = torch.autograd.grad(particles.log_q_stopped.sum(), params, retain_graph=True)
    want_grads = torch.autograd.grad(want, params, retain_graph=True)
    for got, expected in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # The score term holds every z fixed: its gradient is the parameters' own.
    z_fixed = [t.detach() for t in (z1, z2, z3)]
    score = (
        first(x).log_prob(z_fixed[0])
        + rest[0](z_fixed[0]).log_prob(z_fixed[1])
        + rest[1](z_fixed[1]).log_prob(z_fixed[2])
    ).sum()
    got_grads = torch.autograd.grad(particles.log_q_stop_z.sum(), params)
    for got, expected in zip(got_grads, torch.autograd.grad(score, params), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_closures_with_module_equal_module_layers():
    x, first, (second,) = chain()
    owner = nn.ModuleDict({"first": first, "second": second})
    eps = torch.randn(K, B, 2 * D, dtype=DTYPE)
    grads = []
    for proposal in (
        [lambda: first(x), second],
        HierarchicalProposal([lambda: first(x), lambda z1: second(z1)], module=owner),
        HierarchicalProposal([lambda: first(x), second], module=second),
    ):
        owner.zero_grad(set_to_none=True)
        monte_carlo_objective(proposal, sum_log_joint, K, noise=eps).loss.backward()
        grads.append([p.grad.clone() for p in owner.parameters()])
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other, strict=True))


def test_noise_tensor_is_split_in_layer_order_and_sampler_called_per_layer():
    x, first, rest = chain(("diag", "lowrank"), dims=(2, 3))
    eps = torch.randn(K, B, 2 + 3 + 1, dtype=DTYPE)  # z1: 2; z2 low-rank: rank 1 + 3
    particles = make_hierarchical_particles([lambda: first(x), *rest], sum_log_joint, K, eps)
    q1 = first(x).base_dist
    torch.testing.assert_close(particles.z_for_p[..., :2], q1.loc + q1.scale * eps[..., :2])

    shapes = []

    def spy(shape, dtype, device):
        shapes.append(list(shape))
        return torch.randn(shape, dtype=dtype, device=device)

    make_hierarchical_particles([lambda: first(x), *rest], sum_log_joint, K, noise=spy)
    assert shapes == [[K, B, 2], [K, B, 4]]


def test_a_conditional_layer_may_ignore_z_prev_with_batch_shape_b():
    x, first, _ = chain()
    loc = nn.Parameter(torch.zeros(B, D, dtype=DTYPE))

    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.loc = loc

        def forward(self, z_prev):
            return Independent(Normal(self.loc, torch.ones_like(self.loc)), 1)

    particles = make_hierarchical_particles([lambda: first(x), Fixed()], sum_log_joint, K)
    assert particles.z_for_p.shape == (K, B, 2 * D)


# -- errors ---------------------------------------------------------------------------------------
def test_layer_list_errors():
    x, first, (second,) = chain()
    one_line_error(ValueError, "non-empty list of layers", lambda: HierarchicalProposal([]))
    one_line_error(ValueError, "non-empty list of layers", lambda: HierarchicalProposal(first(x)))
    one_line_error(
        TypeError,
        "layer 2 is a Independent, not a factory",
        lambda: HierarchicalProposal([lambda: first(x), second(torch.zeros(B, D, dtype=DTYPE))]),
    )
    message = one_line_error(
        TypeError,
        "layer 2 is a function, not an nn.Module",
        lambda: HierarchicalProposal([lambda: first(x), lambda z1: second(z1)]),
    )
    assert "module=" in message
    one_line_error(
        TypeError,
        "module must be the nn.Module that owns",
        lambda: HierarchicalProposal([lambda: first(x), second], module=[second]),
    )
    one_line_error(
        TypeError,
        "got list; a hierarchical proposal .* make_hierarchical_particles",
        lambda: make_particles([lambda: first(x), second], sum_log_joint, K),
    )


def test_parameters_outside_the_module_are_found():
    """A closure over a network that ``module`` does not own, or over features computed
    outside the call, cannot be stopped: refused, never a silently biased gradient."""
    x, first, (second,) = chain()
    message = one_line_error(
        ValueError,
        "layer 2 of the hierarchical proposal still depends on 4 tensor",
        lambda: monte_carlo_objective(
            HierarchicalProposal([lambda: first(x), lambda z1: second(z1)], module=first),
            sum_log_joint,
            K,
        ),
    )
    assert "[5, 2]" in message and "module=" in message
    shift = first.net[0](x)[..., :D]  # features of x, computed outside the layer call

    class Shifted(nn.Module):
        def forward(self, z1):
            return Independent(Normal(z1 + shift, torch.ones_like(z1)), 1)

    one_line_error(
        ValueError,
        "layer 2 .* still depends on 2 tensor",
        lambda: make_hierarchical_particles([lambda: first(x), Shifted()], sum_log_joint, K),
    )


def test_layer_distribution_errors():
    x, first, (second,) = chain()
    one_line_error(
        TypeError,
        "layer 1 of the hierarchical proposal returned a Tensor",
        lambda: make_hierarchical_particles([lambda: x, second], sum_log_joint, K),
    )
    laplace = Laplace(torch.zeros(B, D, dtype=DTYPE), torch.ones(B, D, dtype=DTYPE))
    one_line_error(
        TypeError,
        "layer 1 .* is a Independent: layers must be Gaussian",
        lambda: make_hierarchical_particles(
            [lambda: Independent(laplace, 1), second], sum_log_joint, K
        ),
    )
    q1 = first(x).base_dist
    one_line_error(
        ValueError,
        r"layer 1 .* batch shape \[3, 2\]; it must be \[B\]",
        lambda: make_hierarchical_particles([lambda: q1, second], sum_log_joint, K),
    )

    class Unsummed(nn.Module):
        def forward(self, z1):
            return Normal(z1, torch.ones_like(z1))  # batch [K, B, D]: Independent forgotten

    one_line_error(
        ValueError,
        r"layer 2 .* batch shape \[4, 3, 2\]; it must be \[K, B\] = \[4, 3\] .* or \[B\] = \[3\]",
        lambda: make_hierarchical_particles([lambda: first(x), Unsummed()], sum_log_joint, K),
    )


def test_noise_and_log_joint_errors():
    x, first, (second,) = chain()
    layers = [lambda: first(x), second]
    one_line_error(
        ValueError,
        r"noise has shape \[4, 12\]; a hierarchical proposal takes \[K, B, N\]",
        lambda: make_hierarchical_particles(layers, sum_log_joint, K, torch.zeros(K, 12)),
    )
    one_line_error(
        ValueError,
        r"layer 2 needs \[K, B\] = \[4, 3\] and 2 draws per sample after the 2",
        lambda: make_hierarchical_particles(
            layers, sum_log_joint, K, torch.zeros(K, B, 3, dtype=DTYPE)
        ),
    )
    one_line_error(
        ValueError,
        "noise has 5 draws per sample; the layers use 4",
        lambda: make_hierarchical_particles(
            layers, sum_log_joint, K, torch.zeros(K, B, 5, dtype=DTYPE)
        ),
    )
    one_line_error(
        ValueError,
        r"the noise sampler returned \[4, 3\] for layer 1, which needs \[4, 3, 2\]",
        lambda: make_hierarchical_particles(
            layers, sum_log_joint, K, lambda shape, dtype, device: torch.zeros(shape[:2])
        ),
    )
    one_line_error(
        ValueError,
        r"log_joint returned \[4, 3, 4\] .* \[K, B\] = \[4, 3\], summed over the event dims \[4\]",
        lambda: make_hierarchical_particles(layers, lambda z: z, K),
    )
    one_line_error(
        ValueError,
        "K must be an integer >= 1",
        lambda: make_hierarchical_particles(layers, sum_log_joint, 0),
    )


def test_particles_from_draws_errors():
    z = torch.zeros(K, B, D)
    one_line_error(
        ValueError,
        r"z must be a tensor \[K, B, \*event\]",
        lambda: particles_from_draws(torch.zeros(K), z[..., 0], z[..., 0], sum_log_joint),
    )
    one_line_error(
        ValueError,
        r"log_q_stop_z is \[4\]; it must be \[K, B\] = \[4, 3\]",
        lambda: particles_from_draws(z, z[..., 0], z[:, 0, 0], sum_log_joint),
    )
