"""dreg: doubly reparameterized gradient estimators (Tucker et al., ICLR 2019) in PyTorch.

Library use: ``from dreg import monte_carlo_objective`` (see :mod:`dreg.library`).
"""

from typing import Any

__version__ = "0.1.0"

# Imported on first use: `import dreg` (e.g. by the config check) stays free of torch.
_LIBRARY_NAMES = ("monte_carlo_objective", "make_particles", "ObjectiveResult")


def __getattr__(name: str) -> Any:
    if name in _LIBRARY_NAMES:
        from dreg import library

        return getattr(library, name)
    raise AttributeError(f"module 'dreg' has no attribute '{name}'")


__all__ = ["__version__", *_LIBRARY_NAMES]
