"""Omniglot at 28x28, as in the IWAE (Burda et al. 2016) and DReG (Tucker et al. 2019) papers.

Two sources, one DataModule; ``source=auto`` takes the first present:

* ``<data_dir>/omniglot/chardata.mat``, the file IWAE/DReG users have (github.com/yburda/iwae,
  ``datasets/OMNIGLOT/chardata.mat``): keys ``data`` and ``testdata``, ``784 x N``, each column
  one image stored column-major (Fortran order); 24,345 train and 8,070 test images.
* ``<data_dir>/omniglot-lake/omniglot_lake_105x105.npz``, Lake et al.'s original drawings, from
  which :mod:`dreg.datamodules.omniglot_lake` derives a 28x28 dataset (not chardata: see there).
  The derivation is a preparation step of its own (``python -m
  dreg.datamodules.prepare_omniglot``):
  ``prepare_data`` runs it when the prepared file is missing or stale, and ``setup`` reads only
  the prepared file.

Split as in the DReG code (``load_omniglot``): the training images are permuted by
``np.random.RandomState(123).permutation`` and the last 1,345 become the validation set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
import torch
from torch import Tensor

from dreg.datamodules.binarized import BinarizedDataModule
from dreg.datamodules.download import (
    DATA_DIR_HINT,
    GIT_BLOB_SHA1,
    DataError,
    download,
    verify_checksum,
)
from dreg.datamodules.omniglot_lake import LAKE_FILE, PREPARED_FILE, load_prepared, prepare

CHARDATA_FILE = Path("omniglot") / "chardata.mat"
CHARDATA_URL = "https://raw.githubusercontent.com/yburda/iwae/master/datasets/OMNIGLOT/chardata.mat"
# The git blob id of chardata.mat in yburda/iwae (and mingzhang-yin/ARM-gradient).
CHARDATA_BLOB = "016a3536ffe5e1d38e42563a18d7a78bfaf643ec"
SIDE = 28
NUM_VALIDATION, SPLIT_SEED = 1345, 123
SOURCES = ("auto", "chardata", "lake")


def read_chardata(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``chardata.mat`` into ``(train, test)`` float32 ``[N, 784]``, rows row-major.

    :raises DataError: naming the file when it is unreadable, lacks a key, or has the wrong
        shape or value range.
    """
    fix = f"download it again from {CHARDATA_URL}, or {DATA_DIR_HINT}"
    try:
        mat = scipy.io.loadmat(path)
    except (OSError, ValueError, TypeError, EOFError, scipy.io.matlab.MatReadError) as err:
        raise DataError(
            f"{path}: not a readable MATLAB file, corrupt or truncated ({err}); {fix}"
        ) from err
    splits = []
    for key in ("data", "testdata"):
        if key not in mat:
            found = sorted(k for k in mat if not k.startswith("__"))
            raise DataError(f"{path}: no '{key}' array (found {found}), not chardata.mat; {fix}")
        columns = np.asarray(mat[key], dtype=np.float32)  # [784, N], each column Fortran-order
        if columns.ndim != 2 or columns.shape[0] != SIDE * SIDE:
            raise DataError(
                f"{path}: '{key}' has shape {columns.shape}, expected [784, N] (one 28x28 "
                f"image per column); {fix}"
            )
        if columns.size and (columns.min() < 0 or columns.max() > 1):
            raise DataError(f"{path}: '{key}' has values outside [0, 1]; {fix}")
        n = columns.shape[1]
        # Column k of an image holds pixel (r, c) at r + 28 c; reshape gives [n, c, r] -> swap.
        images = columns.T.reshape(n, SIDE, SIDE).transpose(0, 2, 1)  # [N, row, col]
        splits.append(np.ascontiguousarray(images.reshape(n, SIDE * SIDE)))
    return splits[0], splits[1]


def validation_split(
    train: Tensor, num_validation: int, seed: int = SPLIT_SEED
) -> tuple[Tensor, Tensor]:
    """The DReG code's split: permute with ``RandomState(seed)``, the last ``num_validation``
    images validate. Returns ``(train, val)``."""
    if not 0 < num_validation < len(train):
        raise ValueError(
            f"num_validation={num_validation} must be in (0, {len(train)}): the training set "
            f"has {len(train)} images"
        )
    permutation = torch.from_numpy(np.random.RandomState(seed).permutation(len(train)))
    shuffled = train[permutation]
    return shuffled[:-num_validation], shuffled[-num_validation:]


class OmniglotDataModule(BinarizedDataModule):
    """Dynamically binarized 28x28 Omniglot (23,000 train / 1,345 validation / test).

    :param source: ``auto`` (chardata.mat if present, else the Lake images, else download
        chardata.mat), ``chardata`` or ``lake``.
    :param num_validation: training images held out for validation (1,345 as in the DReG code).
    :param split_seed: seed of the validation permutation (123 as in the DReG code).
    :param prepared_path: the prepared Lake-derived file (default
        ``<data_dir>/omniglot-lake/omniglot28.npz``); point it at a writable place when the
        data directory is read-only.
    :param download: fetch chardata.mat when no source is present (checksum-verified, atomic).
    :param verify: check the checksum of the source file.
    """

    def __init__(
        self,
        *args,
        source: str = "auto",
        num_validation: int = NUM_VALIDATION,
        split_seed: int = SPLIT_SEED,
        prepared_path: str | Path | None = None,
        download: bool = True,
        verify: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if source not in SOURCES:
            raise ValueError(f"dataset.source={source!r} is not one of {SOURCES}")
        self.source, self.num_validation, self.split_seed = source, num_validation, split_seed
        self.prepared_path = (
            Path(prepared_path) if prepared_path is not None else self.data_dir / PREPARED_FILE
        )
        self.download, self.verify = download, verify

    @property
    def chardata_path(self) -> Path:
        return self.data_dir / CHARDATA_FILE

    @property
    def lake_path(self) -> Path:
        return self.data_dir / LAKE_FILE

    def resolve_source(self) -> str:
        """``chardata`` or ``lake``: the source to read, downloading chardata.mat if needed.

        ``auto`` takes the Lake images when there is no chardata.mat and either the Lake file
        or an already prepared file is present (the prepared file alone suffices to train).
        """
        lake_present = self.lake_path.exists() or self.prepared_path.exists()
        if self.source == "lake" or (
            self.source == "auto" and not self.chardata_path.exists() and lake_present
        ):
            return "lake"
        if not self.chardata_path.exists():
            if not self.download:
                raise DataError(
                    f"no Omniglot in {self.data_dir}: neither {self.chardata_path} nor "
                    f"{self.lake_path} exists; put chardata.mat ({CHARDATA_URL}) or the Lake "
                    f"npz there, or {DATA_DIR_HINT}"
                )
            download([CHARDATA_URL], self.chardata_path, CHARDATA_BLOB, GIT_BLOB_SHA1)
        return "chardata"

    def prepare_data(self) -> None:
        """Download chardata.mat, or prepare the Lake-derived file, when needed."""
        if self.resolve_source() == "lake":
            prepare(self.data_dir, self.prepared_path, self.verify)

    def read_images(self) -> tuple[Tensor, Tensor]:
        """``(train, test)`` float32 ``[N, 784]`` in [0, 1] from the resolved source."""
        if self.resolve_source() == "chardata":
            if self.verify:
                source = f" from {CHARDATA_URL} (or set dataset.verify=false)"
                verify_checksum(self.chardata_path, CHARDATA_BLOB, GIT_BLOB_SHA1, source)
            train, test = read_chardata(self.chardata_path)
        else:
            train, test = load_prepared(self.prepared_path, self.data_dir, self.verify)
        return torch.from_numpy(train), torch.from_numpy(test)

    def load_splits(self) -> dict[str, Tensor]:
        train_all, test = self.read_images()
        train, val = validation_split(train_all, self.num_validation, self.split_seed)
        return {"train": train, "val": val, "test": test}
