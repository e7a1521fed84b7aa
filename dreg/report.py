"""Results report of a sweep: ``python -m dreg.report <sweep dir> [--out DIR]``.

Reads every run below the sweep directory from its own files (no logger server needed):
``.hydra/config.yaml`` (and the config-group choices in ``.hydra/hydra.yaml``),
``metrics.json`` (final test metrics) and ``csv/metrics.csv`` (curves; every logger config
writes it). Runs are grouped by their whole config except ``seed`` and the keys that cannot
change results (:data:`dreg.records.NO_EFFECT`), so a group's spread is over seeds only;
``results.md`` names the keys that tell the groups apart, gives K and S of each group from
its config, flags a group with a repeated seed instead of averaging it, and lists runs
without curves. The PNG plots
show, per dataset, each group's mean over seeds at each step with a min-max band.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dreg.files import atomic_write
from dreg.records import NO_EFFECT, has_no_effect

CURVES = {
    "val_log_likelihood": ("val/log_likelihood", "validation log-likelihood (nats)", False),
    "inference_grad_variance": ("grad/inference/variance", "inference-gradient variance", True),
    "inference_grad_snr": ("grad/inference/snr", "inference-gradient SNR", True),
}

K_KEY, S_KEY, SEED_KEY = "model.num_samples", "model.eval_num_samples", "seed"
# Config groups whose choice names a setting better than the keys it sets (e.g. estimator=stl
# instead of estimator._target_=dreg.estimators.STL).
CHOICE_GROUPS = ("dataset", "estimator", "model", "trainer", "callbacks", "mode")


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model.num_samples": 64, ...}``: dotted keys, lists as tuples (hashable)."""
    if isinstance(node, dict):
        if not node and prefix:
            return {prefix[:-1]: "{}"}
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tuple(node) if isinstance(node, list) else node}


@dataclass
class Run:
    """One finished training run of a sweep."""

    path: Path
    name: str
    config: dict[str, Any]  # flattened .hydra/config.yaml, interpolations unresolved
    choices: dict[str, str]  # config-group choices (dataset=mnist, estimator=iwae, ...)
    metrics: dict
    has_csv: bool = False
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return int(self.config[SEED_KEY])

    @property
    def num_samples(self) -> Any:
        return self.config.get(K_KEY, "?")

    @property
    def eval_num_samples(self) -> Any:
        return self.config.get(S_KEY, "?")

    @property
    def dataset(self) -> str:
        return self.choices.get("dataset", "")

    @property
    def estimator(self) -> str:
        return self.choices.get("estimator", "")

    def settings(self) -> dict[str, Any]:
        """The config keys that define this run's results besides the seed."""
        return {k: v for k, v in self.config.items() if k != SEED_KEY and not has_no_effect(k)}


def _short_target(config: dict[str, Any], group: str) -> str | None:
    """A group's name from its ``_target_`` when the run did not record its choices."""
    target = config.get(f"{group}._target_")
    return str(target).rsplit(".", 1)[-1].lower() if target else None


def read_run(path: Path, root: Path | None = None) -> Run | None:
    """The run stored in ``path``, or ``None`` if it has no finished ``metrics.json``."""
    if not (path / "metrics.json").exists() or not (path / ".hydra" / "config.yaml").exists():
        return None
    config = flatten(OmegaConf.to_container(OmegaConf.load(path / ".hydra" / "config.yaml")))
    choices: dict[str, str] = {}
    if (path / ".hydra" / "hydra.yaml").exists():
        recorded = OmegaConf.load(path / ".hydra" / "hydra.yaml").hydra.runtime.choices
        choices = {g: str(recorded[g]) for g in CHOICE_GROUPS if recorded.get(g) is not None}
    for group in ("dataset", "estimator"):
        if group not in choices and (name := _short_target(config, group)):
            choices[group] = name
    run = Run(
        path=path,
        name=str(path.relative_to(root)) if root else path.name,
        config=config,
        choices=choices,
        metrics=json.loads((path / "metrics.json").read_text()),
    )
    log = path / "csv" / "metrics.csv"
    if log.exists():
        run.has_csv = True
        with open(log, newline="") as f:
            for row in csv.DictReader(f):
                # x = updates completed, which is how dreg labels rows; rows carrying `epoch`
                # come from runs before that, labelled by Lightning with the count before.
                step = int(row["step"]) + (1 if row.get("epoch") else 0)
                for name, (key, _, _) in CURVES.items():
                    if row.get(key) not in (None, ""):
                        run.curves.setdefault(name, []).append((step, float(row[key])))
    return run


def run_dirs(sweep_dir: Path) -> list[Path]:
    """Every run folder (one with ``.hydra/config.yaml``) at or below ``sweep_dir``."""
    return sorted(p.parent.parent for p in sweep_dir.glob("**/.hydra/config.yaml"))


def collect(sweep_dir: Path) -> list[Run]:
    runs = [read_run(path, sweep_dir) for path in run_dirs(sweep_dir)]
    return [r for r in runs if r is not None]


def unfinished(sweep_dir: Path) -> list[str]:
    """Run folders below ``sweep_dir`` without ``metrics.json`` (preempted, failed, running)."""
    return [
        str(path.relative_to(sweep_dir))
        for path in run_dirs(sweep_dir)
        if not (path / "metrics.json").exists()
    ]


@dataclass
class Group:
    """Runs with equal settings: their spread is over seeds only."""

    runs: list[Run]
    label: dict[str, str]  # the settings, besides K and S, that tell it from the others
    short: dict[str, str] = field(default_factory=dict)  # K and S, where they differ

    @property
    def seeds(self) -> list[int]:
        return sorted(r.seed for r in self.runs)

    @property
    def duplicate_seeds(self) -> list[int]:
        seeds = self.seeds
        return sorted({s for s in seeds if seeds.count(s) > 1})

    def title(self, without: tuple[str, ...] = ()) -> str:
        """``iwae, K=8``: the group's settings, for legends and warnings."""
        label = {k: v for k, v in self.label.items() if k not in without}
        parts = [v if k in CHOICE_GROUPS else f"{k}={v}" for k, v in label.items()]
        parts += [f"{k}={v}" for k, v in self.short.items()]
        return ", ".join(parts) or "all runs"


def group_runs(runs: list[Run]) -> tuple[list[str], list[Group]]:
    """Groups of runs with equal settings, and the names of the settings that tell them apart.

    A config-group choice (``estimator``) stands for the keys it explains (those constant
    among runs with the same choice); other differing keys are shown by name. K and S are
    always their own columns.
    """
    by_settings: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        by_settings[tuple(sorted((k, repr(v)) for k, v in run.settings().items()))].append(run)
    members = list(by_settings.values())
    settings = [r.settings() for r in runs]
    keys = sorted(set().union(*settings))
    differing = [k for k in keys if len({repr(s.get(k, "<unset>")) for s in settings}) > 1]

    shown: list[str] = []
    explained: set[str] = set()
    for group in CHOICE_GROUPS:
        per_group = [{r.choices.get(group, "") for r in rs} for rs in members]
        if any(len(c) > 1 for c in per_group) or len(set().union(*per_group)) < 2:
            continue  # not a setting of the groups (equal configs, or never differs)
        shown.append(group)
        for key in differing:
            per_choice: dict[str, set[str]] = defaultdict(set)
            for run, setting in zip(runs, settings, strict=True):
                per_choice[run.choices.get(group, "")].add(repr(setting.get(key, "<unset>")))
            if key.startswith(f"{group}.") and all(len(v) == 1 for v in per_choice.values()):
                explained.add(key)
    shown += [k for k in differing if k not in explained and k not in (K_KEY, S_KEY)]

    def value(run: Run, key: str) -> str:
        if key in CHOICE_GROUPS:
            return run.choices.get(key, "")
        return str(run.config.get(key, "unset"))

    short = {name: key for name, key in (("K", K_KEY), ("S", S_KEY)) if key in differing}
    groups = [
        Group(
            rs,
            {k: value(rs[0], k) for k in shown},
            {name: value(rs[0], key) for name, key in short.items()},
        )
        for rs in members
    ]

    def order(group: Group) -> tuple:
        first = group.runs[0]
        numbers = (first.num_samples, first.eval_num_samples)
        return (*group.label.values(), *(n if isinstance(n, int) else -1 for n in numbers))

    groups.sort(key=order)
    return shown + [k for k in (K_KEY, S_KEY) if k in differing], groups


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(groups: list[Group]) -> str:
    label_keys = list(groups[0].label) if groups else []
    header = [*label_keys, "K", "S", "n", "seeds", "steps"]
    header += ["test log-likelihood (S samples)", "test bound (K samples)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group in groups:
        first = group.runs[0]
        steps = sorted({str(r.metrics.get("global_step", "?")) for r in group.runs})
        if group.duplicate_seeds:
            ll = bound = "not averaged: duplicate seeds"
        else:
            ll = mean_std([r.metrics["test/log_likelihood"] for r in group.runs])
            bound = mean_std([r.metrics["test/bound"] for r in group.runs])
        cells = [*group.label.values(), str(first.num_samples), str(first.eval_num_samples)]
        cells += [str(len(group.runs)), ",".join(map(str, group.seeds)), ",".join(steps)]
        lines.append("| " + " | ".join([*cells, ll, bound]) + " |")
    return "\n".join(lines)


def plot_curves(groups: list[Group], name: str, out: Path) -> Path | None:
    """One PNG per curve: a panel per dataset, per group the mean over seeds at each step and
    a min-max band across seeds."""
    key, label, log_scale = CURVES[name]
    with_curve = [g for g in groups if any(r.curves.get(name) for r in g.runs)]
    if not with_curve:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({g.runs[0].dataset for g in with_curve})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for group in with_curve:
            if group.runs[0].dataset != dataset:
                continue
            runs = [r for r in group.runs if r.curves.get(name)]
            per_step: dict[int, list[float]] = defaultdict(list)
            for run in runs:
                for step, value in run.curves[name]:
                    per_step[step].append(value)
            steps = sorted(per_step)
            mean = [statistics.fmean(per_step[s]) for s in steps]
            title = group.title(without=("dataset",) if len(datasets) > 1 else ())
            (line,) = ax.plot(steps, mean, marker="o", ms=2, label=f"{title} (n={len(runs)})")
            if len(runs) > 1:
                low = [min(per_step[s]) for s in steps]
                high = [max(per_step[s]) for s in steps]
                ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, lw=0)
        ax.set_title(dataset or label)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{label}\n(mean over seeds, band: min-max)")
        if log_scale:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    target = out / f"{name}.png"
    with atomic_write(target, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return target


def describe(runs: list[Run], definers: list[str], groups: list[Group]) -> list[str]:
    """The lines above the table: what a row is, and what sets the groups apart."""
    shown = ", ".join(f"`{k}`" for k in definers) or "nothing (one group)"
    ignored_list = ", ".join(f"`{p}*`" if p.endswith(".") else f"`{p}`" for p in NO_EFFECT)
    return [
        f"{len(runs)} finished runs in {len(groups)} groups. A group is the runs whose "
        "`.hydra/config.yaml` is equal except `seed` (ignoring keys that cannot change "
        f"results: {ignored_list}); the groups differ in: {shown}.",
        "",
        "n runs per group, mean ± sample std over their seeds. K = `model.num_samples` "
        "(training samples; the test bound uses K), S = `model.eval_num_samples` (samples of "
        "the test log-likelihood estimate), both from each group's config.",
    ]


def warnings(groups: list[Group], runs: list[Run], sweep_dir: Path) -> list[str]:
    lines = []
    for group in groups:
        if group.duplicate_seeds:
            names = ", ".join(f"`{r.name}`" for r in sorted(group.runs, key=lambda r: r.seed))
            lines.append(
                f"**Duplicate seeds** {group.duplicate_seeds} in group {group.title()}: not "
                f"averaged; keep one run per seed of {names}."
            )
    if left_out := unfinished(sweep_dir):
        lines.append(
            f"Not in the table (no metrics.json: unfinished or failed): "
            f"{', '.join(f'`{n}`' for n in left_out)}."
        )
    no_curves = [f"`{r.name}`" for r in runs if not r.has_csv]
    lines.append(f"Runs without curves (no csv/metrics.csv): {', '.join(no_curves) or 'none'}.")
    return lines


def write_report(sweep_dir: Path, out: Path) -> Path:
    runs = collect(sweep_dir)
    if not runs:
        raise SystemExit(
            f"error: no finished runs (metrics.json + .hydra/config.yaml) under {sweep_dir}; "
            "pass a sweep or run directory"
        )
    out.mkdir(parents=True, exist_ok=True)
    definers, groups = group_runs(runs)
    plots = [p for name in CURVES if (p := plot_curves(groups, name, out)) is not None]
    lines = [f"# Results: {sweep_dir}", "", *describe(runs, definers, groups), ""]
    lines += [table(groups), ""]
    lines += [*warnings(groups, runs, sweep_dir), ""]
    if plots:
        lines += ["Curves: each group's mean over seeds at each step; band: min-max.", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    report = out / "results.md"
    with atomic_write(report) as f:
        f.write("\n".join(lines) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: the sweep directory")
    args = parser.parse_args()
    print(write_report(args.sweep_dir, args.out or args.sweep_dir))


if __name__ == "__main__":
    main()
