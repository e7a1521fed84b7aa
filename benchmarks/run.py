"""Benchmark suite: ``python -m benchmarks.run [--device cuda] [--quick]``.

Measures, interleaving contenders so machine noise cancels (medians over repetitions):

1. training steps/s of the real path (``dreg.build.build`` + Lightning Trainer, CSV logger at its
   default interval, default callbacks) for every estimator in ``conf/estimator/``, and for
   DReG-IWAE against the independent loop (:class:`benchmarks.packed_loop.PackedLoop` with one
   replica, no dreg code);
2. step time of every estimator relative to ``iwae``, and step time versus K (real path);
3. log-likelihood evaluation throughput (points/s at S = 5000) and peak memory versus chunk size.

Writes ``benchmarks/results/<device>.json`` and ``.md``. Needs ``DREG_DATA_DIR`` (MNIST).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from benchmarks.packed_loop import PackedLoop, grey_levels, synchronize
from dreg.build import build, build_trainer
from dreg.files import atomic_write
from dreg.model import VAE

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


class StepTimer(pl.Callback):
    """Wall time from the first call that starts at or after step ``warmup`` to the end of the
    last step (a call may perform several steps: ``model.steps_per_call``)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, None, 0.0, 0
        self.first_step = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.start is None and trainer.global_step >= self.warmup:
            synchronize(module.device)
            self.start, self.first_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.start is not None:
            synchronize(module.device)
            self.end, self.steps = time.perf_counter(), trainer.global_step - self.first_step


def compose_cfg(estimator: str, num_samples: int, device: str, steps: int, out: Path):
    overrides = [
        f"estimator={estimator}",
        f"model.num_samples={num_samples}",
        "logger=csv",
        f"trainer.max_steps={steps}",
        "trainer.limit_val_batches=0",
        f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


def real_path_seconds(estimator: str, k: int, device: str, steps: int, warmup: int) -> float:
    """Seconds per step of ``python train.py``'s training path (no validation)."""
    with tempfile.TemporaryDirectory() as out:
        cfg = compose_cfg(estimator, k, device, warmup + steps, Path(out))
        datamodule, module = build(cfg)
        trainer = build_trainer(cfg, Path(out))
        timer = StepTimer(warmup)
        trainer.callbacks.append(timer)
        trainer.fit(module, datamodule=datamodule)
        return (timer.end - timer.start) / timer.steps


def independent_seconds(k: int, device: str, steps: int, warmup: int) -> float:
    """Seconds per step of the independent loop (DReG-IWAE, one replica)."""
    loop = PackedLoop(1, device, k=k, data=grey_levels(4096))
    return loop.timed(steps, warmup)[0] / steps


def proc_status_kib(field: str) -> int:
    """A memory field of /proc/self/status (Linux), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the peak resident set size (VmHWM) to the current one; return it in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return proc_status_kib("VmRSS")


def eval_throughput(device: str, chunk: int, num_samples: int = 5000, points: int = 100) -> dict:
    """Points/s of the S-sample log-likelihood estimate, and its peak memory, at one chunk size.

    Run in a fresh process (``--eval-child``) on the paper's architecture with random binary
    images, so the peak resident memory on CPU is the evaluation's own and not an earlier one.
    """
    torch.manual_seed(0)
    dev = torch.device(device)
    net = VAE(784, train_mean=torch.full((784,), 0.13)).to(dev)
    x = torch.bernoulli(torch.full((points, 784), 0.13)).to(dev)
    net.log_likelihood(x[:1], 2 * chunk, chunk_size=chunk)  # warm-up: allocator, kernels
    synchronize(dev)
    rss_before = reset_peak_rss()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    start = time.perf_counter()
    net.log_likelihood(x, num_samples, chunk_size=chunk)
    synchronize(dev)
    seconds = time.perf_counter() - start
    if dev.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    else:
        peak_mb = (proc_status_kib("VmHWM") - rss_before) / 1024
    return {"chunk_size": chunk, "points_per_s": points / seconds, "peak_mb": peak_mb}


def estimator_names() -> list[str]:
    names = sorted(p.stem for p in (ROOT / "conf" / "estimator").glob("*.yaml"))
    return ["iwae"] + [n for n in names if n != "iwae"]


def markdown(results: dict) -> str:
    lines = [f"# Benchmarks ({results['device_name']}, torch {results['torch']})", ""]
    lines += [
        f"{results['when']}; {results['threads']} torch threads; "
        f"medians of {results['repeats']} interleaved repetitions; batch 32.",
        "",
    ]
    lines += [
        "## Training (K = 64)",
        "",
        "| estimator | real path steps/s | step time / iwae |",
        "|---|---|---|",
    ]
    for name, row in results["training"].items():
        lines.append(
            f"| {name} | {row['real_steps_per_s']:.1f} | {row['step_time_over_iwae']:.3f} |"
        )
    loop = results["independent"]
    lines += [
        "",
        f"DReG-IWAE: real path {loop['real_steps_per_s']:.1f} steps/s, independent loop "
        f"(`benchmarks/packed_loop.py`, one replica) {loop['independent_steps_per_s']:.1f} "
        f"steps/s: real / independent **{loop['real_over_independent']:.3f}**.",
    ]
    ks = results["k_values"]
    lines += [
        "",
        "## Step time (ms, real path) versus K",
        "",
        "| estimator | " + " | ".join(f"K={k}" for k in ks) + " | log-log slope |",
        "|---|" + "---|" * (len(ks) + 1),
    ]
    for name, row in results["versus_k"].items():
        cells = " | ".join(f"{1000 * row['seconds'][str(k)]:.1f}" for k in ks)
        lines.append(f"| {name} | {cells} | {row['slope']:.2f} |")
    lines += [
        "",
        "## Log-likelihood evaluation (S = 5000 samples per point)",
        "",
        "| chunk size | points/s | peak memory (MB) |",
        "|---|---|---|",
    ]
    for row in results["evaluation"]:
        lines.append(f"| {row['chunk_size']} | {row['points_per_s']:.1f} | {row['peak_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def slope(ks: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(time) on log(K): 1 = linear growth."""
    xs = [torch.log(torch.tensor(float(k))).item() for k in ks]
    ys = [torch.log(torch.tensor(s)).item() for s in seconds]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--k-repeats", type=int, default=1, help="repetitions per K point")
    parser.add_argument("--quick", action="store_true", help="iwae and dreg_iwae only, few steps")
    parser.add_argument("--estimators", nargs="*", default=None)
    parser.add_argument("--eval-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.eval_child is not None:  # one chunk size in a fresh process (clean peak RSS)
        print(json.dumps(eval_throughput(args.device, args.eval_child)))
        return
    pl.seed_everything(0)
    names = args.estimators or (["iwae", "dreg_iwae"] if args.quick else estimator_names())
    steps = 10 if args.quick else args.steps
    k_values = [16, 64, 256] if args.quick else [16, 64, 256, 1024]

    real: dict[str, list[float]] = {n: [] for n in names}
    independent: list[float] = []
    for _ in range(args.repeats):  # interleaved: every contender sees the same machine state
        for name in names:
            real[name].append(real_path_seconds(name, 64, args.device, steps, warmup=5))
        independent.append(independent_seconds(64, args.device, steps, warmup=5))
    med = {n: statistics.median(real[n]) for n in names}
    training = {
        n: {"real_steps_per_s": 1 / r, "step_time_over_iwae": r / med["iwae"]}
        for n, r in med.items()
    }
    loop = statistics.median(independent)
    compared = {
        "real_steps_per_s": 1 / med["dreg_iwae"],
        "independent_steps_per_s": 1 / loop,
        "real_over_independent": loop / med["dreg_iwae"],
    }
    versus_k = {}
    for name in names:
        seconds = {}
        for k in k_values:
            reps = [
                real_path_seconds(name, k, args.device, max(3, steps * 16 // k), 2)
                for _ in range(args.k_repeats)
            ]
            seconds[str(k)] = statistics.median(reps)
        versus_k[name] = {"seconds": seconds, "slope": slope(k_values, list(seconds.values()))}
    evaluation = []
    for chunk in [100, 500, 1000, 5000]:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.run",
                "--device",
                args.device,
                "--eval-child",
                str(chunk),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        evaluation.append(json.loads(out.stdout.strip().splitlines()[-1]))

    results = {
        **measurement_context(args.device, args.repeats, steps),
        "k_values": k_values,
        "training": training,
        "independent": compared,
        "versus_k": versus_k,
        "evaluation": evaluation,
        "raw": {"real_seconds": real, "independent_seconds": independent},
    }
    write_results(args.device, results, markdown(results))


def measurement_context(device: str, repeats: int, steps: int) -> dict:
    """What a reader needs to weigh the numbers: the machine, torch, threads, when."""
    name = torch.cuda.get_device_name() if device == "cuda" else None
    return {
        "device": device,
        "device_name": name or platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "steps": steps,
        "when": time.strftime("%Y-%m-%d %H:%M"),
    }


def write_results(stem: str, results: dict, table: str) -> None:
    """``benchmarks/results/<stem>.json`` and ``.md``, each written atomically."""
    with atomic_write(RESULTS / f"{stem}.json") as f:
        f.write(json.dumps(results, indent=2) + "\n")
    with atomic_write(RESULTS / f"{stem}.md") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
