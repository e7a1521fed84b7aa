"""Pictures of the model at every validation: samples from the prior and reconstructions.

At the end of each validation epoch (rank 0 only) this callback writes two grey-level grids

    <dirpath>/samples-step{global_step:06d}.png          decoded z ~ p(z[ | c]), 8 per row
    <dirpath>/reconstructions-step{global_step:06d}.png  top row: validation images;
                                                          bottom row: decoded mean of q(z | x)

and sends the same pictures to the W&B (``log_image``) and TensorBoard (``add_image``)
loggers under ``images/samples`` and ``images/reconstructions``. Pixels are Bernoulli means
sigmoid(logits) in [0, 1], black 0 to white 1, on a mid-grey frame.

The latent noise comes from a private generator re-seeded at every call, so the samples show
the same latent points at every validation (their change is the model's change) and the
global RNG stream, hence training, is bitwise the same with or without this callback.
Reconstructions decode the posterior mean and need no noise.

With a context (struct-MNIST: c = top half, x = bottom half) a picture is c followed by x in
row-major order: the top half comes from the data and the bottom half from the model. The
samples then use the contexts of the first validation images, one context per row.

Two stochastic layers (:class:`dreg.hierarchical.TwoLayerVAE`): samples are ancestral,
z2 ~ p(z2), z1 ~ p(z1 | z2), x's means from p(x | z1); reconstructions decode the mean of
q(z1 | x), the layer next to x. The net draws them itself (``sample_pixels``,
``reconstruct_pixels``) from the same ``[N, noise_dim]`` draws.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor

from dreg.datamodules.binarized import Batch
from dreg.files import atomic_write
from dreg.model import VAE

FRAME = 0.5  # mid grey: distinct from both ink (1) and background (0)
BORDER = 2  # frame pixels around and between the tiles


def tile(images: Tensor, columns: int) -> np.ndarray:
    """``[N, side, side]`` in [0, 1] -> one ``[H, W]`` float grid, ``columns`` tiles a row."""
    count, side = images.shape[0], images.shape[-1]
    rows = math.ceil(count / columns)
    step = side + BORDER
    grid = np.full((rows * step + BORDER, columns * step + BORDER), FRAME, dtype=np.float32)
    for i, image in enumerate(images.float().cpu().numpy()):
        top, left = BORDER + (i // columns) * step, BORDER + (i % columns) * step
        grid[top : top + side, left : left + side] = image
    return grid


def as_square_images(rows: Tensor, context: Tensor | None) -> Tensor:
    """``[N, Dx]`` pixels (after ``[N, C]`` context pixels, row-major) -> ``[N, side, side]``."""
    full = rows if context is None else torch.cat([context, rows], dim=-1)
    side = math.isqrt(full.shape[-1])
    if side * side != full.shape[-1]:
        raise ValueError(
            f"cannot show {full.shape[-1]}-pixel rows as square images; disable the pictures "
            "with ~callbacks.images"
        )
    return full.reshape(-1, side, side)


class SampleAndReconstructionImages(pl.Callback):
    """Grids of prior samples and of validation reconstructions at every validation.

    :param dirpath: folder of the PNG files (``<run dir>/images``).
    :param num_samples: samples in the sample grid (0: no sample grid).
    :param num_reconstructions: validation images shown with their reconstructions (0: none).
    :param columns: tiles per row of the sample grid.
    :param seed: seed of the latent noise of the samples (the same at every validation).
    """

    def __init__(
        self,
        dirpath: str | Path,
        num_samples: int = 64,
        num_reconstructions: int = 8,
        columns: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("num_samples", num_samples, 0),
            ("num_reconstructions", num_reconstructions, 0),
            ("columns", columns, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(
                    f"callbacks.images.{name}={value}: must be an integer >= {low}; "
                    f"set e.g. callbacks.images.{name}={max(low, 8)}"
                )
        self.dirpath = Path(dirpath)
        self.num_samples, self.num_reconstructions = num_samples, num_reconstructions
        self.columns, self.seed = columns, seed
        self.validation_images: Batch | None = None  # first validation images of the current epoch

    # -- the fixed validation images ---------------------------------------------------------
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx=0
    ) -> None:
        # Validation images are binarized with a fixed seed, so batch 0 is the same every time.
        if batch_idx == 0 and dataloader_idx == 0 and trainer.is_global_zero:
            keep = max(self.num_reconstructions, self._rows_of_samples())
            context = None if batch.context is None else batch.context[:keep].clone()
            self.validation_images = Batch(x=batch.x[:keep].clone(), context=context)

    def _rows_of_samples(self) -> int:
        return math.ceil(self.num_samples / self.columns)

    # -- pictures ----------------------------------------------------------------------------
    @torch.no_grad()
    def samples(self, net: VAE, contexts: Tensor | None) -> Tensor:
        """``[num_samples, side, side]`` Bernoulli means of x for z ~ p(z[ | c]).

        A net with ``sample_pixels(eps, context)`` (:class:`dreg.hierarchical.TwoLayerVAE`)
        maps the ``[N, noise_dim]`` draws to pixels itself; the one-layer VAE's are decoded here.

        With ``contexts`` ``[R, C]``, row r of the grid (``columns`` samples) uses context
        ``r mod R``.
        """
        device = net.train_mean.device
        generator = torch.Generator(device=device).manual_seed(self.seed)
        eps = torch.randn(
            (self.num_samples, net.noise_dim), generator=generator, device=device
        )  # [N, noise_dim]; the one-layer VAE's noise_dim is its latent_dim
        context = None
        if contexts is not None:
            row = torch.arange(self.num_samples, device=device) // self.columns
            context = contexts[row % contexts.shape[0]]  # [N, C]
        if hasattr(net, "sample_pixels"):  # a net that draws its own (e.g. two layers)
            return as_square_images(net.sample_pixels(eps, context), context)
        if context is None:
            return as_square_images(torch.sigmoid(net.decoder(eps)), None)
        centred = context - net.context_mean
        prior_mean, prior_scale = net.prior(centred)
        z = prior_mean + prior_scale * eps
        logits = net.decoder(torch.cat([z, centred], dim=-1))
        return as_square_images(torch.sigmoid(logits), context)

    @torch.no_grad()
    def reconstructions(self, net: VAE, images: Batch) -> Tensor:
        """``[2 n, side, side]``: n images, then their decoded posterior means (a net with
        ``reconstruct_pixels(x, context)`` decodes its own)."""
        x, context = images.x, images.context
        if hasattr(net, "reconstruct_pixels"):  # a net that decodes its own (e.g. two layers)
            decoded = net.reconstruct_pixels(x, context)
        else:
            z, _ = net.posterior_params(x, context)  # the mean of q(z | x[, c])
            dec_in = z if context is None else torch.cat([z, context - net.context_mean], -1)
            decoded = torch.sigmoid(net.decoder(dec_in))
        return torch.cat([as_square_images(x, context), as_square_images(decoded, context)])

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        images = self.validation_images
        if trainer.sanity_checking or not trainer.is_global_zero or images is None:
            return
        net, step = pl_module.net, trainer.global_step
        grids = {}
        if self.num_samples:
            grids["samples"] = tile(self.samples(net, images.context), self.columns)
        count = min(self.num_reconstructions, images.x.shape[0])
        if count:
            context = None if images.context is None else images.context[:count]
            shown = self.reconstructions(net, Batch(x=images.x[:count], context=context))
            grids["reconstructions"] = tile(shown, count)
        for name, grid in grids.items():
            # 8-bit grey levels once, so the PNG, W&B and TensorBoard hold the same pixels.
            pixels = np.rint(grid * 255).astype(np.uint8)
            with atomic_write(self.dirpath / f"{name}-step{step:06d}.png", "wb") as f:
                # Grey as RGB: imsave writes RGB bytes unchanged, a colormap would shift levels.
                matplotlib.image.imsave(f, np.stack([pixels] * 3, axis=-1), format="png")
            self._log(trainer, f"images/{name}", pixels, step)
        self.validation_images = None  # the next validation captures its own first batch

    @staticmethod
    def _log(trainer: pl.Trainer, key: str, pixels: np.ndarray, step: int) -> None:
        """Send ``[H, W]`` uint8 grey ``pixels`` to the loggers that show images."""
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=key, images=[pixels], step=step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(key, pixels, step, dataformats="HW")
