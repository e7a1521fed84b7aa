"""Inference-gradient variance of every estimator relative to IWAE, on the analytic model.

    python -m benchmarks.estimator_variance [--k 64] [--draws 4000]

Model: dreg/analytic.py (p(z) = N(0, I), p(x|z) = N(z + theta, I), three data points in
D = 2, q off the posterior). For each estimator, N independent K-sample gradient estimates
of the inference parameters (mu, log sigma) on the same draws; variance = sum over
coordinates of the per-coordinate variance; SNR = sqrt(sum mean^2 / sum var) (debiased).
dreg_cv is shown at its configured initial coefficients (all 0, ``dreg_cv``) and at the
DReG point beta = 1 (``dreg_cv@beta=1``) and after ``--cv-steps`` Adam steps on its
``aux_loss`` over fresh draws (``dreg_cv@trained``), as during training.
"""

from __future__ import annotations

import argparse

import torch

from dreg.analytic import GaussianModel, snr
from dreg.estimators import DReGCV, estimator_by_name, estimator_classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cv-steps", type=int, default=1500)
    args = parser.parse_args()
    torch.set_num_threads(1)

    estimators = {n: estimator_by_name(n) for n in estimator_classes() if n != "dreg_cv"}
    estimators["dreg_cv"] = DReGCV()
    estimators["dreg_cv@beta=1"] = DReGCV(beta=1.0)
    model = GaussianModel.default()
    estimators["dreg_cv@trained"] = train_control_variates(model, args.k, args.cv_steps)
    draw = model.draw(args.k, args.draws, seed=args.seed)
    grads = {
        name: draw.gradients(est.double()(draw.particles.log_w))[1]
        for name, est in estimators.items()
    }
    reference = grads["iwae"].var(0).sum()
    print(f"K = {args.k}, {args.draws} draws, analytic Gaussian model (float64)\n")
    print("| estimator | variance / iwae | SNR |")
    print("|---|---:|---:|")
    for name, g in grads.items():
        print(f"| {name} | {float(g.var(0).sum() / reference):.3g} | {snr(g):.3g} |")
    learned = estimators["dreg_cv@trained"]
    values = {n: round(p.item(), 3) for n, p in learned.named_parameters()}
    print(f"\ndreg_cv@trained coefficients after {args.cv_steps} steps: {values}")


def train_control_variates(model: GaussianModel, k: int, steps: int) -> DReGCV:
    """DReGCV whose coefficients took ``steps`` Adam steps (lr 3e-3) on ``aux_loss``."""
    estimator = DReGCV().double()
    optimizer = torch.optim.Adam(estimator.parameters(), lr=3e-3)
    for step in range(steps):
        aux_loss = estimator(model.draw(k, 8, seed=10_000 + step).particles.log_w).aux_loss
        optimizer.zero_grad()
        aux_loss.backward()
        optimizer.step()
    return estimator


if __name__ == "__main__":
    main()
