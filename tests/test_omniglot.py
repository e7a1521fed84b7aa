"""Omniglot: the chardata.mat reader, the Lake-derived 28x28 dataset, its cache and splits.

The reader tests write small files in the real layouts; the real-data tests read
``$DREG_DATA_DIR/omniglot-lake`` and skip, with the reason, when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from dreg.datamodules import omniglot_lake
from dreg.datamodules.omniglot import OmniglotDataModule, read_chardata, validation_split
from dreg.datamodules.omniglot_lake import (
    LAKE_FILE,
    area_overlaps,
    cache_name,
    derive,
    downsample_counts,
    load_lake28,
)


def write_chardata(path: Path, train: np.ndarray, test: np.ndarray) -> None:
    """Write ``[N, 28, 28]`` images as chardata.mat does: 784 x N, each column Fortran order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {"data": train, "testdata": test}
    scipy.io.savemat(path, {k: a.reshape(len(a), -1, order="F").T for k, a in columns.items()})


def write_lake(path: Path, num_chars: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """A small npz in the Lake layout: ``num_chars`` characters x 20 drawings, white = 1."""
    rng = np.random.default_rng(seed)
    n = num_chars * 20
    arrays = {
        "images": (rng.random((n, 105, 105)) > 0.1).astype(np.uint8),
        "char_id": np.repeat(np.arange(1, num_chars + 1), 20).astype(np.int16),
        "sample": np.tile(np.arange(1, 21), num_chars).astype(np.int8),
        "alphabet": np.repeat(np.arange(num_chars) % 2, 20).astype(np.int8),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


# -- chardata.mat ---------------------------------------------------------------------------
def test_chardata_reads_fortran_order_back_in_known_order(tmp_path: Path) -> None:
    image = np.zeros((28, 28), dtype=np.float32)
    image[2, 5] = 1.0  # one pixel at row 2, column 5: column-major index 2 + 28 * 5
    image[20, 1] = 0.5
    write_chardata(tmp_path / "c.mat", image[None], np.stack([image.T, image]))
    raw = scipy.io.loadmat(tmp_path / "c.mat")["data"]
    assert raw.shape == (784, 1) and raw[2 + 28 * 5, 0] == 1.0  # the layout really is Fortran
    train, test = read_chardata(tmp_path / "c.mat")
    assert train.shape == (1, 784) and test.shape == (2, 784) and train.dtype == np.float32
    assert train[0, 2 * 28 + 5] == 1.0 and train[0, 20 * 28 + 1] == 0.5  # row-major rows
    np.testing.assert_array_equal(train[0].reshape(28, 28), image)
    np.testing.assert_array_equal(test[0].reshape(28, 28), image.T)


def test_chardata_datamodule_splits(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train = rng.random((60, 28, 28)).astype(np.float32)
    write_chardata(tmp_path / "omniglot" / "chardata.mat", train, train[:7])
    (tmp_path / LAKE_FILE).parent.mkdir()
    (tmp_path / LAKE_FILE).write_bytes(b"never read: chardata.mat comes first")
    dm = OmniglotDataModule(tmp_path, num_validation=10, verify=False, download=False)
    assert dm.resolve_source() == "chardata"
    dm.setup()
    assert [len(dm.splits[k]) for k in ("train", "val", "test")] == [50, 10, 7]
    # The DReG code's rule: RandomState(123) permutation, the last images validate.
    permutation = np.random.RandomState(123).permutation(60)
    flat = torch.from_numpy(train.reshape(60, 784))
    assert torch.equal(dm.splits["train"], flat[permutation[:50]])
    assert ((dm.splits["val"] == 1) <= (flat[permutation[50:]] > 0)).all()


def test_validation_split_is_stable_and_seeded() -> None:
    data = torch.arange(24345).float()[:, None]
    train, val = validation_split(data, 1345)
    again_train, again_val = validation_split(data, 1345)
    assert torch.equal(val, again_val) and torch.equal(train, again_train)
    assert len(train) == 23000 and len(val) == 1345
    assert sorted(torch.cat([train, val]).flatten().tolist()) == list(range(24345))  # a partition
    # The validation images are the last 1,345 indices of RandomState(123).permutation(24345).
    expected = np.random.RandomState(123).permutation(24345)[-1345:]
    assert val.flatten().tolist() == expected.tolist()
    assert not torch.equal(validation_split(data, 1345, seed=124)[1], val)
    with pytest.raises(ValueError, match="num_validation=24345 must be in"):
        validation_split(data, 24345)


# -- the Lake derivation --------------------------------------------------------------------
def test_area_overlaps_are_an_exact_partition() -> None:
    overlaps = area_overlaps()
    assert overlaps.shape == (28, 105) and overlaps.dtype.kind == "i"
    np.testing.assert_array_equal(overlaps.sum(1), 105)  # each output pixel: 3.75 input pixels
    np.testing.assert_array_equal(overlaps.sum(0), 28)  # each input pixel is fully used once
    assert list(overlaps[0, :5]) == [28, 28, 28, 21, 0]  # [0, 3.75): 3 whole pixels + 3/4
    assert list(overlaps[1, 3:8]) == [7, 28, 28, 28, 14]  # [3.75, 7.5)


def test_downsample_is_area_averaging() -> None:
    ink = np.zeros((3, 105, 105), dtype=np.uint8)
    ink[1] = 1  # all ink -> every pixel 1
    ink[2, :, :4] = 1  # first 4 input columns -> output column 0 full, column 1 one seventh...
    counts = downsample_counts(ink).reshape(3, 28, 28)
    assert (counts[0] == 0).all() and (counts[1] == 105**2).all()
    assert (counts[2][:, 0] == 105**2).all()  # input columns 0-3.75 fully inked
    assert (counts[2][:, 1] == 7 * 105).all()  # 0.25 of 3.75 columns: 7/105 of the area
    assert (counts[2][:, 2:] == 0).all()
    # Anti-aliased: a one-pixel-period stripe pattern averages to grey, with no aliasing.
    ink_stripes = np.zeros((1, 105, 105), dtype=np.uint8)
    ink_stripes[0, :, ::2] = 1
    grey = downsample_counts(ink_stripes)[0] / 105**2
    assert 0.4 < grey.min() and grey.max() < 0.6


def test_derive_splits_per_character(tmp_path: Path) -> None:
    arrays = write_lake(tmp_path / "lake.npz")
    shuffled = np.random.default_rng(1).permutation(60)  # storage order must not matter
    train, test = derive({k: v[shuffled] for k, v in arrays.items()})
    assert train.shape == (45, 784) and test.shape == (15, 784) and train.dtype == np.uint16
    ink = 1 - arrays["images"]
    # Character 2 (index 1), drawing 16 is the 6th test image; drawing 3 the 18th training one.
    np.testing.assert_array_equal(test[5], downsample_counts(ink[20 + 15 : 20 + 16])[0])
    np.testing.assert_array_equal(train[17], downsample_counts(ink[20 + 2 : 20 + 3])[0])


def test_lake_cache_is_written_once_atomically_and_reused(tmp_path: Path, monkeypatch) -> None:
    write_lake(tmp_path / LAKE_FILE)
    source = tmp_path / LAKE_FILE
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where a cache folder should be: mkdir fails (like read-only)")
    cache_dirs = [blocked / "cache", tmp_path / "cache"]
    train, test = load_lake28(source, cache_dirs, verify=False)
    assert train.shape == (45, 784) and test.shape == (15, 784) and train.dtype == np.float32
    assert 0 <= train.min() and train.max() <= 1 and abs(train.mean() - 0.1) < 0.01  # 10% ink
    written = list((tmp_path / "cache").iterdir())
    assert [p.name for p in written] == [cache_name(omniglot_lake.file_digest(source, "sha256"))]

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although a cache exists")

    monkeypatch.setattr(omniglot_lake, "derive", fail)
    cached_train, cached_test = load_lake28(source, cache_dirs, verify=False)
    np.testing.assert_array_equal(cached_train, train)
    np.testing.assert_array_equal(cached_test, test)


def test_lake_cache_skips_a_folder_marked_read_only(tmp_path: Path) -> None:
    write_lake(tmp_path / LAKE_FILE)
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)  # root could still write here: the mode bits must be honoured
    load_lake28(tmp_path / LAKE_FILE, [read_only / "cache", tmp_path / "cache"], verify=False)
    assert not (read_only / "cache").exists()
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_lake_cache_survives_an_interrupted_write(tmp_path: Path, monkeypatch) -> None:
    write_lake(tmp_path / LAKE_FILE)

    def interrupted(file, **arrays):
        file.write(b"PK\x03\x04 half an archive")
        raise KeyboardInterrupt

    monkeypatch.setattr(omniglot_lake.np, "savez_compressed", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_lake28(tmp_path / LAKE_FILE, [tmp_path / "cache"], verify=False)
    assert list((tmp_path / "cache").iterdir()) == []  # no partial file left behind
    monkeypatch.undo()
    # A corrupt cache file under the right name is ignored and replaced.
    name = cache_name(omniglot_lake.file_digest(tmp_path / LAKE_FILE, "sha256"))
    (tmp_path / "cache" / name).write_bytes(b"garbage")
    train, _ = load_lake28(tmp_path / LAKE_FILE, [tmp_path / "cache"], verify=False)
    assert train.shape == (45, 784)
    assert np.load(tmp_path / "cache" / name)["train"].shape == (45, 784)


def test_cache_key_changes_with_source_and_method(monkeypatch) -> None:
    assert cache_name("a" * 64) != cache_name("b" * 64)
    before = cache_name("a" * 64)
    monkeypatch.setattr(omniglot_lake, "METHOD_VERSION", "lake28-area-v2")
    assert cache_name("a" * 64) != before


# -- the real Lake data ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def lake_omniglot(tmp_path_factory) -> OmniglotDataModule:
    root = os.environ.get("DREG_DATA_DIR")
    if not root:
        pytest.skip("DREG_DATA_DIR is not set (point it at the folder holding omniglot-lake/)")
    if not (Path(root) / LAKE_FILE).exists():
        pytest.skip(f"DREG_DATA_DIR={root} lacks {LAKE_FILE}")
    dm = OmniglotDataModule(root, source="lake", cache_dir=tmp_path_factory.mktemp("cache"))
    dm.setup()
    return dm


def test_lake_omniglot_splits_and_values(lake_omniglot: OmniglotDataModule) -> None:
    sizes = {k: tuple(v.shape) for k, v in lake_omniglot.splits.items()}
    assert sizes == {"train": (23000, 784), "val": (1345, 784), "test": (8115, 784)}
    train = lake_omniglot.splits["train"]
    assert train.min() == 0 and train.max() == 1
    assert 0.05 < train.mean() < 0.12  # mostly background: ink = 1 after inversion
    counts = train * 105**2
    assert (counts - counts.round()).abs().max() < 1e-2  # grey levels are counts out of 11,025
    border = train.view(-1, 28, 28)[:, [0, -1]].mean()
    assert border < 0.1 * train.mean()  # ink sits in the middle, not at the (inverted) border
    for name in ("val", "test"):
        assert set(lake_omniglot.splits[name].unique().tolist()) == {0.0, 1.0}


def test_lake_omniglot_every_alphabet_in_both_splits() -> None:
    root = os.environ.get("DREG_DATA_DIR")
    if not root:
        pytest.skip("DREG_DATA_DIR is not set (point it at the folder holding omniglot-lake/)")
    if not (Path(root) / LAKE_FILE).exists():
        pytest.skip(f"DREG_DATA_DIR={root} lacks {LAKE_FILE}")
    with np.load(Path(root) / LAKE_FILE) as lake:
        sample, alphabet = lake["sample"], lake["alphabet"]
    is_train = sample <= omniglot_lake.NUM_TRAIN_DRAWINGS
    assert is_train.sum() == 24345 and (~is_train).sum() == 8115
    assert set(alphabet[is_train]) == set(alphabet[~is_train]) == set(range(50))


def test_lake_omniglot_model_statistics(lake_omniglot: OmniglotDataModule) -> None:
    kwargs = lake_omniglot.model_kwargs()
    assert kwargs["data_dim"] == 784 and "context_dim" not in kwargs
    torch.testing.assert_close(kwargs["train_mean"], lake_omniglot.splits["train"].mean(0))
