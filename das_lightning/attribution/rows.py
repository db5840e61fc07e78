"""Row access to features (a memmap, an array, a tensor, a feature store): float64 row blocks, lazy row
transforms, and the candidate masks every scorer shares (see the shape contract of :mod:`.kernel_solver`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import torch

DEFAULT_BLOCK_SIZE = 1024


class RowSliceable(Protocol):
    """Features stored as rows: ``len()`` and row slices (a memmap, an array, a tensor, a feature store)."""

    def __len__(self) -> int: ...

    def __getitem__(self, rows: slice) -> Any: ...


def as_float64(rows: Any) -> torch.Tensor:
    """A float64 CPU tensor from a numpy array, memmap slice or tensor (copies: memmaps are read-only)."""
    if isinstance(rows, torch.Tensor):
        return rows.detach().to(device="cpu", dtype=torch.float64)
    return torch.from_numpy(np.array(rows, dtype=np.float64, copy=True))


def iter_row_blocks(features: RowSliceable, block_size: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, rows)`` with ``rows`` = ``features[start:stop]`` as float64, in order."""
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    total = len(features)
    for start in range(0, total, block_size):
        stop = min(start + block_size, total)
        yield start, stop, as_float64(features[start:stop])


def read_all(features: RowSliceable) -> torch.Tensor:
    """All rows as float64 (used for query features, which are few)."""
    return as_float64(features[0 : len(features)])


class RowView:
    """A lazy view of row features: every block read is ``transform``-ed (float64 tensors in and out)."""

    def __init__(self, features: RowSliceable, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.features = features
        self.transform = transform

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.transform(as_float64(self.features[rows]))


def unit_rows(block: torch.Tensor) -> torch.Tensor:
    """Every row divided by its L2 norm (zero rows stay zero)."""
    norms = block.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, block / norms.clamp_min(torch.finfo(torch.float64).tiny), block)


def normalized_rows(features: RowSliceable) -> RowSliceable:
    """A lazy view of ``features`` with every row scaled to unit L2 norm (for renormalized influence)."""
    return RowView(features, unit_rows)


def mask_block(scores: torch.Tensor, mask: Any, start: int, stop: int) -> torch.Tensor:
    if mask is None:
        return scores
    keep = torch.as_tensor(np.asarray(mask[:, start:stop], dtype=bool))
    return torch.where(keep, scores, torch.zeros((), dtype=scores.dtype))


def check_mask(mask: Any, num_queries: int, num_train: int) -> None:
    if mask is not None and tuple(mask.shape) != (num_queries, num_train):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}, expected (queries, train) = ({num_queries}, {num_train})"
        )
