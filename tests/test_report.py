"""The sweep report reads runs from their own files: structure and numbers read back."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from omegaconf import OmegaConf

from dreg.report import collect, write_report

LL = {
    ("mnist", "iwae"): [-100.0, -102.0],
    ("mnist", "dreg_iwae"): [-99.0, -99.5],
    ("omniglot", "iwae"): [-120.0, -121.0],
    ("omniglot", "dreg_iwae"): [-118.0, -119.0],
}


def fake_run(root: Path, dataset: str, estimator: str, seed: int, ll: float) -> None:
    run = root / f"dataset={dataset},estimator={estimator},seed={seed}"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(
        {
            "seed": seed,
            "model": {"num_samples": 64},
            "dataset": {"_target_": f"x.{dataset}"},
            "estimator": {"_target_": "x.E"},
        },
        run / ".hydra" / "config.yaml",
    )
    OmegaConf.save(
        {"hydra": {"runtime": {"choices": {"dataset": dataset, "estimator": estimator}}}},
        run / ".hydra" / "hydra.yaml",
    )
    (run / "metrics.json").write_text(
        json.dumps({"test/log_likelihood": ll, "test/bound": ll - 2, "global_step": 300})
    )
    (run / "csv").mkdir()
    rows = ["step,train/objective,val/log_likelihood,grad/inference/snr"]
    rows += [f"{s},{ll - 10},,{0.5 + s / 1000}" for s in (50, 150)]
    rows += [f"{s},,{ll - (300 - s) / 10},," for s in (100, 200, 300)]
    (run / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")


def test_report_tables_and_plots_a_sweep(tmp_path):
    for (dataset, estimator), values in LL.items():
        for seed, ll in enumerate(values):
            fake_run(tmp_path, dataset, estimator, seed, ll)
    (tmp_path / "unfinished" / ".hydra").mkdir(parents=True)  # no metrics.json: skipped

    runs = collect(tmp_path)
    assert len(runs) == 8
    run = next(r for r in runs if r.dataset == "mnist" and r.estimator == "iwae" and r.seed == 1)
    assert run.curves["val_log_likelihood"] == [(100, -122.0), (200, -112.0), (300, -102.0)]

    report = write_report(tmp_path, tmp_path / "report")
    text = report.read_text()
    for (dataset, estimator), values in LL.items():
        mean, std = statistics.fmean(values), statistics.stdev(values)
        assert f"| {dataset} | {estimator} | 64 | 0,1 | 300 | {mean:.2f} ± {std:.2f} |" in text
    for name in ("val_log_likelihood", "inference_grad_snr"):
        assert (tmp_path / "report" / f"{name}.png").stat().st_size > 1000
        assert f"]({name}.png)" in text
    assert not (tmp_path / "report" / "inference_grad_variance.png").exists()  # not logged


def test_committed_results_regenerate_from_the_committed_run_summaries(tmp_path):
    root = Path(__file__).resolve().parents[1] / "docs" / "results"
    regenerated = write_report(root / "runs", tmp_path).read_text()

    def table(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("|")]

    assert table(regenerated) == table((root / "results.md").read_text())
    assert len(table(regenerated)) == 2 + 16  # header + 8 estimators x 2 datasets
