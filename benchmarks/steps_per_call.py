"""Steps/s of the real training path with ``model.steps_per_call`` N, against the independent loop.

For DReG-IWAE and each K, it times ``python train.py``'s path (``dreg.run.build`` + the
Lightning Trainer from the config: CSV logger at its default interval, checkpointing,
preemption handler, the non-finite check; no validation) at several N, and the independent
loop :mod:`benchmarks.packed_loop` with one replica (no dreg code, eager); on CUDA also the
real path with ``model.cuda_graph=true``. Contenders are interleaved within each repetition;
medians are reported.

    python -m benchmarks.steps_per_call                       # GPU: K = 16, 64, 256, 1024
    python -m benchmarks.steps_per_call --device cpu --quick  # CPU: K = 16, 64, few steps
    python -m benchmarks.steps_per_call --cputime             # CPU time: tiny, paper; N 16 50 100

Writes ``benchmarks/results/steps_per_call_<device>.{json,md}``; ``--cputime`` times
``train.py``'s path eager and with ``model.compile=step`` on the peer benchmark's two models
(:mod:`benchmarks.peers`) by this process's CPU time, which a shared machine's other load
hardly changes, into ``steps_per_call_cputime.{json,md}``. Needs ``DREG_DATA_DIR``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import open_dict

from benchmarks.packed_loop import PackedLoop, grey_levels
from benchmarks.run import StepTimer, compose_cfg, measurement_context, write_results
from dreg.build import build, build_trainer

ESTIMATORS = ["dreg_iwae"]  # the independent loop's estimator


def real_path_steps_per_s(
    estimator: str, k: int, device: str, n: int, graph: bool, steps: int, warmup: int
) -> float:
    with tempfile.TemporaryDirectory() as out:
        cfg = compose_cfg(estimator, k, device, warmup + steps, Path(out))
        with open_dict(cfg):
            cfg.model.steps_per_call, cfg.model.cuda_graph = n, graph
            cfg.callbacks.pop("progress_bar", None)
            cfg.trainer.enable_progress_bar = False
        pl.seed_everything(0, verbose=False)
        datamodule, module = build(cfg)
        trainer = build_trainer(cfg, Path(out))
        timer = StepTimer(warmup)
        trainer.callbacks.append(timer)
        trainer.fit(module, datamodule=datamodule)
        return timer.steps / (timer.end - timer.start)


def plain_steps_per_s(
    estimator: str, k: int, device: str, graph: bool, steps: int, warmup: int, data
) -> float:
    """The independent loop (DReG-IWAE, one replica; eager: it captures no graph)."""
    return steps / PackedLoop(1, device, k=k, data=data).timed(steps, warmup)[0]


def markdown(results: dict) -> str:
    ns = results["steps_per_call"]
    lines = [
        f"# steps_per_call ({results['device_name']}, torch {results['torch']})",
        "",
        f"{results['when']}; {results['threads']} torch threads; medians of "
        f"{results['repeats']} interleaved repetitions of {results['steps']} steps; batch 32.",
        "",
        "| estimator | K | independent loop | "
        + " | ".join(f"real N={n}" for n in ns)
        + " | best real / independent | best N |"
        + (" real graph N=max |" if results["graph"] else ""),
        "|---|---|---|" + "---|" * len(ns) + "---|---|" + ("---|" if results["graph"] else ""),
    ]
    for row in results["rows"]:
        cells = " | ".join(f"{row['real'][str(n)]:.1f}" for n in ns)
        line = (
            f"| {row['estimator']} | {row['k']} | {row['plain']:.1f} | {cells} | "
            f"{row['best_ratio']:.3f} | {row['best_n']} |"
        )
        if results["graph"]:
            line += f" {row['real_graph']:.1f} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def by_cputime(ns: list[int], repeats: int) -> None:
    """Steps/s by CPU time of the CLI path at each N, eager and compiled, interleaved."""
    from benchmarks.peers import SETTINGS, cli_steps_per_s

    torch.set_num_threads(1)
    rows = []
    for model, setting in SETTINGS.items():
        # Timing starts at a call's start: a warmup of max(ns) steps starts one for every N.
        setting = {**setting, "warmup": max(ns), "steps": max(ns) * (12 if model == "tiny" else 2)}
        for compiled in (False, True):
            rates: dict[int, list[float]] = {n: [] for n in ns}
            for _ in range(repeats):
                for n in ns:
                    torch._dynamo.reset()  # each N compiles as a fresh process would
                    with tempfile.TemporaryDirectory() as out:
                        extra = (f"model.steps_per_call={n}",)
                        rates[n].append(cli_steps_per_s(setting, compiled, Path(out), extra)[1])
            med = {n: statistics.median(v) for n, v in rates.items()}
            row = {"model": model, "compile": "step" if compiled else "false",
                   "median": {str(n): v for n, v in med.items()},
                   "raw": {str(n): v for n, v in rates.items()},
                   "best_n": max(med, key=med.get)}  # fmt: skip
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "raw"}), flush=True)
    results = {**measurement_context("cpu", repeats, 0), "steps_per_call": ns, "rows": rows}
    lines = [
        f"# model.steps_per_call by CPU time ({results['device_name']}, torch {results['torch']})",
        "",
        f"{results['when']}; one thread; DReG-IWAE, batch 32; `train.py`'s path "
        "(`benchmarks.peers.cli_steps_per_s`: default callbacks, CSV logger, no validation, "
        "no progress bar); steps/s by this process's CPU time, medians of "
        f"{repeats} interleaved repetitions (`python -m benchmarks.steps_per_call --cputime`).",
        "",
        "| model | model.compile | " + " | ".join(f"N={n}" for n in ns) + " | best N |",
        "|---|---|" + "---|" * len(ns) + "---|",
    ]
    for row in rows:
        cells = " | ".join(f"{row['median'][str(n)]:.1f}" for n in ns)
        lines.append(f"| {row['model']} | {row['compile']} | {cells} | {row['best_n']} |")
    write_results("steps_per_call_cputime", results, "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="K = 16, 64 and few steps (CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--steps-per-call", type=int, nargs="*", default=None)
    parser.add_argument("--estimators", nargs="*", default=ESTIMATORS)
    parser.add_argument("--cputime", action="store_true", help="CLI path by CPU time (CPU)")
    args = parser.parse_args()
    if args.cputime:
        by_cputime(args.steps_per_call or [16, 50, 100], args.repeats)
        return
    ks = [16, 64] if args.quick else [16, 64, 256, 1024]
    steps = args.steps or (60 if args.quick else 500)
    ns = args.steps_per_call or ([1, 4, 16] if args.quick else [1, 4, 16, 64])
    graph = args.device == "cuda"
    warmup = max(ns) + 5 if not args.quick else 10
    data = grey_levels(4096)

    rows = []
    for k in ks:
        for estimator in args.estimators:
            real = {n: [] for n in ns}
            plain, real_graph = [], []
            for _ in range(args.repeats):
                plain.append(plain_steps_per_s(estimator, k, args.device, False, steps, 5, data))
                for n in ns:
                    real[n].append(
                        real_path_steps_per_s(estimator, k, args.device, n, False, steps, warmup)
                    )
                if graph:
                    real_graph.append(
                        real_path_steps_per_s(
                            estimator, k, args.device, max(ns), True, steps, warmup
                        )
                    )
            med = {n: statistics.median(v) for n, v in real.items()}
            best_n = max(med, key=med.get)
            plain_med = statistics.median(plain)
            row = {
                "estimator": estimator,
                "k": k,
                "plain": plain_med,
                "real": {str(n): v for n, v in med.items()},
                "best_n": best_n,
                "best_ratio": med[best_n] / plain_med,
                "raw": {"plain": plain, "real": {str(n): v for n, v in real.items()}},
            }
            if graph:
                row["real_graph"] = statistics.median(real_graph)
            rows.append(row)
            print(json.dumps({k2: v for k2, v in row.items() if k2 != "raw"}), flush=True)
    results = {
        **measurement_context("cuda" if graph else args.device, args.repeats, steps),
        "steps_per_call": ns,
        "graph": graph,
        "rows": rows,
    }
    write_results(f"steps_per_call_{args.device}", results, markdown(results))


if __name__ == "__main__":
    main()
