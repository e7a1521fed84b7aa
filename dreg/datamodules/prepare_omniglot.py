"""The preparation step's command: derive the Lake 28x28 Omniglot once, into one array file.

Command::

    python -m dreg.datamodules.prepare_omniglot [--data-dir D] [--output PATH] [--no-verify]

It reads ``<D>/omniglot-lake/omniglot_lake_105x105.npz`` (``D``: ``--data-dir``, else
``$DREG_DATA_DIR``, else ``data``, as ``paths.data_dir``) and writes the prepared file, by
default ``<D>/omniglot-lake/omniglot28.npz`` (format: :mod:`dreg.datamodules.omniglot_lake`).
A current prepared file is left alone, so a second run is a no-op. Training with
``dataset=omniglot`` runs the same step in ``prepare_data``; run the command ahead of time, or
with ``--output`` (then train with ``dataset.prepared_path=<that file>``) when the data folder
is read-only.

The library lives in :mod:`~dreg.datamodules.omniglot_lake`, not here: the package imports the
DataModule, and a module run with ``-m`` must not be imported before it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from dreg.datamodules.download import DataError
from dreg.datamodules.omniglot_lake import (
    COMMAND,
    METHOD_VERSION,
    PREPARED_FILE,
    prepare,
    prepared_path,
)


def default_data_dir() -> Path:
    """``$DREG_DATA_DIR``, else ``data``: the default of ``paths.data_dir``."""
    return Path(os.environ.get("DREG_DATA_DIR") or "data")


def main(argv: list[str] | None = None) -> int:
    """The command line: prepare and print one line (exit 0), or print the DataError (exit 3)."""
    parser = argparse.ArgumentParser(
        prog=COMMAND, description="Derive 28x28 Omniglot from the Lake et al. drawings, once."
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help="folder holding omniglot-lake/omniglot_lake_105x105.npz "
        "(default: $DREG_DATA_DIR, else data)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"the prepared file (default: <data dir>/{PREPARED_FILE}); "
        "train with dataset.prepared_path=<it>",
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="accept a Lake file with another sha256"
    )
    args = parser.parse_args(argv)
    output = prepared_path(args.data_dir, args.output)
    start = time.perf_counter()
    try:
        wrote = prepare(args.data_dir, output, verify=not args.no_verify)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    if wrote:
        print(f"wrote {output} in {time.perf_counter() - start:.1f} s")
    else:
        print(f"{output} is up to date ({METHOD_VERSION}); nothing to do")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
