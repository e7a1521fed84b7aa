"""An independent packed training loop: M replicas of the paper's VAE stepped as one, without dreg.

Nothing here imports ``dreg``. Every replica's weights live in stacked tensors ``[M, ...]``
(encoder 784-200-200-(2x50), tanh, scale = softplus(raw + 0.25); decoder 50-200-200-784, tanh,
Bernoulli logits), every layer of every replica is one ``torch.baddbmm``, and one
``torch.optim.Adam`` updates the stacked tensors (Adam is elementwise, so it is M replicas'
Adams at once). Each replica draws its own batch of dynamically binarized images and its own
latent noise.

The DReG-IWAE step, written here as two surrogate terms on one encoder and one decoder pass:

* the model (decoder) gets the IWAE gradient ``sum_k w~_k d log p(x, z_k)``: the term
  ``sum_k sg(w~_k) log p(x, z_k)``;
* the inference network (encoder) gets ``sum_k w~_k^2 d log w_k / d z_k  dz_k/dphi`` with phi
  stopped in ``log q``: ``- sum_k sg(w~_k^2) log q_sg(z_k)`` plus the first term's path through
  z, whose gradient is multiplied by ``sg(w~_k)`` on its way back from the decoder
  (:class:`_ScaleBackward`), so it arrives as ``w~_k^2 d log p / d z_k``.

``benchmarks.packed`` measures this loop beside the real packed training path.

    python -m benchmarks.packed_loop --m 8 --steps 20
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

LOG_2PI = math.log(2 * math.pi)
SCALE_OFFSET = 0.25
MNIST_TRAIN = "train-images-idx3-ubyte.gz"


class _ScaleBackward(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``box["scale"]``, a tensor that
    is only known after the forward pass (the normalized weights need the decoder's output)."""

    @staticmethod
    def forward(ctx, z: Tensor, box: dict) -> Tensor:
        ctx.box = box
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.box["scale"], None


def grey_levels(rows: int, seed: int = 0) -> Tensor:
    """``[rows, 784]`` float32 grey levels in [0, 1]: the first MNIST training images when
    ``$DREG_DATA_DIR/MNIST/raw`` has them, else random MNIST-like images (a dark background,
    a brighter blob)."""
    path = Path(os.environ.get("DREG_DATA_DIR", "data")) / "MNIST" / "raw" / MNIST_TRAIN
    if path.exists():
        with gzip.open(path, "rb") as f:
            raw = f.read(16 + rows * 784)
        images = np.frombuffer(raw, dtype=np.uint8, offset=16)
        if images.size == rows * 784:
            return torch.from_numpy(images.astype(np.float32).reshape(rows, 784) / 255)
    generator = torch.Generator().manual_seed(seed)
    side = torch.linspace(-1, 1, 28)
    radius = (side[:, None] ** 2 + side[None, :] ** 2).reshape(1, 784)
    blob = (radius < torch.rand(rows, 1, generator=generator) * 0.5 + 0.2).float()
    return (0.9 * blob * torch.rand(rows, 784, generator=generator)).clamp(0, 1)


class PackedLoop:
    """M replicas of the VAE trained together: stacked weights, batched products, one Adam.

    :param m: the number of replicas.
    :param batch_size: data points per replica and step (B).
    :param k: importance samples per data point (K).
    :param hidden: the MLPs' hidden widths; ``latent``: the latent dimension.
    :param data: ``[N, D]`` grey levels shared by the replicas (each draws its own batches);
        default :func:`grey_levels` (2048 rows).
    :param flush: weights ``w~`` below ``sqrt(float tiny)`` count as 0, so that no subnormal
        number reaches the backward pass (their terms are below round-off anyway).
    """

    def __init__(
        self,
        m: int,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        k: int = 64,
        hidden: tuple[int, ...] = (200, 200),
        latent: int = 50,
        data: Tensor | None = None,
        lr: float = 3e-4,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        flush: bool = True,
    ) -> None:
        self.m, self.batch_size, self.k, self.latent = m, batch_size, k, latent
        self.device, self.dtype = torch.device(device), dtype
        self.generator = torch.Generator(self.device).manual_seed(seed)
        if data is None:
            data = grey_levels(2048, seed)
        self.data = data.to(self.device, dtype)
        dim = self.data.shape[1]
        self.train_mean = self.data.mean(0).expand(m, dim).contiguous()  # [M, D]
        init = torch.Generator().manual_seed(seed)
        self.encoder = self._stacked_mlp([dim, *hidden, 2 * latent], init)
        self.decoder = self._stacked_mlp([latent, *hidden[::-1], dim], init)
        self.optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        self.floor = torch.finfo(dtype).tiny ** 0.5 if flush else 0.0

    def _stacked_mlp(self, sizes: list[int], init: torch.Generator) -> list[tuple[Tensor, Tensor]]:
        """Layers ``(weight [M, in, out], bias [M, out])``, nn.Linear's uniform initialization
        drawn for each replica."""
        layers = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            bound = 1 / math.sqrt(fan_in)
            weight = (torch.rand(self.m, fan_in, fan_out, generator=init) * 2 - 1) * bound
            bias = (torch.rand(self.m, fan_out, generator=init) * 2 - 1) * bound
            layers.append(
                tuple(t.to(self.device, self.dtype).requires_grad_() for t in (weight, bias))
            )
        return layers

    def parameters(self) -> list[Tensor]:
        return [t for layer in self.encoder + self.decoder for t in layer]

    @staticmethod
    def mlp(layers: list[tuple[Tensor, Tensor]], h: Tensor) -> Tensor:
        """``[M, N, in] -> [M, N, out]``: each layer one batched product, tanh between."""
        for i, (weight, bias) in enumerate(layers):
            h = torch.baddbmm(bias.unsqueeze(1), h, weight)
            if i < len(layers) - 1:
                h = torch.tanh(h)
        return h

    def batch(self) -> tuple[Tensor, Tensor]:
        """A step's inputs: binarized images ``[M, B, D]`` and noise ``[M, K, B, latent]``,
        each replica its own."""
        rows = torch.randint(
            0,
            self.data.shape[0],
            (self.m, self.batch_size),
            generator=self.generator,
            device=self.device,
        )
        x = torch.bernoulli(self.data[rows], generator=self.generator)
        eps = torch.randn(
            (self.m, self.k, self.batch_size, self.latent),
            generator=self.generator,
            device=self.device,
            dtype=self.dtype,
        )
        return x, eps

    def loss(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """``(surrogate, bound)``: the backward of the surrogate (summed over replicas, each
        replica's mean over its batch) gives every replica its DReG-IWAE gradient; ``bound``
        ``[M]`` is each replica's IWAE bound, averaged over the batch."""
        m, b, dim = x.shape
        k = eps.shape[1]
        mean, raw = self.mlp(self.encoder, x - self.train_mean.unsqueeze(1)).chunk(2, -1)
        scale = F.softplus(raw + SCALE_OFFSET)  # [M, B, latent]
        z = mean.unsqueeze(1) + scale.unsqueeze(1) * eps  # [M, K, B, latent]
        mean_sg, scale_sg = mean.detach().unsqueeze(1), scale.detach().unsqueeze(1)
        log_q_sg = (-0.5 * ((z - mean_sg) / scale_sg) ** 2 - scale_sg.log() - 0.5 * LOG_2PI).sum(
            -1
        )  # [M, K, B]: only z carries a gradient
        box: dict = {}
        z_p = _ScaleBackward.apply(z, box)
        logits = self.mlp(self.decoder, z_p.reshape(m, k * b, -1)).reshape(m, k, b, dim)
        log_lik = -F.binary_cross_entropy_with_logits(
            logits, x.unsqueeze(1).expand_as(logits), reduction="none"
        ).sum(-1)
        log_p = (-0.5 * z_p**2 - 0.5 * LOG_2PI).sum(-1) + log_lik  # [M, K, B]
        log_w = (log_p - log_q_sg).detach()
        w = torch.softmax(log_w, 1)
        if self.floor:
            w = torch.where(w < self.floor, torch.zeros_like(w), w)
        box["scale"] = w.unsqueeze(-1)
        surrogate = (w * log_p).sum(1) - (w * w * log_q_sg).sum(1)  # [M, B]
        bound = (torch.logsumexp(log_w, 1) - math.log(k)).mean(-1)
        return -surrogate.mean(-1).sum(), bound

    def step(self) -> Tensor:
        """One training step of every replica; returns their bounds ``[M]`` (no host sync)."""
        x, eps = self.batch()
        self.optimizer.zero_grad(set_to_none=True)
        loss, bound = self.loss(x, eps)
        loss.backward()
        self.optimizer.step()
        return bound

    def timed(self, steps: int, warmup: int = 3) -> tuple[float, float]:
        """``(wall, cpu)`` seconds of ``steps`` steps after ``warmup`` (synchronized on CUDA;
        cpu: this process's CPU time, which other load on the machine hardly changes)."""
        for _ in range(warmup):
            self.step()
        synchronize(self.device)
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.step()
        synchronize(self.device)
        return time.perf_counter() - start, time.process_time() - cpu


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--m", type=int, default=8, help="replicas (1: a run alone)")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--latent", type=int, default=50)
    parser.add_argument("--hidden", default="200,200", help="hidden widths, comma-separated")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    hidden = tuple(int(h) for h in args.hidden.split(","))
    loop = PackedLoop(args.m, args.device, k=args.num_samples, hidden=hidden, latent=args.latent)
    seconds, cpu_seconds = loop.timed(args.steps)
    steps = args.m * args.steps
    row = {"model_steps": steps, "seconds": seconds, "cpu_seconds": cpu_seconds,
           "rate": steps / seconds}  # fmt: skip
    if args.json:
        print(json.dumps(row))
    else:
        print(f"M={args.m}: {row['rate']:.1f} model-steps/s, {1000 / row['rate']:.2f} ms each")


if __name__ == "__main__":
    main()
