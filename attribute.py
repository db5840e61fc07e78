"""Projected-gradient features, then attribution scores for every query against every training image.

python attribute.py                 # DAS on the default model's validation and generated queries
python attribute.py method=dtrak    # any method in conf/method/
"""

import hydra
from omegaconf import DictConfig

from das_lightning import cli
from das_lightning.attribution.pipeline import attribute


@hydra.main(version_base="1.3", config_path="conf", config_name="attribute")
@cli.user_errors_exit
def main(cfg: DictConfig) -> None:
    method = cli.method_settings(cfg)
    paths = cli.run_paths(cfg)
    inputs = cli.attribution_inputs(cfg, paths, method)
    logger = cli.make_logger(cfg, paths.scores_dir, name=f"attribute/{method.name}")
    try:
        result = attribute(inputs, method, cli.collection_device(cfg), logger)
    finally:
        cli.close_logger(logger)
    print(f"method {result.method}: lambda for pictures {result.picture_lambda:g}")
    for query_set, folder in result.folders.items():
        print(f"  {query_set}: {folder}/scores.npy, topk.json, grid.png")


if __name__ == "__main__":
    main()
