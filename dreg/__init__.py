"""dreg: doubly reparameterized gradient estimators (Tucker et al., ICLR 2019) in PyTorch.

Library use: ``from dreg import monte_carlo_objective`` (see :mod:`dreg.library`); proposals
with several stochastic layers, q(z1 | x) q(z2 | z1) ..., through ``HierarchicalProposal`` and
the generalized estimator of Bauer & Mnih (2021) (docs/library.md).
"""

from dreg.library import (
    HierarchicalProposal,
    ObjectiveResult,
    make_hierarchical_particles,
    make_particles,
    monte_carlo_objective,
)

__version__ = "0.1.0"

__all__ = [
    "HierarchicalProposal",
    "ObjectiveResult",
    "__version__",
    "make_hierarchical_particles",
    "make_particles",
    "monte_carlo_objective",
]
