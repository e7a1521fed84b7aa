"""struct-MNIST: predict the bottom half of an MNIST digit from its top half.

The structured-prediction task of the DReG paper (Tucker et al. 2019, after Raiko et al. 2015):
each binarized MNIST image is split into a context c, its top 14 rows (392 pixels), and the
modelled pixels x, its bottom 14 rows (392 pixels). The model is the conditional VAE of
:class:`dreg.model.VAE` with ``context_dim=392``: prior p(z | c), encoder q(z | x, c), decoder
p(x | z, c).

Every statistic lives on its own half: the decoder's output bias and the encoder's input
centring use the bottom-half training mean, the context centring the top-half training mean
(:meth:`BinarizedDataModule.model_kwargs` computes both through :meth:`split_context`). The
original code mixed them; see ``docs/datasets.md``. Files and splits are MNIST's.
"""

from __future__ import annotations

from torch import Tensor

from dreg.datamodules.binarized import Batch
from dreg.datamodules.mnist import MNISTDataModule

SIDE = 28
CONTEXT_ROWS = 14  # the top half
CONTEXT_DIM = CONTEXT_ROWS * SIDE  # 392


class StructMNISTDataModule(MNISTDataModule):
    """MNIST rows split into the context c = top half and the target x = bottom half."""

    def split_context(self, images: Tensor) -> Batch:
        """``[..., 784] -> Batch(x=[..., 392] bottom half, context=[..., 392] top half)``."""
        if images.shape[-1] != SIDE * SIDE:
            raise ValueError(f"struct-MNIST expects [B, 784] images, got {tuple(images.shape)}")
        return Batch(x=images[..., CONTEXT_DIM:], context=images[..., :CONTEXT_DIM])
