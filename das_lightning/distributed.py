"""Which process of a multi-process (DDP) run writes shared artifacts."""

from __future__ import annotations

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only


def is_global_zero() -> bool:
    """True in the one process that writes files every rank would otherwise write (and in single-process runs)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return getattr(rank_zero_only, "rank", 0) == 0
