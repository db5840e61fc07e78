"""Linear Datamodeling Score of attribution methods against models retrained on subsets, or the counterfactual check.

python evaluate_lds.py methods=[das,dtrak,trak,pixel]
python evaluate_lds.py mode=counterfactual counterfactual.method=das
"""

import hydra
from omegaconf import DictConfig

from das_lightning import cli


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate_lds")
@cli.user_errors_exit
def main(cfg: DictConfig) -> None:
    modes = {"lds": cli.run_lds, "counterfactual": cli.run_counterfactual}
    if cfg.mode not in modes:
        raise ValueError(f"mode must be one of {sorted(modes)}, not {cfg.mode!r}")
    modes[cfg.mode](cfg)


if __name__ == "__main__":
    main()
