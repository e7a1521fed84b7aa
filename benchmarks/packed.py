"""Packs: aggregate model-steps/s and peak memory versus pack size M, ours against an independent loop.

For each pack size M it measures, interleaved within each repetition (medians reported):

* **ours**: the real training path. M jobs, each seeded (``pl.seed_everything(seed)``) and
  built from the composed config (:func:`dreg.build.build`, :func:`dreg.build.build_trainer`:
  DReG-IWAE, K = 64, batch 32, Adam 3e-4, fp32, CSV logger, checkpoint callbacks, default
  ``model.steps_per_call``; no validation) inside its own thread of
  :class:`dreg.pack.Pack`, all trained together: ``batched=False`` (one replica's kernels
  after another) and ``batched=True`` (stacked weights, batched products). At M = 1 "ours" is
  a normal run: ``trainer.fit`` in the main thread, no pack (``batched`` changes nothing).
* **independent**: :class:`benchmarks.packed_loop.PackedLoop`, the same M replicas written
  without dreg (stacked weights, ``baddbmm`` layers, the same DReG step, one Adam).

Every (contender, M) runs in a fresh subprocess (``--worker``), so its peak memory is its own:
peak resident memory (VmHWM) on CPU, ``torch.cuda.max_memory_allocated`` on CUDA. Throughput
is model-steps/s: the steps every replica trained in the timed window (after ``--warmup``
steps) over the window's wall time; per-replica step time = M / throughput.

    python -m benchmarks.packed                          # GPU if there is one, M = 1 ... 96
    python -m benchmarks.packed --device cpu --quick     # M = 1, 2, 4, 8, few steps
    python -m benchmarks.packed --device cpu --sizes 1,2,4,8,16,48,96 --threads 1

Writes ``benchmarks/results/packed_<device>.{json,md}``. Needs ``DREG_DATA_DIR`` (MNIST).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import open_dict

from benchmarks.packed_loop import PackedLoop, grey_levels, synchronize
from benchmarks.run import (
    ROOT,
    StepTimer,
    compose_cfg,
    measurement_context,
    proc_status_kib,
    reset_peak_rss,
    write_results,
)

SIZES = [1, 2, 4, 8, 16, 48, 96]
QUICK_SIZES = [1, 2, 4, 8]
OURS = {"ours_unbatched": False, "ours_batched": True}
# The paper's grid: 48 runs of 5M steps each (docs: families x estimators x seeds).
GRID_MODEL_STEPS = 48 * 5_000_000


# -- one measurement (in a fresh process) ----------------------------------------------------------
@contextlib.contextmanager
def memory_window(device: torch.device) -> Iterator[dict]:
    """Peak memory of the block: CPU peak resident set (VmHWM), CUDA peak allocated; both
    absolute and above what the process held when the block began (MB)."""
    out: dict = {}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = reset_peak_rss() * 1024
    yield out
    if device.type == "cuda":
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = proc_status_kib("VmHWM") * 1024
    out.update(peak_mb=peak / 2**20, before_mb=before / 2**20, added_mb=(peak - before) / 2**20)


@contextlib.contextmanager
def mnist_read_once() -> Iterator[None]:
    """Jobs of one worker read the MNIST files once (the same tensors; nothing writes them):
    saves M - 1 decompressions per pack. Training is unchanged."""
    from dreg.datamodules.mnist import MNISTDataModule

    original = MNISTDataModule.read_images
    cache: dict[str, tuple] = {}

    def read_images(self):
        key = str(self.raw_dir)
        if key not in cache:
            cache[key] = original(self)
        return cache[key]

    MNISTDataModule.read_images = read_images
    try:
        yield
    finally:
        MNISTDataModule.read_images = original


def ours_measurement(
    m: int,
    device: str,
    batched: bool,
    steps: int,
    warmup: int,
    k: int = 64,
    hidden: tuple[int, ...] = (200, 200),
    latent: int = 50,
    train_subset: int = 4096,
) -> dict:
    """Train M jobs of the real path together; the timed window starts at the first training
    call at or after step ``warmup`` of each job and ends at its last step."""
    from hydra.utils import instantiate

    from dreg.build import build, build_trainer
    from dreg.pack import Pack

    dev = torch.device(device)
    with tempfile.TemporaryDirectory() as tmp, mnist_read_once():
        base = compose_cfg("dreg_iwae", k, device, warmup + steps, Path(tmp))
        with open_dict(base):
            # An epoch longer than the run: no epoch-end hooks in the window.
            base.dataset.train_subset = max(train_subset, 32 * (warmup + steps + 1))
            base.dataset.eval_subset = 100
            base.model.net.hidden_dims = list(hidden)
            base.model.net.latent_dim = latent
            base.callbacks.pop("progress_bar", None)
            base.trainer.enable_progress_bar = False
        instantiate(base.dataset).read_images()  # the shared file tensors, before the window
        timers = [StepTimer(warmup) for _ in range(m)]

        def job(i: int):
            cfg = copy.deepcopy(base)
            out = Path(tmp) / f"job{i}"
            with open_dict(cfg):
                cfg.seed, cfg.paths.output_dir = i, str(out)
            pl.seed_everything(i, verbose=False)  # as dreg.run.train: seed, build, fit
            datamodule, module = build(cfg)
            for split in ("val", "test"):  # no validation here: drop the whole-split storage
                datamodule.splits[split] = datamodule.splits[split].clone()
            trainer = build_trainer(cfg, out)
            trainer.callbacks.append(timers[i])
            return trainer.fit(module, datamodule=datamodule)

        with memory_window(dev) as memory:
            if m == 1:
                job(0)  # a normal run: no pack
            else:
                results = Pack(batched=batched).run([(f"job{i}", lambda i=i: job(i)) for i in range(m)])
                for result in results:
                    if isinstance(result, BaseException):
                        raise result
    if any(t.start is None for t in timers):
        raise RuntimeError(f"warmup {warmup} >= steps trained {warmup + steps}: nothing timed")
    seconds = max(t.end for t in timers) - min(t.start for t in timers)
    return {"seconds": seconds, "model_steps": sum(t.steps for t in timers), **memory}


def independent_measurement(
    m: int,
    device: str,
    steps: int,
    warmup: int,
    k: int = 64,
    hidden: tuple[int, ...] = (200, 200),
    latent: int = 50,
    train_subset: int = 4096,
) -> dict:
    dev = torch.device(device)
    loop = PackedLoop(m, dev, k=k, hidden=hidden, latent=latent, data=grey_levels(train_subset))
    with memory_window(dev) as memory:
        seconds = loop.seconds(steps, warmup)
    return {"seconds": seconds, "model_steps": m * steps, **memory}


def measure(contender: str, m: int, device: str, steps: int, warmup: int, **kwargs) -> dict:
    """One (contender, M) measurement in this process: throughput and peak memory."""
    if contender in OURS:
        row = ours_measurement(m, device, OURS[contender], steps, warmup, **kwargs)
    elif contender == "independent":
        row = independent_measurement(m, device, steps, warmup, **kwargs)
    else:
        raise ValueError(f"unknown contender {contender!r}: {[*OURS, 'independent']}")
    row.update(contender=contender, m=m, model_steps_per_s=row["model_steps"] / row["seconds"])
    return row


def measure_in_subprocess(contender: str, m: int, args: argparse.Namespace, steps: int) -> dict:
    command = [
        sys.executable,
        "-m",
        "benchmarks.packed",
        "--worker",
        contender,
        "--m",
        str(m),
        "--device",
        args.device,
        "--steps",
        str(steps),
        "--warmup",
        str(args.warmup),
        "--num-samples",
        str(args.num_samples),
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        print(f"{contender} M={m} failed (exit {done.returncode}): {' | '.join(tail)}", flush=True)
        return {"contender": contender, "m": m, "error": "\n".join(tail)}
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the sweep --------------------------------------------------------------------------------------
def steps_for(m: int, args: argparse.Namespace) -> int:
    """Timed steps at pack size M: ``--steps``, else about ``--replica-steps`` replica-steps,
    whole groups of ``model.steps_per_call`` (4), at least one group."""
    if args.steps:
        return args.steps
    return max(4, 4 * math.ceil(args.replica_steps / m / 4))


def summarize(raw: dict[str, dict[int, list[dict]]], sizes: list[int]) -> dict:
    """Medians per (contender, M) and the derived ratios."""
    table: dict[str, dict[str, dict]] = {}
    for contender, by_m in raw.items():
        table[contender] = {}
        for m in sizes:
            good = [r for r in by_m.get(m, []) if "error" not in r]
            if not good:
                errors = [r["error"] for r in by_m.get(m, [])]
                table[contender][str(m)] = {"error": errors[-1] if errors else "not run"}
                continue
            rate = statistics.median(r["model_steps_per_s"] for r in good)
            table[contender][str(m)] = {
                "model_steps_per_s": rate,
                "replica_step_ms": 1000 / rate,
                "peak_mb": max(r["peak_mb"] for r in good),
                "added_mb": max(r["added_mb"] for r in good),
                "repeats": len(good),
            }
    for contender, rows in table.items():
        solo = rows.get("1", {}).get("model_steps_per_s")
        for row in rows.values():
            if solo and "model_steps_per_s" in row:
                row["replica_cost_vs_solo"] = solo / row["model_steps_per_s"]
    for contender in OURS:
        for m, row in table.get(contender, {}).items():
            other = table.get("independent", {}).get(m, {}).get("model_steps_per_s")
            if other and "model_steps_per_s" in row:
                row["over_independent"] = row["model_steps_per_s"] / other
    return table


def markdown(results: dict) -> str:
    table, sizes = results["table"], results["sizes"]
    ours = [c for c in OURS if c in table]
    label = {"ours_unbatched": "ours batched=false", "ours_batched": "ours batched=true"}
    contenders = ours + ["independent"]

    def cell(contender: str, m: int, key: str, fmt: str) -> str:
        row = table[contender].get(str(m), {})
        if "error" in row:
            return "failed"
        return format(row[key], fmt) if key in row else "-"

    lines = [
        f"# Packs: model-steps/s versus pack size ({results['device_name']}, "
        f"torch {results['torch']})",
        "",
        f"{results['when']}; {results['threads']} torch threads; medians of "
        f"{results['repeats']} interleaved repetitions, each (contender, M) in a fresh process; "
        f"the paper's VAE 784-200-200-50 (tanh, Bernoulli), DReG-IWAE, K = {results['k']}, "
        f"batch 32 per replica, Adam 3e-4, fp32. Timed steps per M (after {results['warmup']} "
        f"warm-up steps): "
        + ", ".join(f"M={m}: {results['steps_per_m'][str(m)]}" for m in sizes)
        + ".",
        "",
        "*ours*: the real training path (seeded `build` + `build_trainer`, CSV logger, "
        "checkpoint callbacks, `model.steps_per_call=4`, no validation), M jobs in one "
        "`dreg.pack.Pack`; at M = 1 a normal run, no pack. *independent*: "
        "`benchmarks/packed_loop.py` (no dreg code: stacked weights, `baddbmm` layers, the same "
        "DReG step, one Adam). Model-steps/s = steps of all replicas / wall time; per-replica "
        "cost = (M / model-steps/s) / (a solo step of the same contender); peak memory = "
        + ("peak resident set (VmHWM) of the process" if results["device"] == "cpu"
           else "`torch.cuda.max_memory_allocated`")
        + " in MB.",
        "",
        "| M | "
        + " | ".join(f"{label.get(c, c)} model-steps/s" for c in contenders)
        + " | per-replica cost vs solo ("
        + " / ".join(label.get(c, c) for c in contenders)
        + ") | "
        + " | ".join(f"{label[c]} / independent" for c in ours)
        + " | peak memory MB ("
        + " / ".join(label.get(c, c) for c in contenders)
        + ") |",
        "|---|" + "---|" * (len(contenders) + 2 + len(ours)),
    ]
    for m in sizes:
        rates = " | ".join(cell(c, m, "model_steps_per_s", ".1f") for c in contenders)
        costs = " / ".join(cell(c, m, "replica_cost_vs_solo", ".2f") for c in contenders)
        ratios = " | ".join(cell(c, m, "over_independent", ".2f") for c in ours)
        memory = " / ".join(cell(c, m, "peak_mb", ".0f") for c in contenders)
        lines.append(f"| {m} | {rates} | {costs} | {ratios} | {memory} |")
    lines += ["", *results["notes"]]
    return "\n".join(lines) + "\n"


def notes(results: dict) -> list[str]:
    """The target check, the best throughput and the grid's cost at it."""
    table, out = results["table"], []
    if results["device"] == "cpu" and "8" in table.get("ours_unbatched", {}):
        parts = []
        for c in OURS:
            cost = table.get(c, {}).get("8", {}).get("replica_cost_vs_solo")
            if cost is not None:
                parts.append(f"{c} {cost:.2f}x ({'met' if cost <= 1.1 else 'NOT met'})")
        out.append(
            "Target (CPU): per-replica cost at M = 8 at most 1.1x a solo run's step time: "
            + "; ".join(parts)
            + "."
        )
    best = max(
        (
            (row["model_steps_per_s"], c, int(m))
            for c, rows in table.items()
            for m, row in rows.items()
            if "model_steps_per_s" in row
        ),
        default=None,
    )
    if best is not None:
        rate, contender, m = best
        best_ours = max(
            (
                (row["model_steps_per_s"], c, int(mm))
                for c, rows in table.items()
                if c in OURS
                for mm, row in rows.items()
                if "model_steps_per_s" in row
            ),
            default=None,
        )
        unit = "GPU-hours" if results["device"] == "cuda" else "CPU-hours"
        where = f"{results['device_name']}, {results['threads']} torch threads"
        out.append(
            f"The paper's grid (48 runs x 5M steps = {GRID_MODEL_STEPS / 1e6:.0f}M model-steps), "
            f"measured on {results['device']} ({where}): best aggregate {rate:.1f} "
            f"model-steps/s ({contender}, M = {m}) -> "
            f"{GRID_MODEL_STEPS / rate / 3600:,.0f} {unit}"
            + (
                f"; with ours at its best ({best_ours[0]:.1f} model-steps/s, {best_ours[1]}, "
                f"M = {best_ours[2]}) -> {GRID_MODEL_STEPS / best_ours[0] / 3600:,.0f} {unit}"
                if best_ours is not None and best_ours[1] != contender
                else ""
            )
            + "."
        )
    failed = [
        f"{c} M={m}: {row['error'].splitlines()[-1] if row['error'] else '?'}"
        for c, rows in table.items()
        for m, row in rows.items()
        if "error" in row
    ]
    if failed:
        out.append("Failed measurements: " + "; ".join(failed) + ".")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="M = 1, 2, 4, 8 and few steps")
    parser.add_argument("--sizes", default=None, help="pack sizes, e.g. 1,2,4,8")
    parser.add_argument("--steps", type=int, default=None, help="timed steps at every M")
    parser.add_argument(
        "--replica-steps", type=int, default=None, help="else: timed replica-steps per (M, run)"
    )
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    parser.add_argument(
        "--contenders",
        default=None,
        help="comma list of ours_unbatched, ours_batched, independent (default: all on CPU; "
        "ours_batched and independent on CUDA)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--m", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker is not None:  # one measurement in a fresh process
        row = measure(
            args.worker, args.m, args.device, args.steps, args.warmup, k=args.num_samples
        )
        print(json.dumps(row))
        return

    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    sizes = sizes or (QUICK_SIZES if args.quick else SIZES)
    if args.replica_steps is None:
        args.replica_steps = 32 if args.quick else 256
    if args.contenders:
        contenders = args.contenders.split(",")
    elif args.device == "cuda":
        contenders = ["ours_batched", "independent"]
    else:
        contenders = [*OURS, "independent"]
    steps = {m: steps_for(m, args) for m in sizes}
    raw: dict[str, dict[int, list[dict]]] = {c: {m: [] for m in sizes} for c in contenders}
    for repeat in range(args.repeats):  # interleaved: every contender sees the same machine
        for m in sizes:
            for contender in contenders:
                if contender in OURS and m == 1 and contender != contenders[0]:
                    continue  # M = 1 is a normal run, the same for both: measured once
                row = measure_in_subprocess(contender, m, args, steps[m])
                raw[contender][m].append(row)
                if "error" not in row:
                    print(
                        f"[{repeat + 1}/{args.repeats}] {contender:>14} M={m:<3} "
                        f"{row['model_steps_per_s']:8.1f} model-steps/s  "
                        f"{row['peak_mb']:7.0f} MB peak",
                        flush=True,
                    )
    for contender in contenders:  # M = 1 is a normal run, the same for both: measured once
        if contender in OURS and 1 in sizes and not raw[contender][1]:
            first = next(c for c in contenders if c in OURS)
            raw[contender][1] = raw[first][1]
    results = {
        **measurement_context(args.device, args.repeats, max(steps.values())),
        "threads": args.threads or torch.get_num_threads(),
        "k": args.num_samples,
        "warmup": args.warmup,
        "sizes": sizes,
        "steps_per_m": {str(m): s for m, s in steps.items()},
        "contenders": contenders,
        "grid_model_steps": GRID_MODEL_STEPS,
    }
    results["table"] = summarize(raw, sizes)
    results["notes"] = notes(results)
    results["raw"] = {c: {str(m): rows for m, rows in by_m.items()} for c, by_m in raw.items()}
    write_results(f"packed_{args.device}", results, markdown(results))


if __name__ == "__main__":
    main()
