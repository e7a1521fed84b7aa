"""Lightning callbacks that measure gradient estimators along a training trajectory.

Definitions of every logged statistic, and their meaning under DDP: docs/diagnostics.md.
"""

from dreg.callbacks.estimator_compare import EstimatorComparison
from dreg.callbacks.grad_stats import GradientStatistics

__all__ = ["EstimatorComparison", "GradientStatistics"]
