"""Packs: model-steps/s and peak memory versus pack size M, ours beside an independent loop.

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
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import open_dict

from benchmarks.packed_loop import PackedLoop, grey_levels, synchronize
from benchmarks.run import (
    ROOT,
    compose_cfg,
    measurement_context,
    proc_status_kib,
    reset_peak_rss,
    write_results,
)

SIZES = [1, 2, 4, 8, 16, 48, 96]
QUICK_SIZES = [1, 2, 4, 8]
OURS = {"ours_unbatched": False, "ours_batched": True}
# The paper's grid as the issue counts it: 48 runs of 5M steps each.
GRID_MODEL_STEPS = 48 * 5_000_000


# -- one measurement (in a fresh process) -----------------------------------------------------
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


class WindowTimer(pl.Callback):
    """Wall and process CPU time at the first training call that starts at or after step
    ``warmup``, and at the end of every later call (a call may take several steps:
    ``model.steps_per_call``); ``steps`` trained in between."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.first_step, self.steps = warmup, 0, 0
        self.start: tuple[float, float] | None = None
        self.end: tuple[float, float] | None = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.start is None and trainer.global_step >= self.warmup:
            synchronize(module.device)
            self.start = (time.perf_counter(), time.process_time())
            self.first_step = trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.start is not None:
            synchronize(module.device)
            self.end = (time.perf_counter(), time.process_time())
            self.steps = trainer.global_step - self.first_step


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
    with tempfile.TemporaryDirectory() as tmp:
        base = compose_cfg("dreg_iwae", k, device, warmup + steps, Path(tmp))
        with open_dict(base):
            # An epoch longer than the run: no epoch-end hooks in the window.
            base.dataset.train_subset = max(train_subset, 32 * (warmup + steps + 1))
            base.model.net.hidden_dims = list(hidden)
            base.model.net.latent_dim = latent
            base.callbacks.pop("progress_bar", None)
            base.trainer.enable_progress_bar = False
        # The images, loaded before the window: the jobs' datamodules (same settings) share
        # this copy while it lives (dreg.datamodules.binarized).
        loaded = instantiate(base.dataset)
        loaded.prepare_data()
        loaded.model_kwargs()
        timers = [WindowTimer(warmup) for _ in range(m)]

        def job(i: int):
            cfg = copy.deepcopy(base)
            out = Path(tmp) / f"job{i}"
            with open_dict(cfg):
                cfg.seed, cfg.paths.output_dir = i, str(out)
            pl.seed_everything(i, verbose=False)  # as dreg.run.train: seed, build, fit
            datamodule, module = build(cfg)
            trainer = build_trainer(cfg, out)
            trainer.callbacks.append(timers[i])
            return trainer.fit(module, datamodule=datamodule)

        with memory_window(dev) as memory:
            if m == 1:
                job(0)  # a normal run: no pack
            else:
                results = Pack(batched=batched).run(
                    [(f"job{i}", lambda i=i: job(i)) for i in range(m)]
                )
                for result in results:
                    if isinstance(result, BaseException):
                        raise result
    del loaded
    if any(t.start is None for t in timers):
        raise RuntimeError(f"warmup {warmup} >= steps trained {warmup + steps}: nothing timed")
    start, end = min(t.start for t in timers), max(t.end for t in timers)  # (wall, cpu)
    return {
        "seconds": end[0] - start[0],
        "cpu_seconds": end[1] - start[1],
        "model_steps": sum(t.steps for t in timers),
        **memory,
    }


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
        seconds, cpu_seconds = loop.timed(steps, warmup)
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "model_steps": m * steps, **memory}


def measure(contender: str, m: int, device: str, steps: int, warmup: int, **kwargs) -> dict:
    """One (contender, M) measurement in this process: throughput and peak memory."""
    if contender in OURS:
        row = ours_measurement(m, device, OURS[contender], steps, warmup, **kwargs)
    elif contender == "independent":
        row = independent_measurement(m, device, steps, warmup, **kwargs)
    else:
        raise ValueError(f"unknown contender {contender!r}: {[*OURS, 'independent']}")
    row.update(
        contender=contender,
        m=m,
        model_steps_per_s=row["model_steps"] / row["seconds"],
        model_steps_per_cpu_s=row["model_steps"] / row["cpu_seconds"],
    )
    return row


def guard_memory(cap_mb: float, reserve_mb: float = 1536) -> None:
    """Stop this process (exit 3, one JSON line) before it takes the machine's last memory:
    when its resident set passes ``cap_mb`` or the machine's available memory falls under
    ``reserve_mb``. A CPU pack's peak is hard to predict (see the notes of the results), and
    an out-of-memory kill could hit another process."""

    def watch() -> None:
        while True:
            rss = proc_status_kib("VmRSS") / 1024
            available = meminfo_mb("MemAvailable")
            if rss > cap_mb or available < reserve_mb:
                why = (
                    f"memory guard: resident {rss:.0f} MB (cap {cap_mb:.0f}), "
                    f"{available:.0f} MB left on the machine"
                )
                print(json.dumps({"error": why}), flush=True)
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True, name="memory-guard").start()


def meminfo_mb(field: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/meminfo")


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
    if args.memory_cap_mb:
        command += ["--memory-cap-mb", str(args.memory_cap_mb)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode == 3 and '"error"' in done.stdout:
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{contender} M={m}: {row['error']}", flush=True)
        return {"contender": contender, "m": m, **row}
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        print(f"{contender} M={m} failed (exit {done.returncode}): {' | '.join(tail)}", flush=True)
        return {"contender": contender, "m": m, "error": "\n".join(tail)}
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the sweep ---------------------------------------------------------------------------------
def steps_for(m: int, args: argparse.Namespace) -> int:
    """Timed steps at pack size M: ``--steps``, else about ``--replica-steps`` replica-steps,
    whole groups of ``model.steps_per_call`` (4), at least one group."""
    if args.steps:
        return args.steps
    return max(4, 4 * math.ceil(args.replica_steps / m / 4))


def summarize(raw: dict[str, dict[int, list[dict]]], sizes: list[int]) -> dict:
    """Medians per (contender, M) and the derived ratios, for wall and for CPU time."""
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
            cpu_rate = statistics.median(r["model_steps_per_cpu_s"] for r in good)
            table[contender][str(m)] = {
                "model_steps_per_s": rate,
                "model_steps_per_cpu_s": cpu_rate,
                "replica_step_ms": 1000 / rate,
                "replica_step_cpu_ms": 1000 / cpu_rate,
                "peak_mb": max(r["peak_mb"] for r in good),
                "added_mb": max(r["added_mb"] for r in good),
                "repeats": len(good),
            }
    for rows in table.values():
        solo = rows.get("1", {})
        for row in rows.values():
            for rate, cost in [
                ("model_steps_per_s", "replica_cost_vs_solo"),
                ("model_steps_per_cpu_s", "replica_cpu_cost_vs_solo"),
            ]:
                if rate in solo and rate in row:
                    row[cost] = solo[rate] / row[rate]
    for contender in OURS:
        for m, row in table.get(contender, {}).items():
            other = table.get("independent", {}).get(m, {})
            for rate, ratio in [
                ("model_steps_per_s", "over_independent"),
                ("model_steps_per_cpu_s", "cpu_over_independent"),
            ]:
                if rate in other and rate in row:
                    row[ratio] = row[rate] / other[rate]
    return table


LABELS = {"ours_unbatched": "ours batched=false", "ours_batched": "ours batched=true"}


def markdown(results: dict) -> str:
    table, sizes = results["table"], results["sizes"]
    ours = [c for c in OURS if c in table]
    contenders = [*ours, "independent"]
    names = [LABELS.get(c, c) for c in contenders]
    cpu = results["device"] == "cpu"

    def cell(contender: str, m: int, key: str, fmt: str, cpu_key: str | None = None) -> str:
        """``row[key]``, and on CPU ``row[cpu_key]`` in brackets."""
        row = table[contender].get(str(m), {})
        if "error" in row:
            return "failed"
        if key not in row:
            return "-"
        text = format(row[key], fmt)
        if cpu and cpu_key is not None and cpu_key in row:
            text += f" ({format(row[cpu_key], fmt)})"
        return text

    def memory(contender: str, m: int) -> str:
        row = table[contender].get(str(m), {})
        if "error" in row:
            return "failed"
        return f"{row['peak_mb']:.0f} ({row['added_mb']:.0f})" if "peak_mb" in row else "-"

    bracket = " (per CPU-second)" if cpu else ""
    lines = [
        f"# Packs: model-steps/s versus pack size ({results['device_name']}, "
        f"torch {results['torch']})",
        "",
        f"{results['when']}, commit {results.get('commit', '?')}; {results['threads']} torch "
        "thread(s) per process; machine load "
        f"average {results['load_before']:.1f} before, {results['load_after']:.1f} after. "
        "Each (contender, M) ran in a fresh process, contenders interleaved within each "
        "repetition; medians over the repetitions. The paper's VAE 784-200-200-50 (tanh, "
        f"Bernoulli), DReG-IWAE, K = {results['k']}, batch 32 per replica, Adam 3e-4, fp32; "
        f"{results['warmup']} warm-up steps, then the timed steps.",
        "",
        "*ours*: the real training path, M jobs each seeded and built like `train.py` "
        "(`pl.seed_everything`, `dreg.build.build` + `build_trainer`: CSV logger, checkpoint "
        "callbacks, `model.steps_per_call=4`; no validation; 4096 training images, so that "
        "no epoch ends in the window; the images loaded once per process and shared) trained "
        "together in one `dreg.pack.Pack`; at M = 1 a normal run (no pack, one measurement for "
        "both columns). "
        "*independent*: `benchmarks/packed_loop.py`, no dreg code (stacked weights, `baddbmm` "
        "layers, the same DReG step, one Adam over the stacked tensors). Model-steps/s: the "
        "steps of all replicas in the timed window / its wall time"
        + (
            "; in brackets the same per second of the process's CPU time (user + system)."
            if cpu
            else "."
        ),
        "",
        "| M | timed steps | repeats | "
        + " | ".join(f"{n} model-steps/s{bracket}" for n in names)
        + " | "
        + " | ".join(f"{LABELS[c]} / independent" for c in ours)
        + " |",
        "|---|---|---|" + "---|" * (len(contenders) + len(ours)),
    ]
    for m in sizes:
        lines.append(
            f"| {m} | {results['steps_per_m'][str(m)]} | {results['repeats_per_m'][str(m)]} | "
            + " | ".join(
                cell(c, m, "model_steps_per_s", ".1f", "model_steps_per_cpu_s") for c in contenders
            )
            + " | "
            + " | ".join(
                cell(c, m, "over_independent", ".2f", "cpu_over_independent") for c in ours
            )
            + " |"
        )
    what = (
        "peak resident set of the process (VmHWM), and in brackets what training added to the "
        "resident set the process had before it (imports, MNIST)"
        if cpu
        else "`torch.cuda.max_memory_allocated`, and in brackets what training added to the "
        "memory allocated before it"
    )
    lines += [
        "",
        "Per-replica step time = M / model-steps/s (wall); cost vs solo = per-replica time / "
        f"the same contender's step time at M = 1{' (in brackets: CPU time)' if cpu else ''}. "
        f"Peak memory (MB): {what}.",
        "",
        "| M | "
        + " | ".join(f"{n} ms per replica-step" for n in names)
        + " | "
        + " | ".join(f"{n} vs solo" for n in names)
        + " | "
        + " | ".join(f"{n} peak MB (added)" for n in names)
        + " |",
        "|---|" + "---|" * (3 * len(contenders)),
    ]
    for m in sizes:
        lines.append(
            f"| {m} | "
            + " | ".join(cell(c, m, "replica_step_ms", ".1f") for c in contenders)
            + " | "
            + " | ".join(
                cell(c, m, "replica_cost_vs_solo", ".2f", "replica_cpu_cost_vs_solo")
                for c in contenders
            )
            + " | "
            + " | ".join(memory(c, m) for c in contenders)
            + " |"
        )
    lines += ["", *(f"- {note}" for note in results["notes"])]
    return "\n".join(lines) + "\n"


def notes(results: dict) -> list[str]:
    """The target check, the best throughput and the grid's cost at it, failures."""
    table, out = results["table"], []
    if results["device"] == "cpu":
        parts = []
        for c in OURS:
            row = table.get(c, {}).get("8", {})
            if "replica_cost_vs_solo" in row:
                wall, cpu = row["replica_cost_vs_solo"], row.get("replica_cpu_cost_vs_solo")
                verdict = "met" if wall <= 1.1 else "NOT met"
                parts.append(
                    f"{LABELS[c]} {wall:.2f}x wall, {verdict}"
                    + (f" ({cpu:.2f}x in CPU time)" if cpu is not None else "")
                )
        if parts:
            out.append(
                "Target (CPU), from the table: per-replica cost at M = 8 at most 1.1x a solo "
                "run's step time: " + "; ".join(parts) + "."
            )
    rates = [
        (row["model_steps_per_s"], c, int(m))
        for c, rows in table.items()
        for m, row in rows.items()
        if "model_steps_per_s" in row
    ]
    if rates:
        unit = "GPU-hours" if results["device"] == "cuda" else "hours of one such CPU process"
        where = (
            f"{results['device']}: {results['device_name']}, {results['threads']} torch thread(s)"
        )
        best = max(rates)
        text = (
            f"The paper's grid, 48 runs x 5M steps = {GRID_MODEL_STEPS / 1e6:.0f}M model-steps, "
            f"at the best aggregate throughput measured here on {where}: "
            f"{best[0]:.1f} model-steps/s ({LABELS.get(best[1], best[1])}, M = {best[2]}) -> "
            f"{GRID_MODEL_STEPS / best[0] / 3600:,.0f} {unit}"
        )
        ours_rates = [r for r in rates if r[1] in OURS]
        if ours_rates and max(ours_rates) != best:
            rate, c, m = max(ours_rates)
            text += (
                f"; at ours' best ({rate:.1f} model-steps/s, {LABELS[c]}, M = {m}) -> "
                f"{GRID_MODEL_STEPS / rate / 3600:,.0f} {unit}"
            )
        out.append(text + ".")
    failed = [
        f"{LABELS.get(c, c)} M = {m}: {row['error'].splitlines()[-1] if row['error'] else '?'}"
        for c, rows in table.items()
        for m, row in rows.items()
        if "error" in row
    ]
    if failed:
        out.append("Failed measurements: " + "; ".join(failed) + ".")
    return out


def source_commit() -> str:
    """The checked-out commit, ``+changes`` when dreg/ or benchmarks/ differ from it."""
    git = ["git", "-C", str(ROOT)]
    try:
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        changed = subprocess.run(
            [
                *git,
                "status",
                "--porcelain",
                "dreg",
                "benchmarks/packed.py",
                "benchmarks/packed_loop.py",
            ],
            capture_output=True,
            text=True,
        )
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+changes" if changed.stdout.strip() else "")


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
    parser.add_argument(
        "--large-repeats",
        type=int,
        default=None,
        help="repetitions for pack sizes of --large-from and more (default: --repeats)",
    )
    parser.add_argument("--large-from", type=int, default=32)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    parser.add_argument(
        "--contenders",
        default=None,
        help="comma list of ours_unbatched, ours_batched, independent (default: all on CPU; "
        "ours_batched and independent on CUDA)",
    )
    parser.add_argument(
        "--memory-cap-mb",
        type=float,
        default=None,
        help="CPU: a worker whose resident memory passes this stops (reported as failed); "
        "every worker also stops when the machine has under 1.5 GB available",
    )
    parser.add_argument("--note", action="append", default=[], help="a line for the notes")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--m", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker is not None:  # one measurement in a fresh process
        if args.device == "cpu" and Path("/proc/meminfo").exists():
            guard_memory(args.memory_cap_mb or float("inf"))
        row = measure(args.worker, args.m, args.device, args.steps, args.warmup, k=args.num_samples)
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
    load_before = os.getloadavg()[0]
    large_repeats = args.repeats if args.large_repeats is None else args.large_repeats
    for repeat in range(args.repeats):  # interleaved: every contender sees the same machine
        for m in sizes:
            if m >= args.large_from and repeat >= large_repeats:
                continue
            for contender in contenders:
                if contender in OURS and m == 1 and contender != contenders[0]:
                    continue  # M = 1 is a normal run, the same for both: measured once
                row = measure_in_subprocess(contender, m, args, steps[m])
                raw[contender][m].append(row)
                if "error" not in row:
                    print(
                        f"[{repeat + 1}/{args.repeats}] {contender:>14} M={m:<3} "
                        f"{row['model_steps_per_s']:8.1f} model-steps/s "
                        f"({row['model_steps_per_cpu_s']:.1f} per CPU-s)  "
                        f"{row['peak_mb']:7.0f} MB peak",
                        flush=True,
                    )
    for contender in contenders:  # M = 1 is a normal run, the same for both: measured once
        if contender in OURS and 1 in sizes and not raw[contender][1]:
            first = next(c for c in contenders if c in OURS)
            raw[contender][1] = raw[first][1]
    results = {
        "commit": source_commit(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        **measurement_context(args.device, args.repeats, max(steps.values())),
        "threads": args.threads or torch.get_num_threads(),
        "k": args.num_samples,
        "warmup": args.warmup,
        "sizes": sizes,
        "steps_per_m": {str(m): s for m, s in steps.items()},
        "repeats_per_m": {
            str(m): large_repeats if m >= args.large_from else args.repeats for m in sizes
        },
        "memory_cap_mb": args.memory_cap_mb,
        "contenders": contenders,
        "grid_model_steps": GRID_MODEL_STEPS,
    }
    results["table"] = summarize(raw, sizes)
    results["notes"] = notes(results) + args.note
    results["raw"] = {c: {str(m): rows for m, rows in by_m.items()} for c, by_m in raw.items()}
    write_results(f"packed_{args.device}", results, markdown(results))


if __name__ == "__main__":
    main()
