"""Train a VAE with a chosen gradient estimator: ``python train.py estimator=dreg_iwae``.

Expected errors (bad config, data, checkpoint, resume mismatch, non-finite values, a used run
folder, preemption) end with one line, ``error: ...``, and the exit code of
:mod:`dreg.errors`; ``DREG_TRACEBACK=1`` shows the full traceback instead.
"""

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # Imported here so that `--help` and config errors come back fast.
    from dreg.errors import PreemptedError, RunError
    from dreg.run import main as run

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        return run(cfg)
    except RunError as err:
        if multirun and isinstance(err, PreemptedError):
            # Stop the whole sweep (the machine is going away); resume=true continues it.
            from dreg.sweep import write_summary

            write_summary(Path(HydraConfig.get().sweep.dir))
            raise SystemExit(err.exit_code) from None
        if multirun or os.environ.get("DREG_TRACEBACK"):
            raise  # multirun: recorded as this job's failure; the sweep goes on
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
