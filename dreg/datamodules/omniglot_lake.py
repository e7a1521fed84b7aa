"""A 28x28 Omniglot derived from Lake et al.'s original 105x105 drawings, computed once and cached.

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

The derived counts are cached as ``uint16`` under a name keyed by the source's sha256 and
:data:`METHOD_VERSION`, written atomically (temporary file + rename).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dreg.datamodules.download import DATA_DIR_HINT, DataError, file_digest

log = logging.getLogger(__name__)

LAKE_FILE = Path("omniglot-lake") / "omniglot_lake_105x105.npz"
LAKE_SHA256 = "a4e84fb24d92fa2feb96d67eaf03dbd77a0a539268c107809b85d93e8d239a75"
LAKE_URL = "https://github.com/brendenlake/omniglot"
SOURCE_SIZE, TARGET_SIZE = 105, 28
LEVELS = SOURCE_SIZE**2  # grey levels are counts out of 105^2 = 11,025 (fits uint16)
NUM_TRAIN_DRAWINGS = 15  # per character: drawings 1..15 train, 16..20 test
# Bump when anything that changes the derived arrays changes; it is part of the cache key.
METHOD_VERSION = "lake28-area-v1"
_KEYS = ("images", "char_id", "sample", "alphabet")


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
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in _KEYS if k not in archive.files]
            if missing:
                raise DataError(
                    f"{path}: not the Omniglot Lake npz (keys {missing} missing, found "
                    f"{archive.files}); {fix}"
                )
            arrays = {k: archive[k] for k in _KEYS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(
            f"{path}: not a readable npz file, corrupt or truncated ({err}); {fix}"
        ) from err
    images = arrays["images"]
    if images.ndim != 3 or images.shape[1:] != (SOURCE_SIZE, SOURCE_SIZE):
        raise DataError(f"{path}: images have shape {images.shape}, expected [N, 105, 105]; {fix}")
    if any(arrays[k].shape != images.shape[:1] for k in _KEYS[1:]):
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


def cache_name(source_sha256: str) -> str:
    key = hashlib.sha256(f"{source_sha256}:{METHOD_VERSION}".encode()).hexdigest()[:16]
    return f"omniglot_lake28_{key}.npz"


def default_cache_dirs(data_dir: Path, cache_dir: str | Path | None) -> list[Path]:
    """Where the cache is looked for and written, in order: the configured folder, else beside
    the source; then the user cache (``$XDG_CACHE_HOME/dreg`` or ``~/.cache/dreg``); then the
    temporary folder. A read-only data directory (as in CI) falls through to the next."""
    first = Path(cache_dir) if cache_dir is not None else data_dir / LAKE_FILE.parent
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dreg"
    return [first, user, Path(tempfile.gettempdir()) / "dreg-cache"]


def may_write(folder: Path) -> bool:
    """Whether ``folder`` (or its nearest existing parent) is writable *and marked writable*.

    The mode bits are checked as well as :func:`os.access` because root may write anywhere: a
    data directory marked read-only (a shared copy, as in CI) must not get a cache either way.
    """
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    return os.access(existing, os.W_OK) and bool(existing.stat().st_mode & 0o222)


def _load_cache(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as cached:
            if str(cached["method"]) != METHOD_VERSION:
                return None
            return cached["train"], cached["test"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        log.warning("ignoring unreadable Omniglot cache %s (%s); recomputing it", path, err)
        return None


def _write_cache(folder: Path, name: str, train: np.ndarray, test: np.ndarray) -> Path:
    """Write atomically: a temporary file in ``folder`` renamed into place when complete."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, train=train, test=test, method=np.array(METHOD_VERSION))
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a data file is not
        os.replace(tmp, folder / name)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return folder / name


def load_lake28(
    path: Path, cache_dirs: Sequence[Path], verify: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` float32 ``[N, 784]`` grey levels in [0, 1], from the cache if present.

    :param verify: require the published sha256 of the source file.
    :raises DataError: missing, corrupt or wrong-checksum source file.
    """
    if not path.exists():
        raise DataError(f"{path} not found; {DATA_DIR_HINT} (it must contain {LAKE_FILE})")
    sha = file_digest(path, "sha256")
    if verify and sha != LAKE_SHA256:
        raise DataError(
            f"{path}: sha256 {sha} does not match the expected {LAKE_SHA256} (corrupt, "
            f"truncated or a different build); replace it, or set dataset.verify=false to use "
            f"this build anyway"
        )
    name = cache_name(sha)
    for folder in cache_dirs:
        if (folder / name).exists() and (cached := _load_cache(folder / name)) is not None:
            train, test = cached
            break
    else:
        log.info("deriving 28x28 Omniglot from %s (once; cached)", path)
        train, test = derive(read_lake(path))
        for folder in cache_dirs:
            if not may_write(folder):
                log.info("not caching Omniglot in %s: read-only", folder)
                continue
            try:
                log.info("cached derived Omniglot at %s", _write_cache(folder, name, train, test))
                break
            except OSError as err:  # read-only data dir, say: try the next place
                log.info("cannot cache Omniglot in %s (%s)", folder, err)
    return train.astype(np.float32) / LEVELS, test.astype(np.float32) / LEVELS
