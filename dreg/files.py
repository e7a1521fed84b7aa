"""Files that are never half written: every file dreg writes itself goes through here.

A reader (a sweep summary, a resumed run, a report) must see either the old content or the
new one, never a torn mix, whatever kills the writer. :func:`atomic_write` writes to a hidden
temporary file in the same folder (same filesystem, so the final rename is atomic) and renames
it over the target only when the block finishes without an exception.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from dreg.errors import StorageError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; the renamed file gets the permissions a plain open() would give.
FILE_MODE = 0o666 & ~_umask()


@contextmanager
def atomic_write(
    path: str | Path, mode: str = "w", durable: bool = False, **open_kwargs: Any
) -> Iterator[IO]:
    """Open a temporary file for writing; on success rename it to ``path``.

    :param mode: ``"w"`` (text) or ``"wb"`` (binary); ``open_kwargs`` go to :func:`open`
        (e.g. ``newline=""`` for csv).
    :param durable: flush the data to the disk before the rename (``fsync``), so that a crash
        of the machine cannot leave ``path`` renamed but empty. For files a run restarts from
        (checkpoints); a write error, e.g. a full disk, then surfaces here, before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_json(path: str | Path, content: dict[str, Any]) -> None:
    """Write ``content`` as indented JSON, atomically."""
    with atomic_write(path) as f:
        f.write(json.dumps(content, indent=2) + "\n")


# Failures of the filesystem, not of dreg: the disk or quota is full, it is read-only or broken.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def storage_error(err: OSError, path: str | Path) -> StorageError | None:
    """``err`` as a one-line :class:`StorageError` naming where it happened and the way out, or
    ``None`` when it is not a filesystem failure (a bug, a missing folder...)."""
    if err.errno not in STORAGE_ERRNOS:
        return None
    path = Path(path)
    folder = path.parent if path.suffix else path
    return StorageError(
        f"cannot write {path}: {err.strerror or err}; the files written before are intact. "
        f"Free space in {folder} (or fix its filesystem), then continue with resume=true"
    )
