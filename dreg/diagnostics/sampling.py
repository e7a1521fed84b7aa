"""Machinery shared by the diagnostics: estimators by name, seeded batches, group gradients, DDP.

Every draw of a diagnostic is a pure function of ``(seed, index)``: the training images of
batch ``i`` are rows ``i*B .. i*B+B-1``, and their binarization and the latent noise come from
the global RNG seeded with :func:`derived_seed`. A rank only decides *which* indices it
computes (``i % world_size == rank``), so a 2-process run sums exactly the draws a 1-process
run sums, and an all-reduce of the sums gives the same statistics up to float round-off.

Gradients come from ``torch.autograd.grad`` of the two surrogate losses of
:func:`dreg.estimators.surrogate_losses` on their own parameter group: ``.grad`` is never
touched, so nothing interferes with training or with DDP's reducer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from lightning_fabric import Fabric
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from dreg.datamodules.binarized import Batch
from dreg.estimators import GradientWeights, Particles, surrogate_losses
from dreg.lightning_module import DReGModule
from dreg.model import VAE

log = logging.getLogger(__name__)

GROUPS = ("model", "inference")


def derived_seed(*keys: int) -> int:
    """A well-mixed 32-bit seed from integer keys (e.g. run seed, K, draw index)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with the global RNG of ``device`` seeded, restoring it afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def training_batch(
    datamodule: pl.LightningDataModule, index: int, batch_size: int, device: torch.device
) -> Batch:
    """Batch ``index`` of the training images in file order, binarized with the current RNG."""
    data = datamodule.splits["train"]  # [N, D] grey levels
    rows = (index * batch_size + torch.arange(batch_size)) % data.shape[0]
    return datamodule.split_context(torch.bernoulli(data[rows].to(device)))


def group_parameters(net: VAE, group: str) -> tuple[list[str], list[nn.Parameter]]:
    """Names and parameters of ``group`` (``model``: decoder+prior, ``inference``: encoder)."""
    params = net.model_parameters() if group == "model" else net.inference_parameters()
    names = {id(p): n for n, p in net.named_parameters()}
    return [names[id(p)] for p in params], params


def tensor_slices(params: Sequence[Tensor]) -> list[slice]:
    """Where each tensor sits in the flattened concatenation of ``params``."""
    bounds = np.cumsum([0] + [p.numel() for p in params])
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def flat_gradient(loss: Tensor, params: Sequence[Tensor], retain_graph: bool = True) -> Tensor:
    """``[D]`` gradient of ``loss`` wrt ``params``, flattened; zeros where a tensor is unused."""
    grads = torch.autograd.grad(loss, list(params), retain_graph=retain_graph, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
    return torch.cat([g.flatten() for g in grads])


def group_gradients(
    particles: Particles,
    weights: GradientWeights,
    params: dict[str, Sequence[Tensor]],
) -> dict[str, Tensor]:
    """The estimator's flattened gradient of each group in ``params`` (model / inference)."""
    losses = dict(zip(GROUPS, surrogate_losses(particles, weights), strict=True))
    return {group: flat_gradient(losses[group], ps) for group, ps in params.items()}


# -- running a diagnostic as a (possibly distributed) job ---------------------------------------
@dataclass
class DiagnosticJob:
    """What a diagnostic mode works on: the process group, the data and the fixed model."""

    fabric: Fabric
    datamodule: pl.LightningDataModule
    module: DReGModule

    @property
    def net(self) -> VAE:
        return self.module.net

    @property
    def device(self) -> torch.device:
        return self.fabric.device

    def mine(self, index: int) -> bool:
        """Whether this rank computes draw / batch ``index``."""
        return index % self.fabric.world_size == self.fabric.global_rank

    def reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum over ranks (identity in a single process)."""
        if self.fabric.world_size == 1:
            return tensor
        return self.fabric.all_reduce(tensor, reduce_op="sum")


def start_job(cfg: DictConfig) -> DiagnosticJob:
    """Launch the processes of ``cfg.trainer`` (DDP re-launches the script), build the data and
    the model, and load ``cfg.ckpt_path``'s weights when given."""
    from dreg.run import build, load_net_weights  # run.py dispatches here: import lazily

    trainer = cfg.trainer
    fabric = Fabric(
        accelerator=trainer.get("accelerator", "auto"),
        devices=trainer.get("devices", "auto"),
        strategy=trainer.get("strategy", "auto"),
        num_nodes=trainer.get("num_nodes", 1),
    )
    fabric.launch()
    pl.seed_everything(cfg.seed, verbose=False)  # the same fresh model in every process
    datamodule, module = build(cfg)
    if cfg.get("ckpt_path"):
        load_net_weights(module.net, cfg.ckpt_path)
    elif fabric.is_global_zero:
        log.warning("no ckpt_path: diagnosing the freshly initialised model (seed %d)", cfg.seed)
    module.to(fabric.device)
    return DiagnosticJob(fabric=fabric, datamodule=datamodule, module=module)


def rank_zero_loggers(cfg: DictConfig, job: DiagnosticJob) -> list:
    """The configured loggers with the run's config logged, built on rank 0 only (other ranks
    write nothing)."""
    if not job.fabric.is_global_zero:
        return []
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return loggers
