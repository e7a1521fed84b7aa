"""The sweep report reads runs from their own files, groups them by every setting but the seed,
and says what it could not average or plot."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dreg.report import collect, write_report
from tests.conftest import ROOT, requires_mnist

LL = {
    ("mnist", "iwae"): [-100.0, -102.0],
    ("mnist", "dreg_iwae"): [-99.0, -99.5],
    ("omniglot", "iwae"): [-120.0, -121.0],
    ("omniglot", "dreg_iwae"): [-118.0, -119.0],
}


def fake_run(
    root: Path,
    dataset: str,
    estimator: str,
    seed: int,
    ll: float,
    num_samples: int = 64,
    folder: str | None = None,
    curves: bool = True,
) -> Path:
    run = root / (folder or f"dataset={dataset},estimator={estimator},seed={seed}")
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(
        {
            "seed": seed,
            "model": {"num_samples": num_samples, "eval_num_samples": 50},
            "dataset": {"_target_": f"x.{dataset}"},
            "estimator": {"_target_": f"x.{estimator}"},
            "paths": {"output_dir": str(run)},  # differs per run, cannot change results
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
    if curves:
        (run / "csv").mkdir()
        rows = ["epoch,step,train/objective,val/log_likelihood,grad/inference/snr"]
        rows += [f",{s},,,{0.5 + s / 1000}" for s in (50, 150)]
        rows += [f"0,{s - 1},,{ll - (300 - s) / 10}," for s in (100, 200, 300)]
        (run / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    return run


def table(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def test_report_tables_and_plots_a_sweep(tmp_path):
    for (dataset, estimator), values in LL.items():
        for seed, ll in enumerate(values):
            fake_run(tmp_path, dataset, estimator, seed, ll)
    (tmp_path / "unfinished" / ".hydra").mkdir(parents=True)  # no metrics.json: listed
    OmegaConf.save({"seed": 0}, tmp_path / "unfinished" / ".hydra" / "config.yaml")

    runs = collect(tmp_path)
    assert len(runs) == 8
    run = next(r for r in runs if r.dataset == "mnist" and r.estimator == "iwae" and r.seed == 1)
    # x = updates completed: validation rows are logged at the step before
    assert run.curves["val_log_likelihood"] == [(100, -122.0), (200, -112.0), (300, -102.0)]

    text = write_report(tmp_path, tmp_path / "report").read_text()
    assert table(text)[0] == (
        "| dataset | estimator | K | S | n | seeds | steps | test log-likelihood (S samples) "
        "| test bound (K samples) |"
    )
    for (dataset, estimator), values in LL.items():
        mean, std = statistics.fmean(values), statistics.stdev(values)
        row = f"| {dataset} | {estimator} | 64 | 50 | 2 | 0,1 | 300 | {mean:.2f} ± {std:.2f} |"
        assert row in text
    assert "the groups differ in: `dataset`, `estimator`." in text
    assert "Not in the table (no metrics.json: unfinished or failed): `unfinished`." in text
    for name in ("val_log_likelihood", "inference_grad_snr"):
        assert (tmp_path / "report" / f"{name}.png").stat().st_size > 1000
        assert f"]({name}.png)" in text
    assert not (tmp_path / "report" / "inference_grad_variance.png").exists()  # not logged


def test_a_setting_that_differs_makes_its_own_rows(tmp_path):
    for num_samples in (2, 8):
        for seed in (0, 1):
            ll = -100.0 - num_samples - seed
            fake_run(tmp_path, "mnist", "iwae", seed, ll, num_samples, f"K={num_samples},s={seed}")
    text = write_report(tmp_path, tmp_path).read_text()
    assert table(text)[2:] == [
        "| 2 | 50 | 2 | 0,1 | 300 | -102.50 ± 0.71 | -104.50 ± 0.71 |",
        "| 8 | 50 | 2 | 0,1 | 300 | -108.50 ± 0.71 | -110.50 ± 0.71 |",
    ]
    assert "the groups differ in: `model.num_samples`." in text


def test_a_group_with_a_repeated_seed_is_flagged_not_averaged(tmp_path):
    fake_run(tmp_path, "mnist", "iwae", 0, -100.0, folder="a")
    fake_run(tmp_path, "mnist", "iwae", 0, -104.0, folder="b")  # same settings, same seed
    fake_run(tmp_path, "mnist", "iwae", 1, -102.0, folder="c", curves=False)
    text = write_report(tmp_path, tmp_path).read_text()
    assert table(text)[2:] == [
        "| 64 | 50 | 3 | 0,0,1 | 300 | not averaged: duplicate seeds | "
        "not averaged: duplicate seeds |"
    ]
    assert "**Duplicate seeds** [0] in group all runs: not averaged; keep one run" in text
    assert "Runs without curves (no csv/metrics.csv): `c`." in text


def test_no_runs_is_one_clear_error(tmp_path):
    command = [sys.executable, "-m", "dreg.report", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: no finished runs (metrics.json + .hydra/config.yaml) under {tmp_path}"
    )


@requires_mnist
@pytest.mark.slow
def test_a_real_sweep_over_k_and_seeds_reports_one_row_per_k(tmp_path):
    sweep = tmp_path / "sweep"
    subprocess.run(
        [
            sys.executable, "train.py", "-m", "debug=fast", "trainer.max_steps=10",
            "dataset.train_subset=512", "dataset.eval_subset=100",
            "model.num_samples=2,8", "seed=0,1", f"hydra.sweep.dir={sweep}",
        ],
        cwd=ROOT, check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=600,
    )  # fmt: skip
    subprocess.run([sys.executable, "-m", "dreg.report", str(sweep)], cwd=ROOT, check=True)
    text = (sweep / "results.md").read_text()
    rows = table(text)
    assert rows[0].startswith("| K | S | n | seeds | steps |")  # K and S from the configs
    assert [r.split(" | ")[:5] for r in rows[2:]] == [["| 2", "100", "2", "0,1", "10"],
                                                      ["| 8", "100", "2", "0,1", "10"]]  # fmt: skip
    assert "the groups differ in: `model.num_samples`." in text
    assert "Runs without curves (no csv/metrics.csv): none." in text

    # The same settings and seed again (a second copy of a job): flagged, not averaged.
    job = next(sweep.glob("3_*"))  # the 4th job: K=8, seed=1 (its folder: number, then values)
    shutil.copytree(job, sweep / "copy-of-K8-seed1")
    text = write_report(sweep, tmp_path / "report").read_text()
    assert "| 8 | 100 | 3 | 0,1,1 | 10 | not averaged: duplicate seeds |" in text
    assert "**Duplicate seeds** [1] in group K=8" in text


def test_committed_results_regenerate_from_the_committed_run_summaries(tmp_path):
    root = Path(__file__).resolve().parents[1] / "docs" / "results"
    regenerated = write_report(root / "runs", tmp_path).read_text()
    assert table(regenerated) == table((root / "results.md").read_text())
    assert len(table(regenerated)) == 2 + 16  # header + 8 estimators x 2 datasets
