"""Omniglot: the chardata.mat reader, the Lake-derived 28x28 dataset, its preparation, splits.

The reader tests write small files in the real layouts; the real-data tests read
``$DREG_DATA_DIR/omniglot-lake`` and skip, with the reason, when it is absent.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from dreg.datamodules import omniglot_lake
from dreg.datamodules.download import DataError, file_digest
from dreg.datamodules.omniglot import OmniglotDataModule, read_chardata, validation_split
from dreg.datamodules.omniglot_lake import (
    COMMAND,
    LAKE_FILE,
    LAKE_SHA256,
    LEVELS,
    METHOD_VERSION,
    PREPARED_FILE,
    area_overlaps,
    derive,
    downsample_counts,
    prepare,
    read_prepared,
    write_prepared,
)
from dreg.datamodules.prepare_omniglot import main

ROOT = Path(__file__).resolve().parents[1]


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
    in_order_train, in_order_test = derive(arrays)  # deterministic, whatever the order
    np.testing.assert_array_equal(train, in_order_train)
    np.testing.assert_array_equal(test, in_order_test)
    ink = 1 - arrays["images"]
    # Character 2 (index 1), drawing 16 is the 6th test image; drawing 3 the 18th training one.
    np.testing.assert_array_equal(test[5], downsample_counts(ink[20 + 15 : 20 + 16])[0])
    np.testing.assert_array_equal(train[17], downsample_counts(ink[20 + 2 : 20 + 3])[0])


# -- the preparation step ------------------------------------------------------------------
def prepared_lake(data_dir: Path, **kwargs) -> OmniglotDataModule:
    """A Lake-sourced DataModule on a :func:`write_lake` folder (tiny: 5 validation images)."""
    return OmniglotDataModule(data_dir, source="lake", num_validation=5, verify=False, **kwargs)


def test_prepare_command_writes_the_file_and_a_second_run_is_a_no_op(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    assert COMMAND == f"python -m {main.__module__}"  # the command every error message names
    arrays = write_lake(tmp_path / LAKE_FILE)
    assert main(["--data-dir", str(tmp_path), "--no-verify"]) == 0
    output = tmp_path / PREPARED_FILE
    assert capsys.readouterr().out.startswith(f"wrote {output} in ")
    assert sorted(p.name for p in output.parent.iterdir()) == [output.name, LAKE_FILE.name]
    prepared = read_prepared(output, fix="")
    train, test = derive(arrays)
    np.testing.assert_array_equal(prepared.train, train)  # the exact uint16 counts
    np.testing.assert_array_equal(prepared.test, test)
    assert prepared.source_sha256 == file_digest(tmp_path / LAKE_FILE, "sha256")
    assert prepared.method == METHOD_VERSION

    def fail(*args, **kwargs):
        raise AssertionError("derived again although the prepared file is current")

    monkeypatch.setattr(omniglot_lake, "derive", fail)
    before = output.stat()
    monkeypatch.setenv("DREG_DATA_DIR", str(tmp_path))  # the default --data-dir
    assert main(["--no-verify"]) == 0
    assert capsys.readouterr().out == f"{output} is up to date ({METHOD_VERSION}); nothing to do\n"
    after = output.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


@pytest.mark.slow  # a fresh interpreter imports torch and Lightning: seconds
def test_prepare_command_runs_as_a_module(tmp_path: Path) -> None:
    write_lake(tmp_path / LAKE_FILE)
    command = [sys.executable, "-W", "error::RuntimeWarning", "-m"]
    command += ["dreg.datamodules.prepare_omniglot", "--data-dir", str(tmp_path), "--no-verify"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    # -W error: runpy warns (an error here) if the package imported the module before it ran.
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {tmp_path / PREPARED_FILE} in ")
    assert read_prepared(tmp_path / PREPARED_FILE, fix="").train.shape == (45, 784)


def test_prepare_data_creates_the_file_and_setup_reads_only_it(tmp_path: Path) -> None:
    arrays = write_lake(tmp_path / LAKE_FILE)
    elsewhere = tmp_path / "elsewhere" / "omniglot28.npz"
    dm = prepared_lake(tmp_path, prepared_path=elsewhere)
    command = f"`{COMMAND} --data-dir {tmp_path} --output {elsewhere}`"
    with pytest.raises(DataError, match=rf"omniglot28.npz not found: .* {re.escape(command)}"):
        dm.setup()
    dm.prepare_data()
    assert elsewhere.exists() and not (tmp_path / PREPARED_FILE).exists()
    (tmp_path / LAKE_FILE).unlink()  # from here on, the prepared file alone must suffice
    dm.setup()
    assert [len(dm.splits[k]) for k in ("train", "val", "test")] == [40, 5, 15]
    train_counts = torch.from_numpy(derive(arrays)[0].astype(np.float32))
    expected_train, _ = validation_split(train_counts / LEVELS, 5)
    assert torch.equal(dm.splits["train"], expected_train)
    # source=auto finds the prepared file, and preparing it again has nothing to do.
    auto = OmniglotDataModule(tmp_path, prepared_path=elsewhere, verify=False, download=False)
    assert auto.resolve_source() == "lake"
    assert prepare(tmp_path, elsewhere, verify=False) is False


def write_stale(path: Path, case: str) -> None:
    """A prepared file at ``path`` gone bad in one of the ways :func:`read_prepared` catches."""
    good = read_prepared(path, fix="")
    if case == "corrupt":
        path.write_bytes(b"garbage, not an npz")
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:-1000])
    elif case == "flipped-byte":  # a valid archive whose compressed counts fail their CRC
        content = bytearray(path.read_bytes())
        content[len(content) // 2] ^= 0xFF
        path.write_bytes(bytes(content))
    elif case == "old-method":
        write_prepared(path, replace(good, method="lake28-area-v0"), path.parent)
    elif case == "float-counts":
        write_prepared(path, replace(good, train=good.train.astype(np.float32)), path.parent)
    else:  # another source: only preparation, which hashes the source, can tell
        write_prepared(path, replace(good, source_sha256="0" * 64), path.parent)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("corrupt", "not a readable prepared Omniglot file, corrupt or truncated"),
        ("truncated", "not a readable prepared Omniglot file, corrupt or truncated"),
        ("flipped-byte", "not a readable prepared Omniglot file, corrupt or truncated"),
        ("old-method", r"is stale \(made by method lake28-area-v0, this code derives"),
        ("float-counts", r"'train' is float32 \(45, 784\), expected uint16"),
        ("other-source", None),
    ],
    ids=["corrupt", "truncated", "flipped-byte", "old-method", "float-counts", "other-source"],
)
def test_stale_or_corrupt_prepared_file(
    tmp_path: Path, case: str, message: str | None, caplog
) -> None:
    write_lake(tmp_path / LAKE_FILE)
    prepare(tmp_path, verify=False)
    output = tmp_path / PREPARED_FILE
    write_stale(output, case)
    dm = prepared_lake(tmp_path)
    if message is not None:  # setup reads only the prepared file: one line, naming the command
        with pytest.raises(DataError, match=message) as error:
            dm.setup()
        assert "\n" not in str(error.value) and str(output) in str(error.value)
        assert f"`{COMMAND} --data-dir {tmp_path}`" in str(error.value)
    with caplog.at_level("WARNING", logger=omniglot_lake.__name__):
        assert prepare(tmp_path, verify=False) is True  # prepare_data derives it again
    assert len(caplog.records) == 1 and str(output) in caplog.records[0].getMessage()
    source_sha256 = file_digest(tmp_path / LAKE_FILE, "sha256")
    assert read_prepared(output, fix="").staleness(source_sha256) is None
    dm.setup()
    assert len(dm.splits["train"]) == 40


@pytest.mark.parametrize("cause", ["read-only-filesystem", "not-a-folder"])
def test_unwritable_prepared_path_gives_one_line_naming_the_command(
    tmp_path: Path, cause: str, monkeypatch, capsys
) -> None:
    write_lake(tmp_path / LAKE_FILE)
    if cause == "read-only-filesystem":
        # We run as root, which writes through a chmod 0555 folder, so mode bits cannot make
        # one read-only here; instead the first write in the folder fails as on a read-only
        # mount (CI's shared data folder).
        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(tempfile, "mkstemp", read_only)
        output = tmp_path / PREPARED_FILE
    else:  # a real failure, no patching: the prepared file's folder would be under a file
        (tmp_path / "a-file").write_text("not a folder")
        output = tmp_path / "a-file" / "omniglot28.npz"
    dm = prepared_lake(tmp_path, prepared_path=output)
    with pytest.raises(DataError) as error:
        dm.prepare_data()
    line = str(error.value)
    assert "\n" not in line and line.startswith(f"cannot write the prepared Omniglot file {output}")
    command = f"`{COMMAND} --data-dir {tmp_path} --output "
    assert command in line and "dataset.prepared_path=" in line
    assert sorted(p.name for p in (tmp_path / LAKE_FILE).parent.iterdir()) == [LAKE_FILE.name]
    assert main(["--data-dir", str(tmp_path), "--output", str(output), "--no-verify"]) == 3
    assert capsys.readouterr().err == f"error: {line}\n"


# -- the real Lake data ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def lake_omniglot(tmp_path_factory) -> OmniglotDataModule:
    """The real data, prepared once into a temporary folder (the data folder may be read-only)."""
    root = os.environ.get("DREG_DATA_DIR")
    if not root:
        pytest.skip("DREG_DATA_DIR is not set (point it at the folder holding omniglot-lake/)")
    if not (Path(root) / LAKE_FILE).exists():
        pytest.skip(f"DREG_DATA_DIR={root} lacks {LAKE_FILE}")
    prepared = tmp_path_factory.mktemp("prepared") / "omniglot28.npz"
    dm = OmniglotDataModule(root, source="lake", prepared_path=prepared)
    dm.prepare_data()
    dm.setup()
    return dm


@pytest.mark.slow  # derives the real 32k-image set (seconds)
def test_lake_omniglot_prepared_file(lake_omniglot: OmniglotDataModule) -> None:
    prepared = read_prepared(lake_omniglot.prepared_path, fix="")
    assert prepared.train.shape == (24345, 784) and prepared.test.shape == (8115, 784)
    assert prepared.source_sha256 == LAKE_SHA256 and prepared.method == METHOD_VERSION
    assert prepare(lake_omniglot.data_dir, lake_omniglot.prepared_path) is False  # current


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
