"""Train a VAE with a chosen gradient estimator: ``python train.py estimator=dreg_iwae``."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from dreg.run import main as run  # imported here so `--help` and config errors are fast

    return run(cfg)


if __name__ == "__main__":
    main()
