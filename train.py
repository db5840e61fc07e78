"""Train a diffusion model on the full training set or on an LDS subset.

python train.py                                   # fashion2, tiny UNet, full set
python train.py -m subset=lds subset.index=0,1,2  # LDS subset models
"""

import hydra
from omegaconf import DictConfig

from das_lightning import cli


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@cli.user_errors_exit
def main(cfg: DictConfig) -> None:
    cli.run_train(cfg)


if __name__ == "__main__":
    main()
