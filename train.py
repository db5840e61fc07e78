"""Train a diffusion model on the full training set or on an LDS subset.

python train.py                                   # fashion2, tiny UNet, full set
python train.py -m subset=lds subset.index=0,1,2  # LDS subset models
"""

import hydra
from omegaconf import DictConfig

from das_lightning import cli
from das_lightning.training import train_model


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@cli.user_errors_exit
def main(cfg: DictConfig) -> None:
    subset = cli.subset_settings(cfg)
    subset.validate()  # refuse a bad subset before loading anything
    train_set = cli.dataset_from_config(cfg, split="train")
    paths = train_model(
        paths=cli.run_paths(cfg),
        unet_factory=lambda: hydra.utils.instantiate(cfg.model.unet),
        train_set=train_set,
        subset=subset,
        seed=int(cfg.seed),
        train=cli.train_settings(cfg),
        trainer_settings=cli.trainer_settings(cfg),
        logger_settings=cli.logger_settings(cfg),
        generation=cli.generation_settings(cfg, enabled=subset.kind == "full"),
        config=cli.to_plain(cfg),
        resume_from=cfg.resume_from,
    )
    print(f"model: {paths.unet_dir}")


if __name__ == "__main__":
    main()
