"""Results report of a sweep: ``python -m dreg.report <sweep dir> [--out DIR]``.

Reads every run below the sweep directory from its own files (no logger server needed):
``.hydra/config.yaml`` (dataset, estimator, seed, K), ``metrics.json`` (final test metrics) and
``csv/metrics.csv`` (curves, from ``logger=csv``). Writes ``results.md`` (test log-likelihood
with S = 5000 samples and the test bound at the training K, mean ± std over seeds, per dataset
x estimator) and PNG plots of validation log-likelihood and of inference-gradient variance/SNR
versus steps, one panel per dataset.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

CURVES = {
    "val_log_likelihood": ("val/log_likelihood", "validation log-likelihood (nats)", False),
    "inference_grad_variance": ("grad/inference/variance", "inference-gradient variance", True),
    "inference_grad_snr": ("grad/inference/snr", "inference-gradient SNR", True),
}


@dataclass
class Run:
    """One finished training run of a sweep."""

    path: Path
    dataset: str
    estimator: str
    seed: int
    num_samples: int
    metrics: dict
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def _choice(config_target: str) -> str:
    """A config's short name from its ``_target_`` when the run did not record the choice."""
    return config_target.rsplit(".", 1)[-1].lower()


def read_run(path: Path) -> Run | None:
    """The run stored in ``path``, or ``None`` if it has no finished ``metrics.json``."""
    if not (path / "metrics.json").exists() or not (path / ".hydra" / "config.yaml").exists():
        return None
    cfg = OmegaConf.load(path / ".hydra" / "config.yaml")
    choices = {}
    if (path / ".hydra" / "hydra.yaml").exists():
        choices = OmegaConf.load(path / ".hydra" / "hydra.yaml").hydra.runtime.choices
    run = Run(
        path=path,
        dataset=choices.get("dataset") or _choice(cfg.dataset._target_),
        estimator=choices.get("estimator") or _choice(cfg.estimator._target_),
        seed=int(cfg.seed),
        num_samples=int(cfg.model.num_samples),
        metrics=json.loads((path / "metrics.json").read_text()),
    )
    log = path / "csv" / "metrics.csv"
    if log.exists():
        with open(log) as f:
            for row in csv.DictReader(f):
                for name, (key, _, _) in CURVES.items():
                    if row.get(key) not in (None, ""):
                        run.curves.setdefault(name, []).append((int(row["step"]), float(row[key])))
    return run


def collect(sweep_dir: Path) -> list[Run]:
    runs = [read_run(p.parent) for p in sorted(sweep_dir.glob("**/metrics.json"))]
    return [r for r in runs if r is not None]


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return (
        f"{statistics.fmean(values):.2f} ± {std:.2f}" if not math.isnan(std) else f"{values[0]:.2f}"
    )


def table(runs: list[Run]) -> str:
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.dataset, run.estimator)].append(run)
    lines = [
        "| dataset | estimator | K | seeds | steps | test log-likelihood (S=5000) | "
        "test bound (training K) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (dataset, estimator), group in sorted(groups.items()):
        ll = [r.metrics["test/log_likelihood"] for r in group]
        bound = [r.metrics["test/bound"] for r in group]
        steps = sorted({r.metrics.get("global_step") for r in group})
        lines.append(
            f"| {dataset} | {estimator} | {group[0].num_samples} | "
            f"{','.join(str(r.seed) for r in sorted(group, key=lambda r: r.seed))} | "
            f"{','.join(map(str, steps))} | {mean_std(ll)} | {mean_std(bound)} |"
        )
    return "\n".join(lines)


def plot_curves(runs: list[Run], name: str, out: Path) -> Path | None:
    """One PNG per curve kind: a panel per dataset, one line per estimator (mean over seeds)."""
    key, label, log_scale = CURVES[name]
    with_curve = [r for r in runs if r.curves.get(name)]
    if not with_curve:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r.dataset for r in with_curve})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        by_estimator: dict[str, list[Run]] = defaultdict(list)
        for run in with_curve:
            if run.dataset == dataset:
                by_estimator[run.estimator].append(run)
        for estimator, group in sorted(by_estimator.items()):
            per_step: dict[int, list[float]] = defaultdict(list)
            for run in group:
                for step, value in run.curves[name]:
                    per_step[step].append(value)
            steps = sorted(per_step)
            ax.plot(steps, [statistics.fmean(per_step[s]) for s in steps], label=estimator)
        ax.set_title(dataset)
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        if log_scale:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    target = out / f"{name}.png"
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def write_report(sweep_dir: Path, out: Path) -> Path:
    runs = collect(sweep_dir)
    if not runs:
        raise SystemExit(f"no finished runs (metrics.json + .hydra/config.yaml) under {sweep_dir}")
    out.mkdir(parents=True, exist_ok=True)
    plots = [p for name in CURVES if (p := plot_curves(runs, name, out)) is not None]
    lines = [
        f"# Results: {sweep_dir}",
        "",
        f"{len(runs)} runs. Mean ± std over seeds.",
        "",
        table(runs),
        "",
    ]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    report = out / "results.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: the sweep directory")
    args = parser.parse_args()
    print(write_report(args.sweep_dir, args.out or args.sweep_dir))


if __name__ == "__main__":
    main()
