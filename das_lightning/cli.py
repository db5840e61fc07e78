"""Turning composed Hydra configs into the typed settings the package takes (the package never sees a DictConfig).

Entry points call these; each returns plain dataclasses or objects."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from das_lightning.data import DatasetNotFoundError, build_dataset
from das_lightning.loggers import LoggerSettings
from das_lightning.manifest import ManifestMismatchError
from das_lightning.models.ddpm import OptimizerSettings
from das_lightning.models.sampling import SamplerSettings
from das_lightning.paths import RunPaths
from das_lightning.training import GenerationSettings, SubsetSettings, TrainerSettings, TrainSettings

T = TypeVar("T")
log = logging.getLogger("das_lightning")

# errors that are the user's to fix: one clear line, exit 2, no traceback
USER_ERRORS = (DatasetNotFoundError, ManifestMismatchError, FileNotFoundError, ValueError)


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def user_errors_exit(main: Callable[..., T]) -> Callable[..., T]:
    """Report configuration/data errors as one message and a non-zero exit instead of a traceback."""

    @wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def run_paths(cfg: DictConfig, tag: str | None = None, seed: int | None = None) -> RunPaths:
    return RunPaths(
        root=Path(cfg.paths.root),
        dataset=str(cfg.dataset.name),
        model=str(cfg.model.name),
        tag=str(cfg.subset.tag) if tag is None else tag,
        seed=int(cfg.seed) if seed is None else seed,
    )


def dataset_from_config(cfg: DictConfig, split: str):
    data = to_plain(cfg.dataset)
    return build_dataset(
        name=data["name"],
        split=split,
        root=data.get("root"),
        image_size=int(data["image_size"]),
        classes=data.get("classes"),
        num_train=data.get("num_train"),
        download=bool(data.get("download", False)),
    )


def subset_settings(cfg: DictConfig) -> SubsetSettings:
    subset = to_plain(cfg.subset)
    return SubsetSettings(
        kind=subset["kind"], index=subset.get("index"), alpha=float(subset.get("alpha", 1.0))
    )


def train_settings(cfg: DictConfig) -> TrainSettings:
    train = to_plain(cfg.train)
    optimizer = train.pop("optimizer")
    optimizer["betas"] = tuple(optimizer["betas"])
    return TrainSettings(**train, optimizer=OptimizerSettings(**optimizer))


def trainer_settings(cfg: DictConfig) -> TrainerSettings:
    return TrainerSettings(**to_plain(cfg.trainer))


def logger_settings(cfg: DictConfig) -> LoggerSettings:
    return LoggerSettings(**to_plain(cfg.logger))


def generation_settings(cfg: DictConfig, enabled: bool = True) -> GenerationSettings:
    generate = to_plain(cfg.generate)
    return GenerationSettings(
        num_images=int(generate["num_images"]) if enabled else 0,
        batch_size=int(generate["batch_size"]),
        sampler=SamplerSettings(**generate["sampler"]),
    )
