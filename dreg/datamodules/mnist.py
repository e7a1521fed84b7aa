"""MNIST from the canonical gzipped IDX files (torchvision layout ``<data_dir>/MNIST/raw``).

Split as in the DReG/IWAE code: the first 50,000 training images train, the last 10,000 of the
training file validate, and the 10,000 test images test. Grey levels are scaled to [0, 1].
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dreg.datamodules.binarized import BinarizedDataModule
from dreg.datamodules.download import DATA_DIR_HINT, DataError, download, verify_checksum

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
# md5 of the .gz files, as published by torchvision (MNIST.resources).
IMAGE_FILES = {
    "train-images-idx3-ubyte.gz": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", 60000),
    "t10k-images-idx3-ubyte.gz": ("9fb629c4189551a2d022fa330f9573f3", 10000),
}
NUM_TRAIN = 50000
SIDE = 28
IDX_IMAGE_MAGIC = 2051


def read_idx_images(
    path: Path, expected_count: int | None = None, side: int | None = None
) -> np.ndarray:
    """Read a gzipped IDX image file into ``uint8 [N, rows * cols]``.

    :param expected_count: the number of images the file must hold.
    :param side: the image height and width the file must have (28 for MNIST).
    :raises DataError: naming the file when it is not gzip, not IDX images, truncated, or of
        the wrong count or size.
    """
    fix = f"delete {path} and download it again ({MIRRORS[0]}{path.name})"
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable gzip file ({err}); {fix}") from err
    if len(raw) < 16:
        raise DataError(f"{path}: too short for an IDX header ({len(raw)} bytes); {fix}")
    magic, count, rows, cols = struct.unpack(">IIII", raw[:16])
    if magic != IDX_IMAGE_MAGIC:
        raise DataError(f"{path}: IDX magic {magic}, expected {IDX_IMAGE_MAGIC} (images); {fix}")
    if len(raw) != 16 + count * rows * cols:
        raise DataError(
            f"{path}: header says {count}x{rows}x{cols} pixels but the file holds "
            f"{len(raw) - 16} bytes (truncated); {fix}"
        )
    if side is not None and (rows, cols) != (side, side):
        raise DataError(f"{path}: {count}x{rows}x{cols} images, expected {side}x{side}; {fix}")
    if expected_count is not None and count != expected_count:
        raise DataError(f"{path}: {count} images, expected {expected_count}; {fix}")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(count, rows * cols)


def ensure_file(raw_dir: Path, name: str, md5: str, allow_download: bool) -> Path:
    """Return the path of ``name`` in ``raw_dir``; download it if absent and allowed."""
    path = raw_dir / name
    if path.exists():
        return path
    if not allow_download:
        raise DataError(
            f"{path} not found; download {name} from {MIRRORS[0]} into {raw_dir}, or "
            f"{DATA_DIR_HINT} (it must contain MNIST/raw/{name})"
        )
    return download([m + name for m in MIRRORS], path, md5)


class MNISTDataModule(BinarizedDataModule):
    """Dynamically binarized MNIST (50k train / 10k validation / 10k test).

    :param download: fetch missing files from the standard mirrors (md5-checked, atomic).
    :param verify: check the md5 of the files found on disk.
    """

    def __init__(self, *args, download: bool = True, verify: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.download, self.verify = download, verify

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "MNIST" / "raw"

    def prepare_data(self) -> None:
        for name, (md5, _) in IMAGE_FILES.items():
            ensure_file(self.raw_dir, name, md5, self.download)

    def read_images(self) -> tuple[Tensor, Tensor]:
        """``(train_file, test_file)`` as float32 ``[N, 784]`` in [0, 1]."""
        arrays = []
        for name, (md5, count) in IMAGE_FILES.items():
            path = ensure_file(self.raw_dir, name, md5, self.download)
            if self.verify:
                verify_checksum(path, md5, source=f" from {MIRRORS[0]}{name}")
            arrays.append(
                torch.from_numpy(read_idx_images(path, count, SIDE).astype(np.float32) / 255)
            )
        return arrays[0], arrays[1]

    def load_splits(self) -> dict[str, Tensor]:
        train_file, test_file = self.read_images()
        return {"train": train_file[:NUM_TRAIN], "val": train_file[NUM_TRAIN:], "test": test_file}
