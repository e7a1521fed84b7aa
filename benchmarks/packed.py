"""Packs through the command line against the independent batched loop, in one run.

Contenders, each a fresh process, interleaved within every repetition (medians reported):

* **solo**: ``python train.py <sizes> trainer.max_steps=N``, one run alone;
* **pack**: ``python train.py -m hydra/launcher=packed 'seed=range(0,M)' <sizes> ...``, M
  jobs trained as one batched model (:mod:`dreg.pack`);
* **loop**: ``python -m benchmarks.packed_loop --m M ...``, the independent batched loop (no
  dreg code: stacked weights, ``baddbmm`` layers, the same DReG step, one Adam).

Model-steps/s of a CLI contender: the sum of its jobs' ``global_step`` over the longest
``train_seconds`` in their ``metrics.json`` (Lightning's ``Timer``: the whole fit, first steps
and end-of-training checkpoints included); of the loop: M * N over the wall time of its N
steps after 3 warm-up steps (so the comparison leans in the loop's favour). Every process
gets ``OMP_NUM_THREADS`` threads.

Two settings (``--setting``):

* ``host``: latent 2, hidden [8], K 4, batch 32, M 48: a step whose arithmetic is tiny, so
  its cost is the host work a GPU also pays (the issue's target: pack >= 0.8x loop);
* ``paper``: the paper's 784-200-200-50 VAE, K 64, M 4 (target: a pack's per-job step
  <= 1.0x a solo step; on a CPU each of these jobs steps alone, in place, in turn with the
  others: ``hydra.launcher.replicas_per_pass=auto``).

    python -m benchmarks.packed --setting host --repeats 3
    python -m benchmarks.packed --setting paper --repeats 5 --steps 300
    python -m benchmarks.packed --setting paper --repeats 10 --steps 300 --contenders solo,pack
    python -m benchmarks.packed --setting host --device cuda model.cuda_graph=true

Writes ``benchmarks/results/packed_<setting>_<device>[_<contenders>].{json,md}`` (the
contenders named when fewer than all three). Needs ``DREG_DATA_DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.run import ROOT, measurement_context, write_results

SETTINGS = {
    "host": {"latent": 2, "hidden": [8], "k": 4, "m": 48, "steps": 400},
    "paper": {"latent": 50, "hidden": [200, 200], "k": 64, "m": 4, "steps": 100},
}
CONTENDERS = ("solo", "pack", "loop")
# The paper's grid as the issue counts it: 48 runs of 5M steps each.
GRID_MODEL_STEPS = 48 * 5_000_000


def train_args(setting: dict, steps: int, device: str) -> list[str]:
    """``train.py`` overrides for ``setting``: no validation, a token test."""
    hidden = ",".join(map(str, setting["hidden"]))
    return [
        f"model.net.latent_dim={setting['latent']}",
        f"model.net.hidden_dims=[{hidden}]",
        f"model.num_samples={setting['k']}",
        "estimator=dreg_iwae",
        f"trainer.max_steps={steps}",
        "trainer.limit_val_batches=0",
        "trainer.limit_test_batches=1",
        "model.eval_num_samples=50",
        "dataset.eval_subset=100",
        "logger=csv",
        "callbacks.progress_bar=null",
        "trainer.enable_progress_bar=false",
        f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
    ]


def run(command: list[str], threads: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CI": "true"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env,
                            stdin=subprocess.DEVNULL, timeout=3600)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return result


def cli_rate(jobs: list[Path]) -> dict:
    """Model-steps/s of CLI jobs from their metrics.json."""
    metrics = [json.loads((job / "metrics.json").read_text()) for job in jobs]
    steps = sum(int(m["global_step"]) for m in metrics)
    seconds = max(float(m["train_seconds"]) for m in metrics)
    return {"model_steps": steps, "seconds": seconds, "rate": steps / seconds}


def measure(
    contender: str, setting: dict, steps: int, device: str, threads: int, extra: tuple = ()
) -> dict:
    """One measurement of ``contender`` (solo, pack or loop) in fresh processes; ``extra``:
    more ``train.py`` overrides (e.g. ``model.cuda_graph=true``)."""
    python = [sys.executable]
    args = [*train_args(setting, steps, device), *extra]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if contender == "solo":
            run([*python, "train.py", *args, f"hydra.run.dir={out}"], threads)
            return cli_rate([out])
        if contender == "pack":
            m = setting["m"]
            run([*python, "train.py", "-m", "hydra/launcher=packed",
                 f"hydra.launcher.max_pack_size={m}", f"seed=range(0,{m})", *args,
                 f"hydra.sweep.dir={out}", "hydra.sweep.subdir=${hydra:job.num}"],
                threads)  # fmt: skip
            return cli_rate([out / str(i) for i in range(m)])
    hidden = ",".join(map(str, setting["hidden"]))
    result = run([*python, "-m", "benchmarks.packed_loop", "--m", str(setting["m"]),
                  "--num-samples", str(setting["k"]), "--latent", str(setting["latent"]),
                  "--hidden", hidden, "--steps", str(steps), "--device", device, "--json"],
                 threads)  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


def markdown(results: dict) -> str:
    ctx, s, med = results["context"], results["setting"], results["median"]
    per_step = {c: 1000 / med[c] for c in med}  # ms per model-step
    lines = [
        "# Packs through the CLI"
        + (" against the independent batched loop" if "loop" in results["rates"] else "")
        + f" ({ctx['device_name']}, torch {ctx['torch']})",
        "",
        f"{ctx['when']}; setting `{results['name']}`: latent {s['latent']}, hidden "
        f"{s['hidden']}, K {s['k']}, batch 32, DReG-IWAE, Adam; pack of M = {s['m']}; "
        f"{ctx['steps']} steps per job; {results['threads']} thread(s) per process; "
        f"contenders interleaved, medians of {ctx['repeats']} repetitions"
        + (f"; train.py overrides {results.get('overrides')}" if results.get("overrides") else "")
        + ".",
        "",
        "| contender | model-steps/s (each repetition) | median | ms per model-step |",
        "|---|---|---|---|",
    ]
    rates = results["rates"]
    for name, each in rates.items():
        shown = ", ".join(f"{r:.1f}" if r < 100 else f"{r:.0f}" for r in each)
        lines.append(f"| {name} | {shown} | {med[name]:.1f} | {per_step[name]:.2f} |")
    lines.append("")
    if "pack" in rates and "loop" in rates:
        lines.append(
            f"- pack / loop: **{med['pack'] / med['loop']:.2f}x** (in each repetition: "
            + ", ".join(f"{p / lp:.2f}" for p, lp in zip(rates["pack"], rates["loop"], strict=True))
            + ")"
        )
    if "pack" in rates and "solo" in rates:
        ratio = per_step["pack"] / per_step["solo"]
        lines.append(
            f"- a packed job's step / its step alone: **{ratio:.2f}x** (in each repetition: "
            + ", ".join(f"{s / p:.2f}" for s, p in zip(rates["solo"], rates["pack"], strict=True))
            + ")"
        )
    if results["name"] == "paper" and "pack" in rates:
        lines.append(f"- the paper's grid (48 runs x 5M steps) at the pack's rate: "
                     f"{GRID_MODEL_STEPS / med['pack'] / 3600:,.0f} hours of this process")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="host")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, help="steps per job (default: the setting's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help="a comma-separated subset of solo,pack,loop (results file named by "
                        "it unless all three)")  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="more train.py overrides (solo and pack)")
    args = parser.parse_args()
    setting = SETTINGS[args.setting]
    steps = args.steps or setting["steps"]
    chosen = args.contenders.split(",")
    if not chosen or any(c not in CONTENDERS for c in chosen):
        parser.error(f"--contenders={args.contenders}: name some of {','.join(CONTENDERS)}")
    rates: dict[str, list[float]] = {c: [] for c in CONTENDERS if c in chosen}
    for repeat in range(args.repeats):
        for contender in rates:
            row = measure(
                contender, setting, steps, args.device, args.threads, tuple(args.overrides)
            )
            rates[contender].append(row["rate"])
            print(f"repeat {repeat} {contender}: {row['rate']:.1f} model-steps/s", flush=True)
    results = {
        "name": args.setting,
        "setting": setting,
        "threads": args.threads,
        "overrides": args.overrides,
        "context": measurement_context(args.device, args.repeats, steps),
        "rates": rates,
        "median": {c: statistics.median(r) for c, r in rates.items()},
    }
    name = f"packed_{args.setting}_{args.device}"
    if len(rates) < len(CONTENDERS):
        name += "_" + "_".join(rates)
    write_results(name, results, markdown(results))


if __name__ == "__main__":
    main()
