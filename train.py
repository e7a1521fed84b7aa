"""Train a VAE with a chosen gradient estimator: ``python train.py estimator=dreg_iwae``."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # Imported here so that `--help` and config errors come back fast.
    from dreg.config import ConfigError
    from dreg.run import main as run

    try:
        return run(cfg)
    except ConfigError as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # recorded as this job's failure; the sweep goes on
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
