"""Checksummed, atomic downloads and the data errors every reader raises.

A download is checked before anything is written, then written with
:func:`dreg.files.atomic_write`, so an interrupted or corrupted transfer never leaves a file
that looks valid. Readers raise :class:`DataError`, whose one-line message names the file, what
is wrong and how to fix it.
"""

from __future__ import annotations

import hashlib
import http.client
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from dreg.errors import DataError  # re-exported: every reader raises it
from dreg.files import atomic_write

DATA_DIR_HINT = "set DREG_DATA_DIR (or paths.data_dir=...) to the folder that holds it"


GIT_BLOB_SHA1 = "git-blob-sha1"


def new_digest(algorithm: str, size: int) -> hashlib._Hash:
    """A hashlib object for ``algorithm``, a :mod:`hashlib` name or ``"git-blob-sha1"``.

    A git blob id is the sha1 of ``b"blob <size>\\0"`` followed by the bytes: it lets a file be
    checked against the id a repository lists for it (``git ls-tree``) without any other hash.
    That header is why the size must be known before the first byte.
    """
    if algorithm == GIT_BLOB_SHA1:
        digest = hashlib.sha1()
        digest.update(f"blob {size}\0".encode())
        return digest
    return hashlib.new(algorithm)


def file_digest(path: Path, algorithm: str = "md5") -> str:
    """Hex digest of a file (see :func:`new_digest` for ``algorithm``)."""
    digest = new_digest(algorithm, Path(path).stat().st_size)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum_mismatch_message(path: Path, algorithm: str, actual: str, expected: str) -> str:
    return (
        f"{path}: {algorithm} checksum {actual} does not match the expected {expected} "
        f"(corrupt or truncated file)"
    )


def verify_checksum(path: Path, expected: str, algorithm: str = "md5", source: str = "") -> None:
    """Raise :class:`DataError` if ``path``'s digest is not ``expected``."""
    actual = file_digest(path, algorithm)
    if actual != expected:
        mismatch = checksum_mismatch_message(path, algorithm, actual, expected)
        raise DataError(f"{mismatch}; delete it and download it again{source}")


def download(
    urls: Sequence[str], target: Path, checksum: str, algorithm: str = "md5", timeout: float = 60
) -> Path:
    """Fetch the first URL that works into ``target``, atomically and checksum-verified.

    :raises DataError: when every URL fails (no network, say) or none gives the right bytes.
    """
    target = Path(target)
    failures = []
    for url in urls:
        try:
            # Held in memory (tens of MB at most) so the checksum is known before anything is
            # written: the git blob header needs the size first, and a wrong file never lands.
            with urllib.request.urlopen(url, timeout=timeout) as response:
                content = b"".join(iter(lambda: response.read(1 << 20), b""))
            digest = new_digest(algorithm, len(content))
            digest.update(content)
            if (actual := digest.hexdigest()) != checksum:
                mismatch = checksum_mismatch_message(target, algorithm, actual, checksum)
                raise DataError(f"{mismatch} from {url}")
            with atomic_write(target, "wb") as f:
                f.write(content)
            return target
        except (OSError, ValueError, http.client.HTTPException, DataError) as err:
            # OSError: no network, HTTP errors, an unwritable target; HTTPException: a
            # connection cut mid-transfer (IncompleteRead); ValueError: a malformed URL.
            failures.append(f"{url}: {err!r}" if not str(err) else f"{url}: {err}")
    raise DataError(
        f"could not download {target.name} to {target} ({'; '.join(failures)}); "
        f"put the file there by hand, or {DATA_DIR_HINT}"
    )
