"""Experiment loggers: W&B offline by default (no prompt, no network; `wandb sync` later), CSV, or none."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from das_lightning.errors import ConfigError


@dataclass
class LoggerSettings:
    kind: str = "wandb"  # wandb | csv | none
    mode: str = "offline"  # wandb: offline | online | disabled
    project: str = "das-lightning"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


JOB_TYPES = ("train", "subset", "attribute", "evaluate")


def build_logger(
    settings: LoggerSettings,
    save_dir: Path,
    name: str,
    config: dict[str, Any],
    group: str | None = None,
    job_type: str | None = None,
) -> Logger | None:
    """A Lightning logger writing under ``save_dir`` that has logged the resolved ``config``.

    W&B runs of one experiment share ``group`` (``<dataset>/<model>``) and say what they are with ``job_type``
    (train, subset, attribute, evaluate), so a sweep's 64 subset runs fold into one group beside the methods."""
    if job_type is not None and job_type not in JOB_TYPES:
        raise ConfigError(f"job_type must be one of {JOB_TYPES}, not {job_type!r}")
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    if settings.kind == "none":
        return None
    if settings.kind == "csv":
        logger = CSVLogger(save_dir=str(save_dir), name="csv", version="")
        logger.log_hyperparams(config)
        return logger
    if settings.kind == "wandb":
        if settings.mode not in {"offline", "online", "disabled"}:
            raise ConfigError(f"logger.mode must be offline, online or disabled, not {settings.mode!r}")
        # offline never prompts and never touches the network; runs land in <save_dir>/wandb
        os.environ.setdefault("WANDB_SILENT", "true")
        logger = WandbLogger(
            project=settings.project,
            entity=settings.entity,
            name=name,
            save_dir=str(save_dir),
            mode=settings.mode,
            tags=list(settings.tags),
            config=config,
            group=group,
            job_type=job_type,
        )
        # Lightning passes wandb.init an "anonymous" key that wandb no longer reads and warns about on every run
        init_arguments = getattr(logger, "_wandb_init", None)
        if isinstance(init_arguments, dict):
            init_arguments.pop("anonymous", None)
        return logger
    raise ConfigError(f"unknown logger kind {settings.kind!r}; choose wandb, csv or none")


def finish_logger(logger: Logger | None) -> None:
    """Close a W&B run so that one failed job in a sweep does not poison the next."""
    if isinstance(logger, WandbLogger):
        import wandb

        if wandb.run is not None:
            wandb.finish()
