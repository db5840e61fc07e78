"""Where a run's processes compute and which of them writes shared artifacts: one rule for the device, one
builder for every Lightning Trainer, one test for global rank zero."""

from __future__ import annotations

import os
from typing import Any

import lightning
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only


def is_global_zero() -> bool:
    """True in the one process that writes files every rank would otherwise write (and in single-process runs)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return getattr(rank_zero_only, "rank", 0) == 0


def process_device(accelerator: str) -> torch.device:
    """The one rule for where this process computes outside a Trainer (projectors, DAS residuals, replays,
    sampling, VAE encoding): its rank's GPU when the run asks for GPUs (``gpu``, ``cuda`` or ``auto``) and CUDA is
    there, else the CPU."""
    if accelerator in {"gpu", "cuda", "auto"} and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def build_trainer(placement: Any, **options: Any) -> lightning.Trainer:
    """Every Lightning Trainer of the project: the run's placement (``accelerator``, ``devices``, ``strategy``,
    ``num_nodes``, ``enable_progress_bar`` of a TrainerSettings or CollectionDevice) plus the stage's own options;
    no logger, checkpointing or model summary unless the stage asks."""
    settings = {
        "accelerator": placement.accelerator,
        "devices": placement.devices,
        "strategy": placement.strategy,
        "num_nodes": placement.num_nodes,
        "enable_progress_bar": placement.enable_progress_bar,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
    }
    return lightning.Trainer(**{**settings, **options})
