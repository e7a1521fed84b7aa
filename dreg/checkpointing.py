"""Checkpoints that are never torn, and a clear error when one is unreadable."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or not a checkpoint."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same folder, then ``os.replace``: a run killed while
    saving leaves the previous checkpoint intact, never a half-written one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return load_checkpoint(path, map_location)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load`` with one clear error for a missing or corrupt file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found; check ckpt_path (or resume=false)")
    try:
        # weights_only=False: Lightning checkpoints hold hyper-parameters and loop state.
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises many types for a damaged zip/pickle
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: {err}); delete "
            f"it and resume from another one in {path.parent}, or start afresh"
        ) from err
