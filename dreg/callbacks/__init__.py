"""Lightning callbacks: gradient statistics along a training trajectory (``grad_stats``,
``estimator_compare``; definitions and DDP semantics in docs/diagnostics.md) and preemption
checkpoints (``preemption``)."""

from dreg.callbacks.estimator_compare import EstimatorComparison
from dreg.callbacks.grad_stats import GradientStatistics

__all__ = ["EstimatorComparison", "GradientStatistics"]
