"""Our output is ours: other libraries' tips and warnings that say nothing about this run are silenced here, once,
by the entry points (never by the library code a notebook imports). DAS_VERBOSE=1 keeps them all."""

from __future__ import annotations

import logging
import os
import warnings

# warnings we know and that a user can do nothing about (message regexes, as warnings.filterwarnings takes them)
SILENCED_WARNINGS = (
    r".*LeafSpec.* is deprecated",  # lightning's pytree helper on a newer torch
    r"predict returned None",  # our predict steps write rows to stores and return nothing, on purpose
    r"The number of training batches .* is smaller than the logging interval",  # tiny runs log less often
    r".*does not have many workers which may be a bottleneck",  # in-memory tensors need no loader workers
)


class _DropTips(logging.Filter):
    """Lightning's advertisements (the litlogger tip) and its accelerator inventory ("GPU available: False, used:
    False", once per Trainer, several per stage) carry nothing the run's own config does not say."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "Tip:" not in message and " available: " not in message


def quiet_other_libraries() -> None:
    """Silence the known noise of Lightning, torch and W&B (idempotent)."""
    if os.environ.get("DAS_VERBOSE"):
        return
    for pattern in SILENCED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    os.environ.setdefault("WANDB_SILENT", "true")
