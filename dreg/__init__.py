"""dreg: doubly reparameterized gradient estimators (Tucker et al., ICLR 2019) in PyTorch.

Library use: ``from dreg import monte_carlo_objective`` (see :mod:`dreg.library`).
"""

from dreg.library import ObjectiveResult, make_particles, monte_carlo_objective

__version__ = "0.1.0"

__all__ = ["ObjectiveResult", "__version__", "make_particles", "monte_carlo_objective"]
