"""Scores without a kernel, and what every method's scores go through: raw similarities (pixels, CLIP, gradient
cosine), TracIn's sum over checkpoints, candidate screening by a cheap similarity, and the top-k lists.

Every scorer returns queries x train (float32 numpy); a boolean ``mask`` (queries x train) keeps only each query's
candidates, every other entry exactly 0."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from das_lightning.attribution.rows import (
    DEFAULT_BLOCK_SIZE,
    RowSliceable,
    RowView,
    check_mask,
    iter_row_blocks,
    mask_block,
    read_all,
    unit_rows,
)


def similarity_scores(
    query_features: RowSliceable,
    train_features: RowSliceable,
    *,
    cosine: bool,
    mask: Any = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dtype: type = np.float32,
) -> np.ndarray:
    """Queries x train inner products of the rows, or their cosines (0 where either vector is zero)."""
    queries = read_all(query_features)
    if cosine:
        queries = unit_rows(queries)
    num_train = len(train_features)
    check_mask(mask, int(queries.shape[0]), num_train)
    train_view = RowView(train_features, unit_rows) if cosine else train_features
    result = np.zeros((int(queries.shape[0]), num_train), dtype=dtype)
    for start, stop, block in iter_row_blocks(train_view, block_size):
        result[:, start:stop] = mask_block(queries @ block.T, mask, start, stop).numpy()
    return result


def dot_scores(query_features: RowSliceable, train_features: RowSliceable, **options: Any) -> np.ndarray:
    """Plain inner products q . x_i (raw pixels, CLIP embeddings); ``options``: mask, block_size."""
    return similarity_scores(query_features, train_features, cosine=False, **options)


def cosine_scores(query_features: RowSliceable, train_features: RowSliceable, **options: Any) -> np.ndarray:
    """Cosine similarity (0 where either vector is zero); also the gradient-cosine baseline on features."""
    return similarity_scores(query_features, train_features, cosine=True, **options)


def tracin_scores(
    checkpoints: Sequence[tuple[float, RowSliceable, RowSliceable]],
    *,
    mask: Any = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> np.ndarray:
    """TracIn: sum over checkpoints c of lr_c * Q_c Phi_c^T, from ``(lr_c, query_features_c, train_features_c)``."""
    if not checkpoints:
        raise ValueError("tracin_scores needs at least one checkpoint")
    total: np.ndarray | None = None
    for learning_rate, queries, train in checkpoints:
        # summed in float64, rounded to float32 once at the end
        products = similarity_scores(
            queries, train, cosine=False, mask=None, block_size=block_size, dtype=np.float64
        )
        contribution = float(learning_rate) * products
        total = contribution if total is None else total + contribution
    if total is None:
        raise ValueError("tracin_scores needs at least one checkpoint")
    check_mask(mask, total.shape[0], total.shape[1])
    if mask is not None:
        total = np.where(np.asarray(mask, dtype=bool), total, 0.0)
    return total.astype(np.float32)


def screen_candidates(cheap_scores: Any, m: int) -> np.ndarray:
    """Boolean M x N mask keeping each query's m highest cheap scores (ties broken by lower train index)."""
    scores = np.asarray(cheap_scores)
    num_train = scores.shape[1]
    mask = np.zeros(scores.shape, dtype=bool)
    if m >= num_train:
        mask[:] = True
        return mask
    top = np.argsort(-scores, axis=1, kind="stable")[:, :m]
    np.put_along_axis(mask, top, True, axis=1)
    return mask


def topk(scores: Any, k: int, mask: Any = None) -> dict[str, list[list[Any]]]:
    """Per query the k highest (proponents) and k lowest (opponents) train indices and scores, as JSON lists.

    With a ``mask`` only candidates are ranked. Ties go to the lower train index.
    """
    values = np.asarray(scores, dtype=np.float64)
    candidates = np.ones(values.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    result: dict[str, list[list[Any]]] = {
        "proponent_indices": [],
        "proponent_scores": [],
        "opponent_indices": [],
        "opponent_scores": [],
    }
    for row, keep in zip(values, candidates, strict=True):
        indices = np.flatnonzero(keep)
        kept = row[indices]
        highest = indices[np.argsort(-kept, kind="stable")[:k]]
        lowest = indices[np.argsort(kept, kind="stable")[:k]]
        result["proponent_indices"].append([int(i) for i in highest])
        result["proponent_scores"].append([float(row[i]) for i in highest])
        result["opponent_indices"].append([int(i) for i in lowest])
        result["opponent_scores"].append([float(row[i]) for i in lowest])
    return result
