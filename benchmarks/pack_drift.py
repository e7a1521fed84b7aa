"""How far a packed job drifts from its run alone: the same sweep with and without packing.

Runs ``python train.py -m 'seed=0,1' <args>`` twice, through Hydra's basic launcher (each job
alone) and through ``hydra/launcher=packed`` (the two jobs as one stacked model), then
compares each job's final parameters (``last.ckpt``) and its logged numbers. The stacked
model's batched products sum in another order than a single model's, so the two differ by
float round-off, which training then carries along. The control: the same runs alone with two
threads instead of one, whose products also sum in another order, and nothing else changes.

    python -m benchmarks.pack_drift --steps 1000
    python -m benchmarks.pack_drift --steps 1000 hydra.launcher.replicas_per_pass=2

Overrides after the options go to the packed sweep only (the second line: the two jobs as one
stacked model, where ``auto`` steps each of these large replicas alone, in place, on a CPU).
Writes ``benchmarks/results/pack_drift_<device>[_<overrides>].{json,md}``. Needs
``DREG_DATA_DIR``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from benchmarks.packed import run
from benchmarks.run import ROOT, measurement_context, write_results
from dreg.checkpointing import load_checkpoint

SEEDS = (0, 1)


def sweep(out: Path, steps: int, packed: bool, threads: int, overrides: list[str]) -> None:
    args = [
        "train.py", "-m", f"seed={','.join(map(str, SEEDS))}", "estimator=dreg_iwae",
        f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
        "dataset.eval_subset=1000", "model.eval_num_samples=500", "logger=csv",
        "callbacks.progress_bar=null", "trainer.enable_progress_bar=false",
        f"hydra.sweep.dir={out}", "hydra.sweep.subdir=${hydra:job.num}",
    ]  # fmt: skip
    if packed:
        args += ["hydra/launcher=packed", *overrides]
    run([sys.executable, *args], threads)


def compare(alone: Path, packed: Path) -> dict:
    want = load_checkpoint(alone / "checkpoints" / "last.ckpt")["state_dict"]
    got = load_checkpoint(packed / "checkpoints" / "last.ckpt")["state_dict"]
    keys = [k for k in want if want[k].numel()]
    abs_diff = max(float((got[k] - want[k]).abs().max()) for k in keys)
    scale = max(float(want[k].abs().max()) for k in keys)
    flat_got = torch.cat([got[k].flatten().double() for k in keys])
    flat_want = torch.cat([want[k].flatten().double() for k in keys])
    relative = float((flat_got - flat_want).norm() / flat_want.norm())
    metrics = [json.loads((job / "metrics.json").read_text()) for job in (alone, packed)]
    keys = [k for k in ("train/objective", "val/log_likelihood", "test/log_likelihood")
            if k in metrics[0]]  # fmt: skip
    return {
        "max_abs_param_diff": abs_diff,
        "max_abs_param": scale,
        "relative_l2_diff": relative,
        "metrics_alone": {k: metrics[0][k] for k in keys},
        "metrics_packed": {k: metrics[1][k] for k in keys},
        "pack_size": metrics[1]["pack_size"],
        "steps": metrics[1]["global_step"],
        "finite": all(torch.isfinite(t).all() for t in got.values()),
    }


def markdown(results: dict) -> str:
    ctx = results["context"]
    lines = [
        f"# A packed job against its run alone after {ctx['steps']} steps "
        f"({ctx['device_name']}, torch {ctx['torch']})",
        "",
        f"{ctx['when']}; the paper's VAE, DReG-IWAE, K 64, batch 32, Adam 3e-4, fp32; seeds "
        f"{', '.join(map(str, SEEDS))} alone and as one pack of {len(SEEDS)}"
        + (f" ({' '.join(results['overrides'])})" if results.get("overrides") else "")
        + ".",
        "",
        "| seed, against the run alone | relative L2 difference of all parameters | "
        "max abs parameter difference (largest parameter) | test LL alone | test LL other |",
        "|---|---|---|---|---|",
    ]
    rows = [(f"{seed}, packed", row) for seed, row in results["jobs"].items()]
    rows += [(f"{seed}, alone with one more thread (control)", row)
             for seed, row in results["control_more_threads"].items()]  # fmt: skip
    for seed, row in rows:
        a, p = row["metrics_alone"], row["metrics_packed"]
        lines.append(
            f"| {seed} | {row['relative_l2_diff']:.2e} | "
            f"{row['max_abs_param_diff']:.2e} ({row['max_abs_param']:.2f}) | "
            f"{a.get('test/log_likelihood', float('nan')):.4f} | "
            f"{p.get('test/log_likelihood', float('nan')):.4f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "outputs" / "pack_drift",
        help="sweep folders (a sweep already finished there is reused)",
    )
    parser.add_argument("overrides", nargs="*", help="more train.py overrides (packed sweep)")
    args = parser.parse_args()
    tag = "".join("_" + re.sub(r"[^A-Za-z0-9]+", "_", o) for o in args.overrides)
    alone, packed = args.out / f"alone{args.steps}", args.out / f"packed{args.steps}{tag}"
    control = args.out / f"alone{args.steps}_threads{args.threads + 1}"
    runs = ((alone, False, args.threads), (packed, True, args.threads),
            (control, False, args.threads + 1))  # fmt: skip
    for folder, is_packed, threads in runs:
        if not all((folder / str(i) / "metrics.json").exists() for i in range(len(SEEDS))):
            sweep(folder, args.steps, is_packed, threads, args.overrides)
    jobs = {str(s): compare(alone / str(i), packed / str(i)) for i, s in enumerate(SEEDS)}
    controls = {str(s): compare(alone / str(i), control / str(i)) for i, s in enumerate(SEEDS)}
    results = {
        "context": measurement_context("cpu", 1, args.steps),
        "jobs": jobs,
        "control_more_threads": controls,
        "overrides": args.overrides,
    }
    write_results(f"pack_drift_cpu{tag}", results, markdown(results))


if __name__ == "__main__":
    main()
