"""dreg's CLI step against its peers: a plain PyTorch loop (eager, compiled) and JAX + optax.

Contenders, DReG-IWAE, batch 32, Adam 3e-4, one thread, interleaved within each repetition
(medians reported), in one process:

* **cli eager**: ``python train.py``'s path (``dreg.build.build`` + the Lightning Trainer from
  the config, default callbacks, CSV logger, ``model.steps_per_call`` default), timed by
  :class:`benchmarks.run.StepTimer` after warm-up steps, as ``benchmarks.steps_per_call``;
* **cli compile=step**: the same with ``model.compile=step``;
* **plain eager / plain compiled**: the DReG-IWAE step written by hand
  (:class:`benchmarks.op_count.PlainStep`, the path coefficient as a gradient hook on z), the
  compiled one with ``torch.compile`` of its loss and of a function calling
  ``optimizer.step()`` (the PyTorch recipe); **plain eager fused**: the eager one with
  ``Adam(fused=True)``, the optimizer dreg's config ships (PyTorch's default, single-tensor
  on the CPU, is what a hand-written loop gets);
* **jax jit**: the same step in JAX + optax, one ``jax.jit`` of the whole step (binarization,
  noise, both gradients, Adam); needs ``pip install -e '.[bench]'``, skipped when absent.

Models: ``tiny`` (784-8-2, K 4) and ``paper`` (784-200-200-50, K 64).

    python -m benchmarks.peers                  # writes benchmarks/results/peers_cpu.{json,md}
    python -m benchmarks.peers --update-docs    # and the table in docs/benchmarks.md

Needs ``DREG_DATA_DIR`` (MNIST) for the CLI contenders.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from torch import Tensor

from benchmarks.op_count import LOG_2PI, PlainStep
from benchmarks.packed_loop import grey_levels
from benchmarks.run import ROOT, StepTimer, measurement_context, write_results
from dreg.build import build, build_trainer
from dreg.model import SCALE_OFFSET, VAE

# Warmups are whole calls of the default model.steps_per_call (50): the CLI's timing starts
# with the first call that starts after them.
SETTINGS = {
    "tiny": {"latent": 2, "hidden": [8], "k": 4, "steps": 1200, "warmup": 100},
    "paper": {"latent": 50, "hidden": [200, 200], "k": 64, "steps": 100, "warmup": 50},
}
TRAIN_ROWS = 50_000
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- peers:begin -->", "<!-- peers:end -->"


def cli_steps_per_s(
    setting: dict, compiled: bool, out: Path, extra: tuple[str, ...] = ()
) -> tuple[float, float]:
    """``(steps/s by the wall clock, by CPU time)`` of ``train.py``'s path; ``extra``: more
    overrides (e.g. ``model.steps_per_call=16``)."""
    hidden = ",".join(map(str, setting["hidden"]))
    overrides = [
        "estimator=dreg_iwae",
        f"model.num_samples={setting['k']}",
        f"model.net.latent_dim={setting['latent']}",
        f"model.net.hidden_dims=[{hidden}]",
        "logger=csv",
        f"trainer.max_steps={setting['warmup'] + setting['steps']}",
        "trainer.limit_val_batches=0",
        "trainer.accelerator=cpu",
        f"model.compile={'step' if compiled else 'false'}",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.callbacks.pop("progress_bar", None)
        cfg.trainer.enable_progress_bar = False
    pl.seed_everything(0, verbose=False)
    datamodule, module = build(cfg)
    trainer = build_trainer(cfg, out)
    timer = CpuStepTimer(setting["warmup"])
    trainer.callbacks.append(timer)
    trainer.fit(module, datamodule=datamodule)
    return timer.steps / (timer.end - timer.start), timer.steps / (timer.cpu_end - timer.cpu_start)


class CpuStepTimer(StepTimer):
    """:class:`StepTimer` that also reads this process's CPU time (which other load on a
    shared machine hardly changes, unlike the wall clock)."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        started = self.start is not None
        super().on_train_batch_start(trainer, module, batch, batch_idx)
        if not started and self.start is not None:
            self.cpu_start = time.process_time()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)
        if self.start is not None:
            self.cpu_end = time.process_time()


class HookedPlainStep(PlainStep):
    """The hand-written DReG-IWAE step with the path coefficient as a tensor hook on z (a
    form ``torch.compile`` traces); ``compiled``: its loss and its ``optimizer.step()``
    compiled."""

    def __init__(self, net: VAE, k: int, compiled: bool, fused: bool = False) -> None:
        super().__init__(net, "dreg_iwae", k)
        if fused:
            self.optimizer = torch.optim.Adam(self.params, lr=3e-4, fused=True)
        self._loss = torch.compile(self.hooked_loss) if compiled else self.hooked_loss
        self._update = torch.compile(self.optimizer.step) if compiled else self.optimizer.step

    def hooked_loss(self, x: Tensor, eps: Tensor) -> Tensor:
        mean, raw = _mlp(self.encoder, x - self.train_mean).chunk(2, -1)
        scale = F.softplus(raw + SCALE_OFFSET)
        z = mean + scale * eps
        m, s = mean.detach(), scale.detach()
        log_q = (-0.5 * ((z - m) / s) ** 2 - s.log() - 0.5 * LOG_2PI).sum(-1)
        z_p = z.view_as(z)
        logits = _mlp(self.decoder, z_p)
        log_p = (-0.5 * z_p**2 - 0.5 * LOG_2PI).sum(-1) + (
            (logits * x).sum(-1) - F.softplus(logits).sum(-1)
        )
        w = torch.softmax((log_p - log_q).detach(), 0)
        z_p.register_hook(lambda grad: grad * w.unsqueeze(-1))
        return -((w * log_p).sum(0) - (w * w * log_q).sum(0)).mean()

    def step(self, images: Tensor, generator: torch.Generator) -> None:
        x = torch.bernoulli(images, generator=generator)
        eps = torch.randn((self.k, images.shape[0], self.latent), generator=generator)
        self.optimizer.zero_grad()
        self._loss(x, eps).backward()
        self._update()


def _mlp(layers, h: Tensor) -> Tensor:
    for i, (weight, bias) in enumerate(layers):
        h = F.linear(h, weight, bias)
        if i < len(layers) - 1:
            h = torch.tanh(h)
    return h


def plain_steps_per_s(
    setting: dict, compiled: bool, data: Tensor, fused: bool = False
) -> tuple[float, float]:
    torch.manual_seed(0)
    net = VAE(784, latent_dim=setting["latent"], hidden_dims=setting["hidden"],
              train_mean=data.mean(0))  # fmt: skip
    step = HookedPlainStep(net, setting["k"], compiled, fused)
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, data.shape[0], (setting["warmup"] + setting["steps"], 32))
    for i in range(setting["warmup"]):
        step.step(data[rows[i]], generator)
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(setting["warmup"], setting["warmup"] + setting["steps"]):
        step.step(data[rows[i]], generator)
    n = setting["steps"]
    return n / (time.perf_counter() - start), n / (time.process_time() - cpu)


def jax_steps_per_s(setting: dict, data: Tensor) -> tuple[float, float] | None:
    try:
        import jax
        import jax.numpy as jnp
        import optax
    except ImportError:
        return None
    sizes_enc = [784, *setting["hidden"], 2 * setting["latent"]]
    sizes_dec = [setting["latent"], *setting["hidden"][::-1], 784]
    key = jax.random.PRNGKey(0)

    def init(sizes, key):
        layers = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            key, sub = jax.random.split(key)
            bound = math.sqrt(6 / (fan_in + fan_out))
            layers.append((jax.random.uniform(sub, (fan_in, fan_out), minval=-bound,
                                              maxval=bound), jnp.zeros(fan_out)))  # fmt: skip
        return layers, key

    enc, key = init(sizes_enc, key)
    dec, key = init(sizes_dec, key)
    params = {"enc": enc, "dec": dec}
    train_mean = jnp.asarray(data.mean(0).numpy())
    k, latent = setting["k"], setting["latent"]
    optimizer = optax.adam(3e-4)

    def mlp(layers, h):
        for i, (weight, bias) in enumerate(layers):
            h = h @ weight + bias
            if i < len(layers) - 1:
                h = jnp.tanh(h)
        return h

    def surrogates(enc_params, dec_params, x, eps):
        """(model loss, inference loss): decoder on IWAE, encoder on DReG-IWAE."""
        mean, raw = jnp.split(mlp(enc_params, x - train_mean), 2, axis=-1)
        scale = jax.nn.softplus(raw + SCALE_OFFSET)
        z = mean + scale * eps
        m, s = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(scale)
        log_q = (-0.5 * ((z - m) / s) ** 2 - jnp.log(s) - 0.5 * LOG_2PI).sum(-1)
        logits = mlp(dec_params, z)
        log_p = (-0.5 * z**2 - 0.5 * LOG_2PI).sum(-1) + (
            (logits * x).sum(-1) - jax.nn.softplus(logits).sum(-1)
        )
        log_w = log_p - log_q
        w = jax.lax.stop_gradient(jax.nn.softmax(log_w, axis=0))
        return -(w * log_p).sum(0).mean(), -(w * w * log_w).sum(0).mean()

    def step(params, state, key, images):
        key, k1, k2 = jax.random.split(key, 3)
        x = jax.random.bernoulli(k1, images).astype(jnp.float32)
        eps = jax.random.normal(k2, (k, images.shape[0], latent))
        dec_grad = jax.grad(lambda d: surrogates(params["enc"], d, x, eps)[0])(params["dec"])
        enc_grad = jax.grad(lambda e: surrogates(e, params["dec"], x, eps)[1])(params["enc"])
        updates, state = optimizer.update({"enc": enc_grad, "dec": dec_grad}, state, params)
        return optax.apply_updates(params, updates), state, key

    step = jax.jit(step, donate_argnums=(0, 1))
    state = optimizer.init(params)
    images = jnp.asarray(data.numpy())
    rows = torch.randint(0, data.shape[0], (setting["warmup"] + setting["steps"], 32)).numpy()
    for i in range(setting["warmup"]):
        params, state, key = step(params, state, key, images[rows[i]])
    jax.block_until_ready(params)
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(setting["warmup"], setting["warmup"] + setting["steps"]):
        params, state, key = step(params, state, key, images[rows[i]])
    jax.block_until_ready(params)
    n = setting["steps"]
    return n / (time.perf_counter() - start), n / (time.process_time() - cpu)


CONTENDERS = [
    "cli eager", "cli compile=step", "plain eager", "plain eager fused", "plain compiled", "jax jit"
]


def measure(name: str, setting: dict, data: Tensor) -> tuple[float, float] | None:
    """``(steps/s by the wall clock, steps/s by this process's CPU time)``, or ``None``."""
    # Each contender compiles as a fresh process would: Dynamo keeps earlier repetitions'
    # graphs (other objects) and checks their guards first, which slowed later repetitions.
    torch._dynamo.reset()
    if name.startswith("cli"):
        with tempfile.TemporaryDirectory() as out:
            return cli_steps_per_s(setting, name.endswith("step"), Path(out))
    if name.startswith("plain"):
        return plain_steps_per_s(setting, name.endswith("compiled"), data, "fused" in name)
    return jax_steps_per_s(setting, data)


def markdown(results: dict) -> str:
    ctx = results["context"]
    lines = [
        f"{ctx['when']}, {ctx['device_name']}, torch {ctx['torch']}"
        + (f", jax {results['jax']}" if results.get("jax") else ", jax not installed")
        + f"; one thread; steps/s, medians of {ctx['repeats']} interleaved repetitions "
        "(`python -m benchmarks.peers`; DReG-IWAE, batch 32, Adam). By CPU time (this "
        "process's, which other load on a shared machine hardly changes) and by the wall "
        "clock.",
        "",
        "| model, clock | " + " | ".join(CONTENDERS) + " | cli eager / plain eager | "
        "cli eager / plain eager fused | cli compile=step / jax jit |",
        "|---|" + "---|" * (len(CONTENDERS) + 3),
    ]
    for (model, row), clock in [(item, c) for c in ("cpu", "wall")
                                for item in results["rows"].items()]:  # fmt: skip
        med = row["median"][clock]

        def cell(name, med=med):
            return "-" if med.get(name) is None else f"{med[name]:.1f}"

        def ratio(a, b, med=med):
            if med.get(a) is None or med.get(b) is None:
                return "-"
            return f"**{med[a] / med[b]:.2f}**"

        lines.append(
            f"| {model}, {clock} | " + " | ".join(cell(n) for n in CONTENDERS)
            + f" | {ratio('cli eager', 'plain eager')}"
            + f" | {ratio('cli eager', 'plain eager fused')}"
            + f" | {ratio('cli compile=step', 'jax jit')} |"
        )  # fmt: skip
    return "\n".join(lines) + "\n"


def update_docs(table: str) -> None:
    text = DOCS.read_text()
    block = f"{BEGIN}\n{table}{END}"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text += f"\n## Peers\n\n{block}\n"
    DOCS.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(SETTINGS))
    parser.add_argument("--contenders", nargs="*", default=CONTENDERS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # As many rows as the CLI's training split (MNIST's 60,000 less 10,000 for validation): a
    # step's 32 random rows then come from memory, not cache, for every contender alike.
    data = grey_levels(TRAIN_ROWS)
    rows = {}
    for model in args.models:
        setting = SETTINGS[model]
        rates: dict[str, dict[str, list[float]]] = {"wall": {}, "cpu": {}}
        for repeat in range(args.repeats):
            for name in args.contenders:
                rate = measure(name, setting, data)
                if rate is not None:
                    rates["wall"].setdefault(name, []).append(rate[0])
                    rates["cpu"].setdefault(name, []).append(rate[1])
                print(f"{model} {repeat} {name}: {rate}", flush=True)
        rows[model] = {
            "setting": setting,
            "rates": rates,
            "median": {
                clock: {n: statistics.median(r) for n, r in by.items()}
                for clock, by in rates.items()
            },  # fmt: skip
        }
    try:
        import jax

        version = jax.__version__
    except ImportError:
        version = None
    results = {"context": measurement_context("cpu", args.repeats, 0), "jax": version,
               "rows": rows}  # fmt: skip
    table = markdown(results)
    write_results("peers_cpu", results, table)
    if args.update_docs:
        update_docs(table)


if __name__ == "__main__":
    main()
