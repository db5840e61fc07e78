"""The Linear Datamodeling Score (LDS, METHOD.md §3): the metric, with its shape contract.

Lambda selection (held-out halves) is in :mod:`.lambda_selection`; the reported records, table and plot in
:mod:`.lds_report`; its intervals (the bootstrap over queries, subsets and seeds) in :mod:`.intervals`; ``lds.json``
is read and written by :mod:`das_lightning.selection` alone.

Shape contract (checked below, ValueError otherwise; comments mark where shapes change):

- ``scores``: queries x train, ``Q x N`` (tau(q, i), one row per query);
- ``masks``: subsets x train, ``M x N``, bool, ``masks[k, i]`` is True when training sample i is kept in subset k;
- ``losses``: subsets x queries, ``M x Q``, the ground-truth loss of the subset-k model on query q;
- predictions ``g = masks @ scores^T``: subsets x queries, ``M x Q``, g_k(q) = sum over kept i of tau(q, i).

LDS(q) = Spearman over subsets k of (g_k(q), -L_k(q)). Ties get average ranks. A query whose predictions or losses are
constant over the subsets has no rank correlation: it is NaN in :func:`lds_per_query`, excluded from every mean and
counted in the results. (torchmetrics' ``spearman_corrcoef`` ranks ties the same way and agrees to 1e-5, see
tests/test_lds.py, but adds eps=1e-6 to the denominator, so it returns 0 for a constant query, and it ranks column by
column in a Python loop; the bootstrap of :mod:`.intervals` needs neither.)

Units: the functions that *compute* (``lds_per_query``, ``lds_by_lambda``, the intervals) return fractions (a
Spearman coefficient in [-1, 1]). Everything that is *reported* (:class:`LDSRecord`, :class:`PairedDifference`, the
JSON, the markdown table and the plot) is in percent (x100), like the tables of METHOD.md.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

log = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor
# Keys of ``scores_by_lambda``: the lambda scale c (lambda = c x unit, see das_lightning/lambdas.py); ``None`` for a
# method with nothing to tune (pixel, gradient cosine, ...).
Lambda = float | None

CONFIDENCE = 0.95


def _as_tensor(values: ArrayLike, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values) if not torch.is_tensor(values) else values).to(dtype)


def _check_contract(scores: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor) -> tuple[int, int, int]:
    """Check the shape contract (ValueError otherwise); returns (num_subsets M, num_queries Q, num_train N)."""
    if not (scores.dim() == 2):
        raise ValueError(f"scores must be queries x train, got shape {tuple(scores.shape)}")
    if not (masks.dim() == 2):
        raise ValueError(f"masks must be subsets x train, got shape {tuple(masks.shape)}")
    if not (losses.dim() == 2):
        raise ValueError(f"losses must be subsets x queries, got shape {tuple(losses.shape)}")
    num_queries, num_train = scores.shape
    num_subsets = masks.shape[0]
    if not (masks.shape[1] == num_train):
        raise ValueError(f"masks have {masks.shape[1]} train columns, scores {num_train}")
    if losses.shape != (num_subsets, num_queries):
        raise ValueError(
            f"losses must be subsets x queries = {(num_subsets, num_queries)}, got {tuple(losses.shape)}"
        )
    return num_subsets, num_queries, num_train


def predictions(scores: ArrayLike, masks: ArrayLike) -> torch.Tensor:
    """g = masks @ scores^T, (M x N) @ (N x Q) -> M x Q, in float64 so near-equal sums keep their order."""
    scores_t, masks_t = _as_tensor(scores), _as_tensor(masks)
    if not (masks_t.shape[1] == scores_t.shape[1]):
        raise ValueError("masks (M x N) and scores (Q x N) disagree on N")
    return masks_t @ scores_t.T  # (M x N) @ (N x Q) -> M x Q


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks (1-based) along the LAST dimension, ties given their average rank, fully vectorised.

    The rank of v is the mean of the positions it occupies in the sorted row, (#{< v} + #{<= v} + 1) / 2.
    (torchmetrics ranks column by column in a Python loop, ~80 ms for 64 x 1000, which a 1000-resample bootstrap
    would repeat a thousand times per method; this gives the same ranks in one pass.)
    """
    ordered = values.sort(dim=-1).values.contiguous()
    values = values.contiguous()
    below = torch.searchsorted(ordered, values, side="left")
    below_or_equal = torch.searchsorted(ordered, values, side="right")
    return (below + below_or_equal + 1).to(torch.float64) / 2.0


def _spearman_columns(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Spearman per column of two (R x C) tensors -> (C,); NaN where either column is constant."""
    pred_ranks = average_ranks(predicted.T)  # C x R: ranks along the R rows of each column
    target_ranks = average_ranks(target.T)
    pred_centred = pred_ranks - pred_ranks.mean(dim=-1, keepdim=True)
    target_centred = target_ranks - target_ranks.mean(dim=-1, keepdim=True)
    covariance = (pred_centred * target_centred).sum(dim=-1)
    norm = pred_centred.pow(2).sum(dim=-1).sqrt() * target_centred.pow(2).sum(dim=-1).sqrt()
    # constant ranks (all tied) -> norm 0 -> NaN: no correlation is defined, and 0 would bias the mean
    correlation = torch.where(norm > 0, covariance / norm.clamp_min(1e-300), torch.nan)
    return correlation.clamp(-1.0, 1.0)


def lds_from_predictions(predicted: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """LDS per query from predictions g (M x Q) and losses (M x Q) -> (Q,), NaN for undefined queries."""
    if not (predicted.shape == losses.shape):
        raise ValueError(f"g {tuple(predicted.shape)} vs losses {tuple(losses.shape)}")
    # lower loss on q when the kept samples carry more attribution = positive LDS, hence -losses
    return _spearman_columns(predicted.to(torch.float64), -losses.to(torch.float64))


def lds_per_query(scores: ArrayLike, masks: ArrayLike, losses: ArrayLike) -> torch.Tensor:
    """LDS(q) = Spearman_k(g_k(q), -L_k(q)) for every query: (Q x N, M x N, M x Q) -> (Q,), NaN where undefined."""
    scores_t, masks_t, losses_t = _as_tensor(scores), _as_tensor(masks), _as_tensor(losses)
    _check_contract(scores_t, masks_t, losses_t)
    return lds_from_predictions(predictions(scores_t, masks_t), losses_t)


def nanmean_with_count(per_query: torch.Tensor) -> tuple[float, int]:
    """Mean over the defined values (queries, replicates) and the number of undefined (NaN) ones; NaN when none is
    defined."""
    defined = ~torch.isnan(per_query)
    num_undefined = int((~defined).sum())
    mean = float(per_query[defined].mean()) if defined.any() else math.nan
    return mean, num_undefined


def _select_queries(
    scores: torch.Tensor, losses: torch.Tensor, query_indices: ArrayLike | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Restrict to some queries: rows of scores (Q x N -> Q' x N), columns of losses (M x Q -> M x Q')."""
    if query_indices is None:
        return scores, losses
    index = torch.as_tensor(np.asarray(query_indices), dtype=torch.long)
    return scores[index], losses[:, index]
