"""Bad data gives one clear DataError naming the file, the problem and the fix; no network used.

Every case writes its own small file (or none) in ``tmp_path``; downloads go to local
``file://`` URLs or to a monkeypatched ``urllib.request.urlopen`` that fails the way a network
does (no connection, a transfer cut in the middle).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import struct
import subprocess
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from dreg.datamodules import download as download_module
from dreg.datamodules.download import GIT_BLOB_SHA1, DataError, download, file_digest
from dreg.datamodules.mnist import MNISTDataModule, read_idx_images
from dreg.datamodules.omniglot import OmniglotDataModule, read_chardata
from dreg.datamodules.omniglot_lake import LAKE_FILE, prepare, read_lake

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"


def idx_bytes(count: int, magic: int = 2051, side: int = 28) -> bytes:
    header = struct.pack(">IIII", magic, count, side, side)
    return header + np.arange(count * side * side, dtype=np.uint8).tobytes()


def write_gz(path: Path, raw: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw))
    return path


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def no_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# -- MNIST files ----------------------------------------------------------------------------
def test_mnist_missing_file(tmp_path: Path) -> None:
    dm = MNISTDataModule(tmp_path, download=False)
    with pytest.raises(
        DataError, match=rf"MNIST/raw/{TRAIN_IMAGES} not found; download .*DREG_DATA"
    ):
        dm.prepare_data()


def go_offline(monkeypatch, reason: str) -> None:
    """Make every download fail the way a machine without network does."""

    def offline(url, timeout=None):
        raise urllib.error.URLError(reason)

    monkeypatch.setattr(download_module.urllib.request, "urlopen", offline)


def test_mnist_missing_file_without_network(tmp_path: Path, monkeypatch) -> None:
    go_offline(monkeypatch, "[Errno -3] Temporary failure in name resolution")
    with pytest.raises(DataError, match=rf"could not download {TRAIN_IMAGES} .*name resolution"):
        MNISTDataModule(tmp_path).prepare_data()
    assert no_leftovers(tmp_path / "MNIST" / "raw") == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x00" * 100, "not a readable gzip file"),  # corrupt: not gzip at all
        (gzip.compress(idx_bytes(3))[:60], "not a readable gzip file"),  # truncated gzip stream
        (gzip.compress(idx_bytes(3)[:1000]), r"header says 3x28x28 pixels .* \(truncated\)"),
        (gzip.compress(b"\x00\x00\x08"), "too short for an IDX header"),
        (gzip.compress(idx_bytes(3, magic=2049)), r"IDX magic 2049, expected 2051 \(images\)"),
        (gzip.compress(idx_bytes(3)), "3 images, expected 60000"),
        (gzip.compress(idx_bytes(60000, side=5)), r"60000x5x5 images, expected 28x28"),
    ],
    ids=["corrupt", "truncated-gzip", "truncated-idx", "no-header", "labels-file", "count", "size"],
)
def test_mnist_bad_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / TRAIN_IMAGES
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"{TRAIN_IMAGES}: {message}.*download it again"):
        read_idx_images(path, expected_count=60000, side=28)


def test_mnist_wrong_checksum(tmp_path: Path) -> None:
    write_gz(tmp_path / "MNIST" / "raw" / TRAIN_IMAGES, idx_bytes(60000))
    write_gz(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz", idx_bytes(10000))
    dm = MNISTDataModule(tmp_path, download=False)
    with pytest.raises(DataError, match=rf"{TRAIN_IMAGES}: md5 checksum \w+ does not match .*"):
        dm.setup()
    # With verify=false the same (well-formed) files load.
    MNISTDataModule(tmp_path, download=False, verify=False).setup()


# -- downloads ------------------------------------------------------------------------------
def test_download_from_a_file_url(tmp_path: Path) -> None:
    source = tmp_path / "mirror" / "data.bin"
    source.parent.mkdir()
    source.write_bytes(b"payload" * 1000)
    target = tmp_path / "data" / "data.bin"
    urls = ["file:///nonexistent/mirror/data.bin", source.as_uri()]  # first mirror fails
    assert download(urls, target, md5(source.read_bytes())) == target
    assert target.read_bytes() == source.read_bytes()
    assert no_leftovers(target.parent) == ["data.bin"]


def test_download_with_wrong_checksum_leaves_nothing(tmp_path: Path) -> None:
    source = tmp_path / "data.bin"
    source.write_bytes(b"not what was published")
    target = tmp_path / "out" / "data.bin"
    with pytest.raises(DataError, match=r"could not download data.bin .*md5 checksum .*match"):
        download([source.as_uri()], target, md5(b"the published bytes"))
    assert no_leftovers(target.parent) == []


class CutTransfer(io.BytesIO):
    """A response that delivers some bytes and then fails, like a dropped connection."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(b"x" * (1 << 20))
        self.error, self.calls = error, 0

    def read(self, size: int = -1) -> bytes:
        self.calls += 1
        if self.calls > 1:
            raise self.error
        return super().read(size)


@pytest.mark.parametrize(
    "error",
    [http.client.IncompleteRead(b"partial"), ConnectionResetError(104, "reset by peer")],
    ids=["incomplete-read", "connection-reset"],
)
def test_interrupted_download_leaves_no_file(tmp_path: Path, monkeypatch, error) -> None:
    monkeypatch.setattr(
        download_module.urllib.request, "urlopen", lambda url, timeout=None: CutTransfer(error)
    )
    target = tmp_path / "out" / "data.bin"
    with pytest.raises(DataError, match=r"could not download data.bin .*by hand, or set DREG"):
        download(["https://example.invalid/data.bin"], target, md5(b"x" * (2 << 20)))
    assert no_leftovers(target.parent) == []


def test_download_killed_midway_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(
        download_module.urllib.request,
        "urlopen",
        lambda url, timeout=None: CutTransfer(KeyboardInterrupt()),
    )
    target = tmp_path / "out" / "data.bin"
    with pytest.raises(KeyboardInterrupt):
        download(["https://example.invalid/data.bin"], target, md5(b""))
    assert no_leftovers(target.parent) == []


def test_git_blob_digest_matches_git(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"some bytes\x00\x01" * 100)
    try:
        expected = subprocess.run(
            ["git", "hash-object", str(path)], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not available")
    assert file_digest(path, GIT_BLOB_SHA1) == expected


# -- Omniglot sources -----------------------------------------------------------------------
def write_mat(path: Path, **arrays: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, arrays)
    return path


def good_chardata(path: Path) -> Path:
    columns = np.random.default_rng(0).random((784, 40))
    return write_mat(path, data=columns, testdata=columns[:, :5])


def test_omniglot_no_source(tmp_path: Path) -> None:
    dm = OmniglotDataModule(tmp_path, download=False)
    message = r"no Omniglot in .*omniglot/chardata.mat nor .*omniglot_lake_105x105.npz.*DREG_DATA"
    with pytest.raises(DataError, match=message):
        dm.prepare_data()


def test_omniglot_no_source_and_no_network(tmp_path: Path, monkeypatch) -> None:
    go_offline(monkeypatch, "Network is unreachable")
    with pytest.raises(DataError, match=r"could not download chardata.mat .*unreachable"):
        OmniglotDataModule(tmp_path).prepare_data()
    assert no_leftovers(tmp_path / "omniglot") == []


def test_omniglot_requested_source_missing(tmp_path: Path) -> None:
    good_chardata(tmp_path / "omniglot" / "chardata.mat")
    with pytest.raises(DataError, match=r"omniglot_lake_105x105.npz not found; set DREG_DATA"):
        OmniglotDataModule(tmp_path, source="lake").prepare_data()
    with pytest.raises(ValueError, match=r"dataset.source='mat' is not one of"):
        OmniglotDataModule(tmp_path, source="mat")


def test_chardata_wrong_checksum(tmp_path: Path) -> None:
    good_chardata(tmp_path / "omniglot" / "chardata.mat")
    dm = OmniglotDataModule(tmp_path, num_validation=10)
    with pytest.raises(DataError, match=r"chardata.mat: git-blob-sha1 checksum \w+ does not"):
        dm.setup()


@pytest.mark.parametrize("case", ["corrupt", "truncated", "missing-key", "wrong-shape", "range"])
def test_chardata_bad_file(tmp_path: Path, case: str) -> None:
    path = tmp_path / "chardata.mat"
    if case == "corrupt":
        path.write_bytes(b"MATLAB 5.0 MAT-file" + b"\xff" * 200)
    elif case == "truncated":
        full = good_chardata(tmp_path / "full.mat").read_bytes()
        path.write_bytes(full[: len(full) // 2])
    elif case == "missing-key":
        write_mat(path, data=np.zeros((784, 3)))
    elif case == "wrong-shape":
        write_mat(path, data=np.zeros((105 * 105, 3)), testdata=np.zeros((105 * 105, 1)))
    else:
        write_mat(path, data=np.full((784, 3), 255.0), testdata=np.zeros((784, 1)))
    message = {
        "corrupt": "not a readable MATLAB file",
        "truncated": "not a readable MATLAB file",
        "missing-key": r"no 'testdata' array \(found \['data'\]\)",
        "wrong-shape": r"'data' has shape \(11025, 3\), expected \[784, N\]",
        "range": r"'data' has values outside \[0, 1\]",
    }[case]
    with pytest.raises(DataError, match=rf"chardata.mat: {message}.*download it again from http"):
        read_chardata(path)


def write_lake_arrays(path: Path, side: int = 105, drop: str | None = None) -> Path:
    arrays = {
        "images": np.ones((20, side, side), dtype=np.uint8),
        "char_id": np.ones(20, dtype=np.int16),
        "sample": np.arange(1, 21, dtype=np.int8),
        "alphabet": np.zeros(20, dtype=np.int8),
    }
    arrays.pop(drop, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def test_lake_wrong_checksum(tmp_path: Path) -> None:
    write_lake_arrays(tmp_path / LAKE_FILE)
    prepared = tmp_path / "prepared" / "omniglot28.npz"
    dm = OmniglotDataModule(tmp_path, num_validation=5, prepared_path=prepared)
    with pytest.raises(DataError, match=r"npz: sha256 \w+ does not match .*dataset.verify=false"):
        dm.prepare_data()
    assert no_leftovers(prepared.parent) == []
    dm = OmniglotDataModule(tmp_path, num_validation=5, prepared_path=prepared, verify=False)
    dm.prepare_data()
    dm.setup()
    # A file prepared from this build is refused where the published source is required.
    dm = OmniglotDataModule(tmp_path, num_validation=5, prepared_path=prepared)
    with pytest.raises(DataError, match=r"omniglot28.npz: derived from a source with sha256 \w+,"):
        dm.setup()


@pytest.mark.parametrize("case", ["corrupt", "truncated", "missing-key", "wrong-shape"])
def test_lake_bad_file(tmp_path: Path, case: str) -> None:
    path = tmp_path / LAKE_FILE
    path.parent.mkdir()
    if case == "corrupt":
        path.write_bytes(b"\x00" * 500)
    elif case == "truncated":
        full = write_lake_arrays(tmp_path / "full.npz").read_bytes()
        path.write_bytes(full[: len(full) // 2])
    elif case == "missing-key":
        write_lake_arrays(path, drop="sample")
    else:
        write_lake_arrays(path, side=64)
    message = {
        "corrupt": "not a readable npz file",
        "truncated": "not a readable npz file",
        "missing-key": r"not the Omniglot Lake npz \(keys \['sample'\] missing",
        "wrong-shape": r"images have shape \(20, 64, 64\), expected \[N, 105, 105\]",
    }[case]
    with pytest.raises(DataError, match=rf"lake_105x105.npz: {message}.*github.com/brendenlake"):
        read_lake(path)
    with pytest.raises(DataError, match=rf"lake_105x105.npz: {message}"):  # so does preparing
        prepare(tmp_path, tmp_path / "prepared" / "omniglot28.npz", verify=False)
    assert no_leftovers(tmp_path / "prepared") == []
