"""Class-stratified subsets: the LDS training subsets (METHOD.md §3) and fixed-size dataset subsets
(CIFAR-2's 5000 training images), with their index lists saved as small JSON files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from das_lightning.errors import ConfigError
from das_lightning.manifest import atomic_write_text, read_json

SUBSET_BASE_SEED = 42


def class_quotas(labels: np.ndarray, size: int) -> dict[int, int]:
    """How many samples each class contributes to a stratified draw of ``size``.

    Each class gets its proportional share ``size * n_c / N`` rounded down, and the samples still missing go
    to the classes with the largest remainders (ties to the lower label), so the total is exactly ``size``
    and no class is off its proportional share by a whole sample.
    """
    classes, counts = np.unique(labels, return_counts=True)
    total = int(counts.sum())
    if not 0 <= size <= total:
        raise ConfigError(f"cannot draw {size} samples from {total}")
    exact = counts * size / total
    quotas = np.floor(exact).astype(np.int64)
    missing = size - int(quotas.sum())
    # stable sort on the negated remainder: largest remainder first, lower label first among equals
    for position in np.argsort(-(exact - quotas), kind="stable")[:missing]:
        quotas[position] += 1
    return {int(label): int(quota) for label, quota in zip(classes, quotas, strict=True)}


def stratified_sample(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted int64 indices of a class-stratified random sample of ``size`` from ``labels``."""
    labels = np.asarray(labels)
    chosen = [
        rng.choice(np.flatnonzero(labels == label), size=quota, replace=False)
        for label, quota in class_quotas(labels, size).items()
    ]
    return np.sort(np.concatenate(chosen).astype(np.int64)) if chosen else np.empty(0, dtype=np.int64)


def lds_subset_indices(labels: np.ndarray, alpha: float, index: int) -> np.ndarray:
    """Training indices of LDS subset ``index``: round(alpha * N) of them, stratified by class.

    Drawn with ``np.random.default_rng(42 + index)`` (METHOD.md §3), so subset k is the same on every machine.
    """
    if not 0.0 < alpha <= 1.0:
        raise ConfigError(f"LDS subset fraction alpha must be in (0, 1], got {alpha}")
    if int(index) != index or index < 0:
        raise ConfigError(f"LDS subset index must be a non-negative integer, got {index}")
    size = round(alpha * len(labels))
    return stratified_sample(labels, size, np.random.default_rng(SUBSET_BASE_SEED + int(index)))


def save_index_list(
    path: str | Path,
    indices: np.ndarray,
    *,
    alpha: float | None = None,
    index: int | None = None,
    num_total: int | None = None,
) -> None:
    """Write a subset's indices as small readable JSON, with what made it (alpha, subset index, dataset size N)."""
    record = {
        "alpha": None if alpha is None else float(alpha),
        "index": None if index is None else int(index),
        "N": None if num_total is None else int(num_total),
        "size": len(indices),
        "indices": [int(i) for i in indices],
    }
    atomic_write_text(Path(path), json.dumps(record))


def load_index_record(path: str | Path) -> dict[str, Any]:
    """The whole record written by :func:`save_index_list` (alpha, index, N, size, indices)."""
    record = read_json(Path(path), "rerun `python train.py` with the same subset settings to rewrite it")
    if len(record["indices"]) != record["size"]:
        raise ConfigError(f"{path}: holds {len(record['indices'])} indices but says size {record['size']}")
    return record


def load_index_list(path: str | Path) -> np.ndarray:
    """The int64 indices of an index list written by :func:`save_index_list`."""
    return np.asarray(load_index_record(path)["indices"], dtype=np.int64)
