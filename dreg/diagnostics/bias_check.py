"""Bias check: is an estimator's inference gradient unbiased for its family's reference?

``python train.py mode=bias_check estimator=dreg_iwae ckpt_path=<run>/checkpoints/last.ckpt``

On batch i (same images, same latent samples for both) the paired difference
``d_i = g_est,i - g_ref,i`` of the flattened inference-network gradients has mean zero iff the
estimator is unbiased for the reference: the estimator whose config name is the family
(iwae family: ``iwae``; rws: ``rws``; jvi: ``jvi``; miwae: ``miwae``; piwae: ``piwae``), built
with the parameters it shares with the checked estimator (``reference_params``: the same
``groups`` for ``dreg_miwae`` and ``dreg_piwae``).

Averaging d over all D coordinates before a t-test (the original code) can hide biases of
opposite sign. Instead the batches are split: the first ``direction_fraction`` estimate the
direction of the mean difference, ``u = mean_i d_i``; on the remaining, independent batches
the scalars ``s_i = <d_i, u>`` have mean ``<E d, u>``, which is zero if the estimator is
unbiased and positive if ``u`` picks up a bias. Given u the s_i are i.i.d., so a one-sample
t-test on them is exact. The same test runs on every parameter tensor's slice of d and u;
the verdict applies Holm's step-down correction to the aggregate and all per-tensor p-values.
The original all-coordinate mean is reported too, for comparison. A net with several
stochastic layers (``net.layer_parameters()``) adds one test per layer, on that layer's
coordinates of d and u (``per_layer``: ``inference_layer1`` ...), to the Holm family: a DReG
that drops the d log q(z2 | z1) / d z1 terms is biased in layer 1's gradient only.

Under DDP each rank takes the batches ``i % world_size == rank``; the direction and the
per-test sums are all-reduced, so the numbers equal a 1-process run's on the same batches.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from omegaconf import DictConfig
from pytorch_lightning.loggers import WandbLogger
from scipy import stats
from torch import Tensor

from dreg.diagnostics.job import (
    DiagnosticJob,
    rank_zero_loggers,
    start_job,
    training_batch,
)
from dreg.diagnostics.layers import layer_indices
from dreg.estimators import estimator_by_name, estimator_classes
from dreg.gradients import group_gradients, group_parameters, tensor_slices
from dreg.seeds import derived_seed, seeded

matplotlib.use("Agg")  # files only; no display on clusters
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger(__name__)


def t_test(total: float, total_sq: float, count: int) -> dict[str, float]:
    """Two-sided one-sample t-test of mean zero from the sum and sum of squares of ``count``
    values. A zero spread gives t = 0 for a zero mean and +-inf otherwise."""
    mean = total / count
    var = max(total_sq - count * mean**2, 0.0) / (count - 1)
    std_error = (var / count) ** 0.5
    if std_error > 0:
        t = mean / std_error
    else:
        t = 0.0 if mean == 0 else float(np.sign(mean)) * float("inf")
    p_value = float(2 * stats.t.sf(abs(t), df=count - 1))
    return {"t": float(t), "p_value": p_value, "mean": mean, "std_error": std_error}


def holm_reject(p_values: list[float], alpha: float) -> list[bool]:
    """Holm's step-down procedure: which hypotheses are rejected at family-wise level alpha."""
    order = np.argsort(p_values)
    reject = [False] * len(p_values)
    for rank, index in enumerate(order):
        if p_values[index] > alpha / (len(p_values) - rank):
            break
        reject[index] = True
    return reject


class PairedDifferences:
    """Draws d_i for the batches of one rank (same images and latent samples for both)."""

    def __init__(self, job: DiagnosticJob, seed: int, batch_size: int) -> None:
        module = job.module
        self.job, self.seed, self.batch_size = job, seed, batch_size
        self.estimator = module.estimator
        families = sorted({cls.family for cls in estimator_classes().values()}
                          & set(estimator_classes()))  # fmt: skip
        if self.estimator.family not in estimator_classes():  # each family's reference is
            raise ValueError(  # the estimator of that name
                f"estimator '{self.estimator.name}' has family '{self.estimator.family}', which "
                f"has no reference gradient; the bias check covers the families {families}"
            )
        self.reference = estimator_by_name(
            self.estimator.family, **self.estimator.reference_params()
        )
        self.reference.to(job.device)
        if self.reference.name == self.estimator.name:
            raise ValueError(
                f"'{self.estimator.name}' is the reference of the {self.estimator.family} family; "
                "choose another estimator (e.g. estimator=dreg_iwae) to check"
            )
        self.names, self.params = group_parameters(job.net, "inference")
        self.slices = tensor_slices(self.params)
        self.layers = layer_indices(job.net, self.params, job.device)  # {} for one layer

    def draw(self, index: int) -> Tensor:
        """``[D]`` float64 difference g_est - g_ref of the inference gradients on batch index."""
        job, module = self.job, self.job.module
        with seeded(derived_seed(self.seed, index), job.device):
            batch = training_batch(job.datamodule, index, self.batch_size, job.device)
            particles = job.net.particles(batch.x, module.num_samples, batch.context)
        params = {"inference": self.params}
        est = group_gradients(particles, self.estimator(particles.log_w), params)["inference"]
        ref = group_gradients(particles, self.reference(particles.log_w), params)["inference"]
        return (est - ref).double()


def bias_check(job: DiagnosticJob, cfg: DictConfig) -> dict[str, Any]:
    """Run the paired test on ``cfg.mode.num_batches`` batches; returns the report dict."""
    mode = cfg.mode
    num_batches = int(mode.num_batches)
    num_direction = int(num_batches * float(mode.direction_fraction))
    if not 2 <= num_direction <= num_batches - 3:
        raise ValueError(
            f"mode.num_batches={num_batches} with direction_fraction={mode.direction_fraction} "
            "leaves too few batches for one half; use num_batches >= 8 and a fraction near 0.5"
        )
    pairs = PairedDifferences(job, cfg.seed, mode.batch_size)
    dim = pairs.slices[-1].stop
    device, num_tests = job.device, 1 + len(pairs.slices) + len(pairs.layers)

    # Pass 1: the direction u, and the original all-coordinate mean on every batch.
    direction = torch.zeros(dim, dtype=torch.float64, device=device)
    coord_mean = torch.zeros(2, dtype=torch.float64, device=device)  # sum, sum of squares
    for i in range(num_direction):
        if job.mine(i):
            d = pairs.draw(i)
            direction += d
            coord_mean += torch.stack([d.mean(), d.mean() ** 2])
    direction = job.reduce_sum(direction) / num_direction

    # Pass 2: s_i = <d_i, u> overall and per tensor, on the held-out batches.
    sums = torch.zeros(2, num_tests, dtype=torch.float64, device=device)  # [sum | sum sq, test]
    for i in range(num_direction, num_batches):
        if job.mine(i):
            d = pairs.draw(i)
            coord_mean += torch.stack([d.mean(), d.mean() ** 2])
            products = d * direction  # [D]
            s = torch.stack([products.sum()] + [products[sl].sum() for sl in pairs.slices]
                            + [products[i].sum() for i in pairs.layers.values()])  # fmt: skip
            sums += torch.stack([s, s**2])
    sums, coord_mean = job.reduce_sum(sums).tolist(), job.reduce_sum(coord_mean).tolist()

    num_test = num_batches - num_direction
    results = [t_test(sums[0][j], sums[1][j], num_test) for j in range(num_tests)]
    rejected = holm_reject([r["p_value"] for r in results], float(mode.alpha))
    num_tensors = len(pairs.slices)
    per_tensor = [
        {"name": name, "numel": sl.stop - sl.start, **res, "holm_reject": rej}
        for name, sl, res, rej in zip(
            pairs.names,
            pairs.slices,
            results[1 : 1 + num_tensors],
            rejected[1 : 1 + num_tensors],
            strict=True,
        )
    ]
    per_layer = [
        {"name": name, "numel": index.numel(), **res, "holm_reject": rej}
        for name, index, res, rej in zip(
            pairs.layers,
            pairs.layers.values(),
            results[1 + num_tensors :],
            rejected[1 + num_tensors :],
            strict=True,
        )
    ]
    largest = max(per_tensor, key=lambda r: abs(r["t"]))
    return {
        "estimator": pairs.estimator.name,
        "reference": pairs.reference.name,
        "family": pairs.estimator.family,
        "verdict": "biased" if any(rejected) else "no evidence of bias",
        "aggregate": {**results[0], "holm_reject": rejected[0]},
        "largest_tensor": {"name": largest["name"], "t": largest["t"]},
        "per_tensor": per_tensor,
        "per_layer": per_layer,
        "all_coordinate_mean": t_test(*coord_mean, num_batches),
        "alpha": float(mode.alpha),
        "num_samples": job.module.num_samples,
        "batch_size": int(mode.batch_size),
        "num_batches": num_batches,
        "direction_batches": num_direction,
        "test_batches": num_test,
        "world_size": job.fabric.world_size,
        "ckpt_path": cfg.get("ckpt_path"),
        "seed": int(cfg.seed),
    }


def run(cfg: DictConfig) -> dict[str, Any]:
    """Entry point of ``mode=bias_check``: test, log, and write ``bias_check.json`` (rank 0)."""
    job = start_job(cfg)
    report = bias_check(job, cfg)
    if job.fabric.is_global_zero:
        agg = report["aggregate"]
        log.info(
            "bias check %s vs %s (K=%d, %d test batches): aggregate t=%.2f p=%.3g; "
            "largest |t| tensor %s t=%.2f; all-coordinate-mean t=%.2f -> %s",
            report["estimator"], report["reference"], report["num_samples"],
            report["test_batches"], agg["t"], agg["p_value"], report["largest_tensor"]["name"],
            report["largest_tensor"]["t"], report["all_coordinate_mean"]["t"], report["verdict"],
        )  # fmt: skip
        path = Path(cfg.paths.output_dir) / "bias_check.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        log_results(cfg, job, report)
    return {"bias/t": report["aggregate"]["t"], "bias/p_value": report["aggregate"]["p_value"]}


# -- the loggers ------------------------------------------------------------------------------
T_COLUMNS = ["test", "numel", "t", "p_value", "mean", "std_error", "holm_reject"]


def t_table(report: dict[str, Any]) -> list[list[Any]]:
    """One row per t-test: the aggregate, every stochastic layer (nets with layers), every
    tensor, and the original all-coordinate mean
    (which is not part of the Holm family: its ``holm_reject`` is empty)."""
    numel = sum(r["numel"] for r in report["per_tensor"])
    tests = [
        {"name": "aggregate", "numel": numel, **report["aggregate"]},
        *report.get("per_layer", []),
        *report["per_tensor"],
        {"name": "all_coordinate_mean", "numel": numel, **report["all_coordinate_mean"]},
    ]
    return [[r["name"], r["numel"], *(r[c] for c in T_COLUMNS[2:6]), r.get("holm_reject")]
            for r in tests]  # fmt: skip


def t_plot(report: dict[str, Any]) -> plt.Figure:
    """The t statistic of every test, rejected ones (Holm) in red: where a bias lies."""
    rows = t_table(report)
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.5))
    colors = ["tab:red" if r[-1] else "tab:blue" if r[-1] is False else "grey" for r in rows]
    ax.barh([r[0] for r in rows], [r[2] for r in rows], color=colors)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("t (red: rejected by Holm at alpha)")
    ax.set_title(f"{report['estimator']} vs {report['reference']}: {report['verdict']}")
    fig.tight_layout()
    return fig


def log_results(cfg: DictConfig, job: DiagnosticJob, report: dict[str, Any]) -> None:
    """The t statistics as metrics; for W&B also a table, a plot and the verdict in the run's
    summary (its run is finished, so the summary is complete on disk)."""
    agg = report["aggregate"]
    metrics = {"bias/t": agg["t"], "bias/p_value": agg["p_value"]}
    metrics |= {f"bias/{r['name']}/t": r["t"] for r in report["per_tensor"]}
    metrics |= {f"bias/{r['name']}/t": r["t"] for r in report.get("per_layer", [])}
    for logger in rank_zero_loggers(cfg, job):
        logger.log_metrics(metrics, step=0)
        if isinstance(logger, WandbLogger):
            logger.log_table("bias/t_tests", columns=T_COLUMNS, data=t_table(report))
            fig = t_plot(report)
            logger.log_image("bias/t_plot", images=[fig])
            plt.close(fig)
            logger.experiment.summary.update({"bias/verdict": report["verdict"]})
        logger.finalize("success")
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
