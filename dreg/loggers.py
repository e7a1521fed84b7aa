"""Logger factories that need more than a ``_target_``: W&B that never prompts."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from pytorch_lightning.loggers import WandbLogger


def wandb_has_credentials() -> bool:
    """True when an API key is in the environment or in ~/.netrc (``wandb login``)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(save_dir: str, mode: str = "auto", **kwargs) -> WandbLogger:
    """A :class:`WandbLogger` that runs offline, with no prompt, when there are no credentials.

    :param mode: ``online``, ``offline`` or ``auto`` (online only with credentials). Offline
        runs are saved under ``save_dir/wandb`` and can be uploaded later with ``wandb sync``.
    """
    if mode not in ("auto", "online", "offline"):
        raise ValueError(f"logger.mode must be auto, online or offline, got {mode!r}")
    if mode == "auto":
        mode = "online" if wandb_has_credentials() else "offline"
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(save_dir=save_dir, offline=mode == "offline", **kwargs)


def continue_loggers(loggers: list, step: int) -> None:
    """Make each logger continue its run from ``step`` (a resumed checkpoint's global step)."""
    # Filled in by the loggers work (CSV history kept, W&B run id reused, TensorBoard purge).
    return None
