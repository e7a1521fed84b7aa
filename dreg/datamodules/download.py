"""Checksummed, atomic downloads and the data errors every reader raises.

A download goes to a temporary file beside the target and is renamed into place only after
its checksum matches, so an interrupted or corrupted transfer never leaves a file that looks
valid. Readers raise :class:`DataError`, whose one-line message names the file, what is wrong
and how to fix it.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from dreg.errors import DataError  # re-exported: every reader raises it

DATA_DIR_HINT = "set DREG_DATA_DIR (or paths.data_dir=...) to the folder that holds it"


GIT_BLOB_SHA1 = "git-blob-sha1"


def file_digest(path: Path, algorithm: str = "md5") -> str:
    """Hex digest of a file; ``algorithm`` is a :mod:`hashlib` name or ``"git-blob-sha1"``.

    A git blob id is the sha1 of ``b"blob <size>\\0"`` followed by the bytes: it lets a file be
    checked against the id a repository lists for it (``git ls-tree``) without any other hash.
    """
    if algorithm == GIT_BLOB_SHA1:
        digest = hashlib.sha1()
        digest.update(f"blob {Path(path).stat().st_size}\0".encode())
    else:
        digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checksum(path: Path, expected: str, algorithm: str = "md5", source: str = "") -> None:
    """Raise :class:`DataError` if ``path``'s digest is not ``expected``."""
    actual = file_digest(path, algorithm)
    if actual != expected:
        raise DataError(
            f"{path}: {algorithm} checksum {actual} does not match the expected {expected} "
            f"(corrupt or truncated file); delete it and download it again{source}"
        )


def download(
    urls: Sequence[str], target: Path, checksum: str, algorithm: str = "md5", timeout: float = 60
) -> Path:
    """Fetch the first URL that works into ``target``, atomically and checksum-verified.

    :raises DataError: when every URL fails (no network, say) or none gives the right bytes.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in urls:
        fd, tmp_name = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".part"
        )
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                while block := resp.read(1 << 20):
                    out.write(block)
            verify_checksum(tmp, checksum, algorithm, source=f" from {url}")
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a data file is not
            os.replace(tmp, target)  # atomic on POSIX: the target is either absent or complete
            return target
        except (OSError, ValueError, http.client.HTTPException, DataError) as err:
            # OSError: no network, HTTP errors; HTTPException: a connection cut mid-transfer
            # (IncompleteRead); ValueError: a malformed URL.
            failures.append(f"{url}: {err!r}" if not str(err) else f"{url}: {err}")
        finally:
            tmp.unlink(missing_ok=True)
    raise DataError(
        f"could not download {target.name} to {target} ({'; '.join(failures)}); "
        f"put the file there by hand, or {DATA_DIR_HINT}"
    )
