"""Projected-gradient features, then attribution scores for every query against every training image.

python attribute.py                 # DAS on the default model's validation and generated queries
python attribute.py method=dtrak    # any method in conf/method/
"""

import hydra
from omegaconf import DictConfig

from das_lightning import cli


@hydra.main(version_base="1.3", config_path="conf", config_name="attribute")
@cli.user_errors_exit
def main(cfg: DictConfig) -> None:
    cli.run_attribute(cfg)


if __name__ == "__main__":
    main()
