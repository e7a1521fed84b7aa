"""How a diagnostic mode runs: processes, seeded draws, the fixed model.

Every draw of a diagnostic is a pure function of ``(seed, index)``: the training images of
batch ``i`` are rows ``i*B .. i*B+B-1``, and their binarization and the latent noise come from
the global RNG seeded with :func:`derived_seed`. A rank only decides *which* indices it
computes (``i % world_size == rank``), so a 2-process run sums exactly the draws a 1-process
run sums, and an all-reduce of the sums gives the same statistics up to float round-off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from lightning_fabric import Fabric
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from dreg.build import build, build_loggers
from dreg.checkpointing import load_net_weights
from dreg.datamodules.binarized import Batch
from dreg.lightning_module import DReGModule
from dreg.model import VAE

log = logging.getLogger(__name__)


def training_batch(
    datamodule: pl.LightningDataModule, index: int, batch_size: int, device: torch.device
) -> Batch:
    """Batch ``index`` of the training images in file order, binarized with the current RNG."""
    data = datamodule.splits["train"]  # [N, D] grey levels
    rows = (index * batch_size + torch.arange(batch_size)) % data.shape[0]
    return datamodule.split_context(torch.bernoulli(data[rows].to(device)))


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
    loggers = build_loggers(cfg)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return loggers
