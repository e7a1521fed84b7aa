"""Variance and SNR of gradient estimators versus the number of samples K (the paper's Fig. 1).

``python train.py mode=diagnose ckpt_path=<run>/checkpoints/last.ckpt``

At a fixed model and a fixed batch, for every K in ``mode.num_samples`` and every estimator
in ``mode.estimators``, draw ``mode.num_draws`` independent gradient estimates (fresh latent
noise, same images) and compute the exact per-coordinate mean and variance of the model and
inference-network gradients (:class:`~dreg.diagnostics.moments.SampleMoments`). All
estimators of one draw share its samples (common random numbers), so their curves differ by
the estimator, not by the noise.

Expected shape (Rainforth et al. 2018; Tucker et al. 2019): IWAE's inference SNR falls with
K (like 1/K asymptotically, for this squared SNR), DReG's and STL's fall far less or not at
all; every model-gradient SNR rises with K. docs/diagnostics.md shows a measured MNIST plot.

A net with several stochastic layers (``net.layer_parameters()``) also gets rows for the
inference gradient restricted to each layer (groups ``inference_layer1``, ``inference_layer2``;
:mod:`dreg.diagnostics.layers`), from the same draws, and a panel row per layer in the plot.

Outputs (rank 0): ``snr_vs_k.csv``, the log-log plot ``snr_vs_k.png``, and both to the
loggers (a W&B table and image when the logger is W&B). Under DDP the draws are dealt out
to ranks by index and their sums all-reduced.

References: Rainforth, Kosiorek, Le, Maddison, Igl, Wood & Teh (2018), Tighter variational
bounds are not necessarily better, ICML; Tucker, Lawson, Gu & Maddison (2019), ICLR.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

import matplotlib
import torch
from omegaconf import DictConfig
from pytorch_lightning.loggers import WandbLogger

from dreg.diagnostics.job import (
    DiagnosticJob,
    rank_zero_loggers,
    start_job,
    training_batch,
)
from dreg.diagnostics.layers import layer_indices
from dreg.diagnostics.moments import SampleMoments
from dreg.estimators import estimator_by_name
from dreg.gradients import GROUPS, group_gradients, group_parameters
from dreg.seeds import derived_seed, seeded

matplotlib.use("Agg")  # files only; no display on clusters
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger(__name__)

COLUMNS = ["num_samples", "estimator", "group", "variance", "mean_square", "snr", "num_draws"]
DATA_SEED = 0  # index of the fixed batch's binarization seed, apart from every draw's seed


def study(job: DiagnosticJob, cfg: DictConfig) -> list[dict[str, Any]]:
    """One row per (K, estimator, parameter group) with the exact variance and SNR."""
    mode, net, device = cfg.mode, job.net, job.device
    num_draws = int(mode.num_draws)
    if num_draws < 2:
        raise ValueError(f"mode.num_draws={num_draws}: need at least 2 draws for a variance")
    with seeded(derived_seed(cfg.seed, DATA_SEED), device):
        batch = training_batch(job.datamodule, 0, int(mode.batch_size), device)
    params = {g: group_parameters(net, g)[1] for g in GROUPS}
    dims = {g: sum(p.numel() for p in ps) for g, ps in params.items()}
    layers = layer_indices(net, params["inference"], device)  # {} for one stochastic layer
    dims |= {layer: index.numel() for layer, index in layers.items()}
    every_estimator = [estimator_by_name(name).to(device) for name in mode.estimators]
    rows = []
    for num_samples in mode.num_samples:
        estimators = []
        for estimator in every_estimator:
            try:  # K too small (jvi: K >= 2), or not a multiple of miwae's estimator.groups
                estimator.validate_num_samples(num_samples)
                estimators.append(estimator)
            except ValueError as err:
                if job.fabric.is_global_zero:
                    log.info("skipping %s at K=%d: %s", estimator.name, num_samples, err)
        moments = {(e.name, g): SampleMoments(dims[g], device) for e in estimators for g in dims}
        for draw in range(num_draws):
            if not job.mine(draw):
                continue
            with seeded(derived_seed(cfg.seed, num_samples, draw), device):
                particles = net.particles(batch.x, num_samples, batch.context)
            seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (model coefficients, gradient)
            for estimator in estimators:
                weights = estimator(particles.log_w)
                # Estimators of one family often share the model coefficients (w~): then they
                # share the model gradient too, and one decoder backward pass is saved.
                shared = next((g for m, g in seen if torch.equal(m, weights.model)), None)
                groups = {"inference": params["inference"]} if shared is not None else params
                grads = group_gradients(particles, weights, groups)
                if shared is None:
                    seen.append((weights.model, grads["model"]))
                grads.setdefault("model", shared)
                grads |= {layer: grads["inference"][i] for layer, i in layers.items()}
                for group, grad in grads.items():
                    moments[estimator.name, group].update(grad)
        for (name, group), moment in moments.items():
            moment.all_reduce(job.reduce_sum)
            summary = moment.summary()
            rows.append({"num_samples": num_samples, "estimator": name, "group": group,
                         "variance": summary.variance, "mean_square": summary.mean_square,
                         "snr": summary.snr, "num_draws": moment.count})  # fmt: skip
        if job.fabric.is_global_zero:
            log.info("K=%d: %s", num_samples, {
                f"{r['estimator']}/{r['group']}": f"snr={r['snr']:.3g}"
                for r in rows if r["num_samples"] == num_samples
            })  # fmt: skip
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Log-log SNR and variance versus K: one panel per (group, statistic); the model and
    inference groups, then any stochastic layer's (``inference_layer1`` ...)."""
    groups = list(dict.fromkeys([*GROUPS, *(r["group"] for r in rows)]))
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.75 * len(groups)), sharex=True)
    for row_axes, group in zip(axes, groups, strict=True):
        for ax, stat in zip(row_axes, ("snr", "variance"), strict=True):
            for name in dict.fromkeys(r["estimator"] for r in rows):
                points = [(r["num_samples"], r[stat]) for r in rows
                          if r["estimator"] == name and r["group"] == group]  # fmt: skip
                # An SNR estimate <= 0 means the signal is below what these draws resolve.
                points = [(k, v) for k, v in points if v > 0 and math.isfinite(v)]
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{group} gradient {'SNR' if stat == 'snr' else 'variance'}")
            ax.grid(True, which="both", alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("K (samples per data point)")
    axes[0][0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_results(cfg: DictConfig, job: DiagnosticJob, rows: list[dict], png: Path) -> None:
    """Every row as metrics at step K; for W&B also a table and the image (its run is then
    finished, so what it logged is complete on disk)."""
    for logger in rank_zero_loggers(cfg, job):
        for r in rows:
            prefix = f"diagnose/{r['estimator']}/{r['group']}"
            metrics = {f"{prefix}/snr": r["snr"], f"{prefix}/variance": r["variance"]}
            logger.log_metrics(metrics, step=r["num_samples"])
        if isinstance(logger, WandbLogger):
            logger.log_table("diagnose/snr_vs_k", columns=COLUMNS,
                             data=[[r[c] for c in COLUMNS] for r in rows])  # fmt: skip
            logger.log_image("diagnose/snr_vs_k_plot", images=[str(png)])
        logger.finalize("success")
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()


def run(cfg: DictConfig) -> dict[str, Any]:
    """Entry point of ``mode=diagnose``: the study, then CSV, PNG and loggers on rank 0."""
    job = start_job(cfg)
    rows = study(job, cfg)
    if job.fabric.is_global_zero:
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_csv(rows, out / "snr_vs_k.csv")
        title = f"{cfg.mode.num_draws} draws, batch {cfg.mode.batch_size}"
        if cfg.get("ckpt_path"):
            title += f", {Path(cfg.ckpt_path).name}"
        plot(rows, out / "snr_vs_k.png", title)
        log_results(cfg, job, rows, out / "snr_vs_k.png")
        log.info("wrote %s and %s", out / "snr_vs_k.csv", out / "snr_vs_k.png")
    return {f"diagnose/{r['estimator']}/{r['group']}/snr@{r['num_samples']}": r["snr"]
            for r in rows}  # fmt: skip
