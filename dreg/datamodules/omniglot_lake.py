"""A 28x28 Omniglot derived from Lake et al.'s original 105x105 drawings, prepared once into a file.

The IWAE/DReG papers use ``chardata.mat`` (Burda et al. 2016), whose downsampling method is not
documented. When only the original images are at hand (Lake, Salakhutdinov & Tenenbaum 2015,
github.com/brendenlake/omniglot, repacked as ``omniglot_lake_105x105.npz``), this module derives
a dataset of the same shape and split rule, deterministically:

1. invert, so ink = 1 and background = 0;
2. downsample 105 -> 28 by exact area averaging: output pixel i covers the input interval
   [3.75 i, 3.75 (i + 1)], and takes the overlap-weighted mean of the input pixels under it.
   With the integer overlap matrix ``L [28, 105]`` (in units of 1/28 input pixel, rows summing
   to 105) an image is ``L @ img @ L.T / 105**2``: truly anti-aliased, no interpolation
   library involved, and exact, since every grey level is a count out of 11,025;
3. split per character: drawings (file suffixes) 1-15 train, 16-20 test, so every character,
   and hence every alphabet, is in both splits (24,345 train / 8,115 test images).

It is *not* byte-identical to ``chardata.mat`` (different resampling; 8,115 test images rather
than 8,070, since chardata lacks a 20th Glagolitic drawing; a different choice of the 5 test
drawings): never call it chardata. See ``docs/datasets.md``.

The derivation runs once, as a step of its own: :func:`prepare` (the command
``python -m dreg.datamodules.prepare_omniglot``, or the DataModule's ``prepare_data``) writes
one compressed npz, by default ``<data_dir>/omniglot-lake/omniglot28.npz``, atomically
(:func:`dreg.files.atomic_write`):

* ``train`` ``uint16 [24345, 784]`` and ``test`` ``uint16 [8115, 784]``: per pixel, the ink
  count out of 105^2 = 11,025 (exact; the grey level is count / 11,025);
* ``source_sha256``: the sha256 of the Lake file they were derived from;
* ``method``: :data:`METHOD_VERSION`.

A prepared file that cannot be read, or whose source sha256 or method differs from the current
ones, is stale and is derived again; a current one is left alone. Training reads only the
prepared file (:func:`load_prepared`).
"""

from __future__ import annotations

import logging
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dreg.datamodules.download import DATA_DIR_HINT, DataError, file_digest
from dreg.files import atomic_write

log = logging.getLogger(__name__)

LAKE_FILE = Path("omniglot-lake") / "omniglot_lake_105x105.npz"
LAKE_SHA256 = "a4e84fb24d92fa2feb96d67eaf03dbd77a0a539268c107809b85d93e8d239a75"
LAKE_URL = "https://github.com/brendenlake/omniglot"
SOURCE_SIZE, TARGET_SIZE = 105, 28
LEVELS = SOURCE_SIZE**2  # grey levels are counts out of 105^2 = 11,025 (fits uint16)
NUM_TRAIN_DRAWINGS = 15  # per character: drawings 1..15 train, 16..20 test
# Bump when anything that changes the derived arrays changes: a prepared file made by another
# version is stale and is derived again.
METHOD_VERSION = "lake28-area-v1"
LAKE_KEYS = ("images", "char_id", "sample", "alphabet")
PREPARED_FILE = Path("omniglot-lake") / "omniglot28.npz"
PREPARED_KEYS = ("train", "test", "source_sha256", "method")
COMMAND = "python -m dreg.datamodules.prepare_omniglot"  # named in every error about the file


def area_overlaps(source: int = SOURCE_SIZE, target: int = TARGET_SIZE) -> np.ndarray:
    """Integer overlap lengths ``[target, source]`` of output and input pixel intervals.

    Measured in units of 1/target input pixel: output pixel i spans [source i, source (i+1)),
    input pixel j spans [target j, target (j+1)); every row sums to ``source``.
    """
    out_lo = source * np.arange(target)[:, None]  # [T, 1]
    in_lo = target * np.arange(source)[None, :]  # [1, S]
    overlap = np.minimum(out_lo + source, in_lo + target) - np.maximum(out_lo, in_lo)
    return np.clip(overlap, 0, None)  # [T, S]


def downsample_counts(ink: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Binary ink images ``[N, 105, 105]`` -> ``uint16 [N, 784]`` ink counts out of 11,025."""
    overlaps = area_overlaps().astype(np.float32)  # [28, 105]; float32 sums of ints < 2^24 exact
    out = np.empty((ink.shape[0], TARGET_SIZE * TARGET_SIZE), dtype=np.uint16)
    for start in range(0, ink.shape[0], chunk):
        block = ink[start : start + chunk].astype(np.float32)  # [n, 105, 105]
        counts = overlaps @ block @ overlaps.T  # [n, 28, 28]
        out[start : start + chunk] = np.rint(counts).reshape(len(block), -1)
    return out


def read_lake(path: Path) -> dict[str, np.ndarray]:
    """Read the Lake npz, checking its keys and shapes.

    :raises DataError: naming the file when it is unreadable or not the expected layout.
    """
    fix = f"rebuild it from {LAKE_URL} (see docs/datasets.md) or {DATA_DIR_HINT}"
    arrays = read_npz(path, LAKE_KEYS, "the Omniglot Lake npz", "npz file", fix)
    images = arrays["images"]
    if images.ndim != 3 or images.shape[1:] != (SOURCE_SIZE, SOURCE_SIZE):
        raise DataError(f"{path}: images have shape {images.shape}, expected [N, 105, 105]; {fix}")
    if any(arrays[k].shape != images.shape[:1] for k in LAKE_KEYS[1:]):
        raise DataError(f"{path}: label arrays do not match the {len(images)} images; {fix}")
    return arrays


def derive(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` uint16 ink counts ``[N, 784]`` from the Lake arrays (steps 1-3 above)."""
    order = np.lexsort((arrays["sample"], arrays["char_id"]))  # by character, then drawing
    sample = arrays["sample"][order]
    ink = 1 - arrays["images"][order].astype(np.uint8)  # white = 1 in the source
    counts = downsample_counts(ink)
    is_train = sample <= NUM_TRAIN_DRAWINGS
    return counts[is_train], counts[~is_train]


# -- the prepared file ----------------------------------------------------------------------
def prepared_path(data_dir: str | Path, output: str | Path | None = None) -> Path:
    """Where the prepared file goes: ``output`` if given, else beside the Lake source."""
    return Path(output) if output is not None else Path(data_dir) / PREPARED_FILE


def command_line(data_dir: str | Path, output: str | Path | None = None) -> str:
    """The command that prepares ``output`` from ``data_dir``, for error messages."""
    if output is None or Path(output) == prepared_path(data_dir):
        return f"{COMMAND} --data-dir {data_dir}"
    return f"{COMMAND} --data-dir {data_dir} --output {output}"


@dataclass(frozen=True)
class Prepared:
    """A prepared file's contents: ``uint16`` ink counts ``[N, 784]`` and their provenance."""

    train: np.ndarray
    test: np.ndarray
    source_sha256: str
    method: str

    def staleness(self, source_sha256: str | None = None) -> str | None:
        """Why these arrays are not what this code derives from the source, or ``None``.

        :param source_sha256: the current source's sha256; ``None`` skips that comparison.
        """
        if self.method != METHOD_VERSION:
            return f"made by method {self.method}, this code derives {METHOD_VERSION}"
        if source_sha256 is not None and self.source_sha256 != source_sha256:
            return f"derived from a source with sha256 {self.source_sha256}, not {source_sha256}"
        return None

    def grey_levels(self) -> tuple[np.ndarray, np.ndarray]:
        """``(train, test)`` float32 ``[N, 784]`` in [0, 1]."""
        return self.train.astype(np.float32) / LEVELS, self.test.astype(np.float32) / LEVELS


def read_prepared(path: Path, fix: str) -> Prepared:
    """Read and check a prepared file.

    :param fix: what to do about a bad file, appended to the error (the command to rerun).
    :raises DataError: naming the file when it is unreadable or not a prepared Omniglot file.
    """
    unreadable = f"{path}: not a readable prepared Omniglot file, corrupt or truncated"
    if not zipfile.is_zipfile(path):  # else numpy's error blames pickled data
        raise DataError(f"{unreadable} (not an npz archive); {fix}")
    arrays = read_npz(
        path, PREPARED_KEYS, "a prepared Omniglot file", "prepared Omniglot file", fix
    )
    for split in ("train", "test"):
        counts = arrays[split]
        if counts.dtype != np.uint16 or counts.ndim != 2 or counts.shape[1] != TARGET_SIZE**2:
            raise DataError(
                f"{path}: '{split}' is {counts.dtype} {counts.shape}, expected uint16 [N, 784]; "
                f"{fix}"
            )
        if counts.size and counts.max() > LEVELS:
            raise DataError(f"{path}: '{split}' has counts above {LEVELS}; {fix}")
    return Prepared(
        arrays["train"], arrays["test"], str(arrays["source_sha256"]), str(arrays["method"])
    )


def write_prepared(path: Path, prepared: Prepared, data_dir: Path) -> None:
    """Write ``prepared`` atomically; a folder that cannot be written gives one DataError."""
    try:
        with atomic_write(path, "wb") as f:
            np.savez_compressed(
                f,
                train=prepared.train,
                test=prepared.test,
                source_sha256=np.array(prepared.source_sha256),
                method=np.array(prepared.method),
            )
    except OSError as err:
        writable = "/writable/omniglot28.npz"
        raise DataError(
            f"cannot write the prepared Omniglot file {path} ({err.strerror or err}); prepare it "
            f"somewhere writable with `{COMMAND} --data-dir {data_dir} --output {writable}` "
            f"and train with dataset.prepared_path={writable}"
        ) from err


def prepare(data_dir: str | Path, output: str | Path | None = None, verify: bool = True) -> bool:
    """Derive the 28x28 set from ``<data_dir>/omniglot-lake`` into ``output`` unless current.

    :param output: the prepared file (default ``<data_dir>/omniglot-lake/omniglot28.npz``).
    :param verify: require the published sha256 of the Lake source.
    :returns: whether the file was written (``False``: it was already current).
    :raises DataError: the source is missing, corrupt or has the wrong checksum, or the
        output cannot be written.
    """
    data_dir = Path(data_dir)
    output = prepared_path(data_dir, output)
    source = data_dir / LAKE_FILE
    existing = None
    if output.exists():
        try:
            existing = read_prepared(output, fix="deriving it again")
        except DataError as err:
            log.warning("%s", err)
    if not source.exists():
        if existing is not None and existing.staleness() is None:
            return False  # the prepared file alone is enough to train: nothing to compare it to
        raise DataError(f"{source} not found; {DATA_DIR_HINT} (it must contain {LAKE_FILE})")
    sha = file_digest(source, "sha256")
    if verify and sha != LAKE_SHA256:
        raise DataError(
            f"{source}: sha256 {sha} does not match the expected {LAKE_SHA256} (corrupt, "
            f"truncated or a different build); replace it, or set dataset.verify=false "
            f"(--no-verify) to use this build anyway"
        )
    if existing is not None:
        reason = existing.staleness(sha)
        if reason is None:
            return False
        log.warning("%s is stale (%s); deriving it again", output, reason)
    log.info("deriving 28x28 Omniglot from %s into %s", source, output)
    train, test = derive(read_lake(source))
    write_prepared(output, Prepared(train, test, sha, METHOD_VERSION), data_dir)
    return True


def load_prepared(path: Path, data_dir: Path, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` float32 ``[N, 784]`` grey levels from the prepared file alone.

    :param data_dir: where the Lake source lives, named in the command to (re)run.
    :param verify: require that the file was derived from the published Lake source.
    :raises DataError: the file is missing, unreadable or stale, with the command that fixes it.
    """
    rerun = f"run `{command_line(data_dir, path)}` (prepare_data does this before training)"
    if not path.exists():
        raise DataError(f"{path} not found: the Omniglot data is not prepared; {rerun}")
    prepared = read_prepared(path, fix=f"delete it and {rerun}")
    if (reason := prepared.staleness()) is not None:
        raise DataError(f"{path} is stale ({reason}); {rerun}")
    if verify and prepared.source_sha256 != LAKE_SHA256:
        raise DataError(
            f"{path}: derived from a source with sha256 {prepared.source_sha256}, not the "
            f"published {LAKE_SHA256}; prepare it from the published file, or set "
            f"dataset.verify=false to use it anyway"
        )
    return prepared.grey_levels()


def read_npz(path: Path, keys: tuple[str, ...], what: str, kind: str, fix: str) -> dict:
    """The arrays ``keys`` of the npz at ``path``, each read in full (which also checks every
    member's zip CRC). One :class:`DataError` line for a file that is not ``what`` (a key
    missing) or not a readable ``kind`` (corrupt or truncated)."""
    try:
        # Our own handle: np.load(path) leaks it when a file starts like a zip but is not one.
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as archive:
            missing = [k for k in keys if k not in archive.files]
            if missing:
                raise DataError(
                    f"{path}: not {what} (keys {missing} missing, found {archive.files}); {fix}"
                )
            return {k: archive[k] for k in keys}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(
            f"{path}: not a readable {kind}, corrupt or truncated ({err}); {fix}"
        ) from err
