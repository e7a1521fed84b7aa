"""Aten operators per training step: dreg's step against a plain hand-written step.

For every estimator family, one optimizer step of the tiny model (784 pixels, latent 2,
hidden [8], K 4, batch 32, Adam) taken two ways on the same parameters and the same draws:

* **ours**: :meth:`dreg.step.Replicas.step` alone (what every ``python train.py`` step
  runs: binarization, noise, forward, estimator, routed backward, non-finite flags, update,
  records);
* **plain**: the step written by hand in this file, the way one would write it for that one
  estimator with no framework (one surrogate loss, one backward, ``optimizer.step()``; the
  DReG path coefficient as a gradient scale on z, as ``benchmarks/packed_loop.py`` does).

Both gradients are checked equal (1e-5) before counting. Counted: aten operators of one step
seen by ``torch.profiler`` (every ``aten::`` event, nested ones included: the issue's
measure) and at the dispatcher's top level (a ``TorchDispatchMode``), and the wall time per
step (medians of interleaved blocks, one thread).

    python -m benchmarks.op_count            # writes benchmarks/results/op_count.{json,md}

The target (issue 25): ops per DReG-IWAE step <= 1.15x the plain step.
"""

from __future__ import annotations

import argparse
import collections
import functools
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.run import measurement_context, write_results
from dreg.estimators import estimator_by_name
from dreg.lightning_module import DReGModule
from dreg.model import SCALE_OFFSET, VAE
from dreg.step import Replicas

LOG_2PI = math.log(2 * math.pi)
ESTIMATORS = ["vae", "iwae", "stl", "dreg_iwae", "rws", "dreg_rws", "dreg_alpha", "jvi",
              "dreg_jvi"]  # fmt: skip
TINY = {"latent": 2, "hidden": [8], "k": 4, "batch": 32}


class _Scale(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``box[0]`` (known only after the
    decoder ran): how a hand-written DReG step sends the path coefficient down z."""

    @staticmethod
    def forward(ctx, z: Tensor, box: list) -> Tensor:
        ctx.box = box
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.box[0], None


def _mlp(layers: list[tuple[Tensor, Tensor]], h: Tensor) -> Tensor:
    for i, (weight, bias) in enumerate(layers):
        h = F.linear(h, weight, bias)
        if i < len(layers) - 1:
            h = torch.tanh(h)
    return h


def _loo_logsumexp(log_w: Tensor) -> Tensor:
    """``[K, B]``: log sum_{j != k} exp(log_w_j), the O(K^2) way a plain step would."""
    k = log_w.shape[0]
    mask = torch.eye(k, dtype=torch.bool).unsqueeze(-1)  # [K, K, 1]
    return torch.logsumexp(log_w.unsqueeze(0).masked_fill(mask, -math.inf), dim=1)


class PlainStep:
    """One estimator's training step written by hand over a VAE's parameter tensors."""

    def __init__(self, net: VAE, estimator: str, k: int, lr: float = 3e-4) -> None:
        self.estimator, self.k = estimator, k
        self.train_mean = net.train_mean.clone()
        linears = [m for m in net.encoder.net if isinstance(m, torch.nn.Linear)]
        self.encoder = [(m.weight.detach().clone().requires_grad_(),
                         m.bias.detach().clone().requires_grad_()) for m in linears]  # fmt: skip
        linears = [m for m in net.decoder if isinstance(m, torch.nn.Linear)]
        self.decoder = [(m.weight.detach().clone().requires_grad_(),
                         m.bias.detach().clone().requires_grad_()) for m in linears]  # fmt: skip
        # The optimizer's groups in dreg's order: decoder (model) first, then encoder.
        self.params = [t for layer in self.decoder + self.encoder for t in layer]
        self.optimizer = torch.optim.Adam(self.params, lr=lr)
        self.latent = net.latent_dim

    def grads(self) -> list[Tensor]:
        """Gradients in ``net.parameters()`` order (encoder, then decoder)."""
        return [t.grad for layer in self.encoder + self.decoder for t in layer]

    def loss(self, x: Tensor, eps: Tensor) -> Tensor:
        est = self.estimator
        mean, raw = _mlp(self.encoder, x - self.train_mean).chunk(2, -1)
        scale = F.softplus(raw + SCALE_OFFSET)
        z = mean + scale * eps  # [K, B, Dz]
        full = est in ("vae", "iwae", "jvi")
        if est == "rws":
            z = z.detach()  # wake-phi: no path term; log q(stop z) below
        box: list = []
        z_p = z if full or est in ("rws", "stl") else _Scale.apply(z, box)
        if full or est == "rws":
            m, s = (mean, scale)
        else:
            m, s = (mean.detach(), scale.detach())
        log_q = (-0.5 * ((z - m) / s) ** 2 - s.log() - 0.5 * LOG_2PI).sum(-1)  # [K, B]
        logits = _mlp(self.decoder, z_p)
        log_p = (-0.5 * z_p**2 - 0.5 * LOG_2PI).sum(-1) + (
            (logits * x).sum(-1) - F.softplus(logits).sum(-1)
        )
        log_w = log_p - log_q
        k = self.k
        if est == "vae":
            return -log_w.mean()
        if est == "iwae":
            return -(torch.logsumexp(log_w, 0) - math.log(k)).mean()
        if est == "jvi":
            loo = _loo_logsumexp(log_w) - math.log(k - 1)
            bound = k * (torch.logsumexp(log_w, 0) - math.log(k)) - (k - 1) * loo.mean(0)
            return -bound.mean()
        lw = log_w.detach()
        w = torch.softmax(lw, 0)
        if est == "stl":
            return -(w * log_w).sum(0).mean()
        if est == "rws":
            return -(w * log_p).sum(0).mean() - (w * log_q).sum(0).mean()
        if est == "dreg_jvi":
            model, path = _jackknife_coefficients(lw, 1), _jackknife_coefficients(lw, 2)
        else:
            model = w
            if est == "dreg_iwae":
                path = w * w
            elif est == "dreg_rws":
                path = w - w * w
            elif est == "dreg_alpha":
                path = 0.1 * w * w + 0.9 * (w - w * w)
            else:
                raise ValueError(est)
        floor = torch.finfo(lw.dtype).tiny ** 0.5
        model = torch.where(model.abs() < floor, floor, model)
        box.append((path / model).unsqueeze(-1))
        return -((model * log_p).sum(0) - (path * log_q).sum(0)).mean()

    def step(self, images: Tensor, generator: torch.Generator) -> None:
        x = torch.bernoulli(images, generator=generator)
        eps = torch.randn(
            (self.k, images.shape[0], self.latent), generator=generator, dtype=images.dtype
        )
        self.optimizer.zero_grad()
        self.loss(x, eps).backward()
        self.optimizer.step()


def _jackknife_coefficients(log_w: Tensor, power: int) -> Tensor:
    """K w~_j^p - (K-1)/K sum_{k != j} (w_j / S_{-k})^p, by the O(K^2) tiling."""
    k = log_w.shape[0]
    loo = _loo_logsumexp(log_w)  # [K, B]: log S_{-k}
    ratio = (log_w.unsqueeze(0) - loo.unsqueeze(1)).exp() ** power  # [k, j, B]
    ratio = ratio.masked_fill(torch.eye(k, dtype=torch.bool).unsqueeze(-1), 0.0)
    return k * torch.softmax(log_w, 0) ** power - (k - 1) / k * ratio.sum(0)


def tiny_net(seed: int = 0, setting: dict = TINY) -> VAE:
    torch.manual_seed(seed)
    return VAE(784, latent_dim=setting["latent"], hidden_dims=setting["hidden"],
               train_mean=torch.rand(784) * 0.3)  # fmt: skip


def ours(
    net: VAE, estimator: str, k: int, seed: int = 1, fused: bool | None = None, **kwargs
) -> Replicas:
    """dreg's step alone, as a run alone builds it; ``fused``: Adam's fused kernel (the
    config's default; ``None``: PyTorch's default, the plain step's optimizer)."""
    module = DReGModule(net, estimator_by_name(estimator),
                        functools.partial(torch.optim.Adam, lr=3e-4, fused=fused), num_samples=k,
                        compile=False, **kwargs)  # fmt: skip
    optimizer = module.configure_optimizers()
    generator = torch.Generator().manual_seed(seed)
    return Replicas.alone(module, optimizer, generator, **module.step_settings())


def _split(bits: Tensor) -> tuple[Tensor, None]:
    return bits, None


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count(step) -> dict:
    """Operators of one call of ``step``: profiler ``aten::`` events and top-level dispatches."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    nested = sum(1 for e in prof.events() if e.name.startswith("aten::"))
    with _Counter() as counter:
        step()
    return {"profiler": nested, "dispatch": sum(counter.counts.values()),
            "top": dict(counter.counts.most_common(12))}  # fmt: skip


def check_gradients(estimator: str, setting: dict = TINY) -> float:
    """Largest difference between the two steps' gradients on one draw, in float64 (so that
    only the formulas, not float32 round-off of their different orders, are compared),
    relative to the largest gradient entry of each tensor; asserted < 1e-5."""
    net = tiny_net(setting=setting).double()
    plain = PlainStep(net, estimator, setting["k"])
    replicas = ours(net, estimator, setting["k"])
    got: list[list[Tensor]] = []
    replicas.observers[0] = lambda m: got.append([p.grad.clone() for p in net.parameters()])
    images = torch.rand(
        1, setting["batch"], 784, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    replicas.step(images, _split, Tensor.backward)
    plain.step(images[0], torch.Generator().manual_seed(1))
    worst = 0.0
    for a, b in zip(got[0], plain.grads(), strict=True):
        worst = max(worst, (a - b).abs().max().item() / max(1.0, b.abs().max().item()))
    if worst > 1e-5:
        raise AssertionError(f"{estimator}: plain and dreg gradients differ by {worst:.2e}")
    return worst


def measure(estimators: list[str], repeats: int, steps: int, setting: dict = TINY) -> dict:
    rows = {}
    images = torch.rand(1, setting["batch"], 784, generator=torch.Generator().manual_seed(2))
    for name in estimators:
        difference = check_gradients(name, setting)
        net_a, net_b = tiny_net(setting=setting), tiny_net(setting=setting)
        replicas = ours(net_a, name, setting["k"])
        plain = PlainStep(net_b, name, setting["k"])
        generator = torch.Generator().manual_seed(1)

        def our_step(replicas=replicas):
            replicas.step(images, _split, Tensor.backward)

        def plain_step(plain=plain, generator=generator):
            plain.step(images[0], generator)

        for _ in range(5):
            our_step(), plain_step()
        row = {"max_grad_difference": difference, "ours": count(our_step),
               "plain": count(plain_step)}  # fmt: skip
        times: dict[str, list[float]] = {"ours": [], "plain": []}
        for _ in range(repeats):  # interleaved blocks
            for key, fn in (("ours", our_step), ("plain", plain_step)):
                start = time.process_time()  # CPU time: other load hardly changes it
                for _ in range(steps):
                    fn()
                times[key].append((time.process_time() - start) / steps)
        row["ms"] = {k: 1000 * statistics.median(v) for k, v in times.items()}
        rows[name] = row
        print(name, row["ours"]["profiler"], row["plain"]["profiler"],
              f"{row['ms']['ours']:.3f} {row['ms']['plain']:.3f} ms", flush=True)  # fmt: skip
    return rows


def markdown(results: dict) -> str:
    ctx, s = results["context"], results["setting"]
    lines = [
        f"# Aten operators per training step ({ctx['device_name']}, torch {ctx['torch']})",
        "",
        f"{ctx['when']}; tiny model (784 pixels, latent {s['latent']}, hidden {s['hidden']}, "
        f"K {s['k']}, batch {s['batch']}, Adam), one thread; `python -m benchmarks.op_count`. "
        "ours = `Replicas.step` alone; plain = the step written by hand in "
        "`benchmarks/op_count.py` (same gradient, checked to 1e-5). Operators: every "
        "`aten::` event of `torch.profiler` (nested included) and top-level dispatches "
        f"(`TorchDispatchMode`); time: CPU time per step, medians of {ctx['repeats']} "
        "interleaved blocks of "
        f"{ctx['steps']} steps.",
        "",
        "| estimator | ours ops | plain ops | ours / plain | ours dispatches | plain dispatches "
        "| ours ms | plain ms | ours / plain time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["rows"].items():
        o, p, ms = row["ours"], row["plain"], row["ms"]
        lines.append(
            f"| {name} | {o['profiler']} | {p['profiler']} | {o['profiler'] / p['profiler']:.2f}"
            f" | {o['dispatch']} | {p['dispatch']} | {ms['ours']:.3f} | {ms['plain']:.3f} | "
            f"{ms['ours'] / ms['plain']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--estimators", nargs="*", default=ESTIMATORS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = measure(args.estimators, args.repeats, args.steps)
    results = {"context": measurement_context("cpu", args.repeats, args.steps),
               "setting": TINY, "rows": rows}  # fmt: skip
    write_results("op_count", results, markdown(results))


if __name__ == "__main__":
    main()
