"""Adam's three implementations on dreg's parameter sets: why the config ships ``fused: true``.

One ``optimizer.step()`` over the VAE's parameters, in dreg's two parameter groups (model,
inference), with fixed gradients: PyTorch's default on the CPU (the single-tensor loop, ~10
operators per tensor), ``foreach=True`` (~10 operators per group) and ``fused=True`` (one
kernel per group). CPU time per step, one thread, the three interleaved within each of
``--repeats`` repetitions; medians. The three agree to float32 round-off (checked first).

    python -m benchmarks.adam      # writes benchmarks/results/adam_cpu.{json,md}
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.run import measurement_context, write_results
from dreg.model import VAE

MODELS = {"tiny": {"latent_dim": 2, "hidden_dims": [8]},
          "paper": {"latent_dim": 50, "hidden_dims": [200, 200]}}  # fmt: skip
MODES = {"single-tensor (default)": {"foreach": False},
         "foreach": {"foreach": True},
         "fused": {"fused": True}}  # fmt: skip


def optimizer(net: VAE, options: dict) -> tuple[torch.optim.Adam, list[torch.Tensor]]:
    params = [p.detach().clone().requires_grad_() for p in net.parameters()]
    for p, g in zip(params, net.parameters(), strict=True):
        p.grad = g.grad
    half = len(params) // 2  # dreg's groups: decoder (model), then encoder (inference)
    groups = [{"params": params[half:]}, {"params": params[:half]}]
    return torch.optim.Adam(groups, lr=3e-4, **options), params


def microseconds_per_step(opt: torch.optim.Adam, steps: int) -> float:
    start = time.process_time()
    for _ in range(steps):
        opt.step()
    return (time.process_time() - start) / steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = {}
    for model, sizes in MODELS.items():
        torch.manual_seed(0)
        net = VAE(784, **sizes)
        for p in net.parameters():
            p.grad = torch.randn_like(p)
        built = {mode: optimizer(net, options) for mode, options in MODES.items()}
        for opt, _ in built.values():
            for _ in range(3):
                opt.step()
        reference = built["single-tensor (default)"][1]
        for mode, (_, params) in built.items():  # the same update, to float32 round-off
            for got, want in zip(params, reference, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=mode)
        steps = 400 if model == "tiny" else 100
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode, (opt, _) in built.items():
                times[mode].append(microseconds_per_step(opt, steps))
        rows[model] = {mode: statistics.median(t) for mode, t in times.items()}
        print(model, rows[model], flush=True)
    context = measurement_context("cpu", args.repeats, 0)
    lines = [
        "# Adam's implementations on dreg's parameters (CPU)",
        "",
        f"{context['when']}, {context['device_name']}, torch {context['torch']}, one thread; "
        f"CPU time of one `optimizer.step()` in microseconds, medians of {args.repeats} "
        "interleaved repetitions (`python -m benchmarks.adam`).",
        "",
        "| model | " + " | ".join(MODES) + " | fused / default |",
        "|---|" + "---|" * (len(MODES) + 1),
    ]
    for model, row in rows.items():
        cells = " | ".join(f"{row[m]:.0f}" for m in MODES)
        lines.append(f"| {model} | {cells} | {row['fused'] / row['single-tensor (default)']:.2f} |")
    write_results("adam_cpu", {"context": context, "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
