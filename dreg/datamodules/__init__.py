"""Binarized-image DataModules (MNIST, struct-MNIST, Omniglot) and their readers' DataError."""

from dreg.datamodules.binarized import Batch, BinarizedDataModule
from dreg.datamodules.download import DataError
from dreg.datamodules.mnist import MNISTDataModule
from dreg.datamodules.omniglot import OmniglotDataModule
from dreg.datamodules.struct_mnist import StructMNISTDataModule

__all__ = [
    "Batch",
    "BinarizedDataModule",
    "DataError",
    "MNISTDataModule",
    "OmniglotDataModule",
    "StructMNISTDataModule",
]
