"""What part of an LDS is shared by every query (issue 26, METHOD.md §8): the centred LDS and the query-agnostic
baselines that say how much of a plain LDS a single subset ranking could reach.

The plain LDS correlates, per query, a method's predictions with the subset models' losses. When the subset models
differ in how well they fit the queries *as a whole* (some halves of the training set simply make better models for
the full model's own samples), every query's losses share one ranking of the subsets, and a method that predicts
that ranking scores high on every query without attributing anything to any particular query. On the committed
fashion2 bundle the first principal component of the standardised generated-query losses carries 62% of their
variance (18% on validation), and one ranking for all queries reaches LDS 75.1 there, above every method.

Definitions (shape contract of :mod:`.lds`: ``values`` are subsets x queries, ``M x Q``):

- **standardise** (:func:`standardise`): each query's column z-scored over the subsets (mean 0, population standard
  deviation 1); a constant column becomes zeros (its Spearman is undefined either way).
- **centred** (:func:`remove_shared_factor`): the standardised matrix minus its per-subset mean over the queries,
  ``c_kq = z_kq - mean_q' z_kq'``. Applied to the losses AND to the predictions, the centred LDS is the Spearman
  over subsets of the centred predictions against the centred negated losses: what is left once the one ranking
  every query shares is taken out of both. Standardising first gives every query the same weight in that shared
  ranking whatever the scale of its losses or scores (a score matrix's scale differs by orders of magnitude across
  methods, and by query within one). The centring uses only the queries it is given: a held-out report half is
  centred on its own queries, so it never sees the selection half.
- **query-averaged prediction** (:func:`query_averaged`): the mean over queries of the standardised predictions,
  the same subset ranking for every query. Its LDS says how much of a method's plain LDS that one ranking earns.
- **query-agnostic ceiling** (:func:`leave_one_query_out`): query q's prediction is minus the mean of the OTHER
  queries' standardised losses: the best one can do knowing only how the subset models rank on the other queries.
- **factor share** (:func:`factor_share`): the first singular value's share of the standardised losses' squared
  Frobenius norm (their columns are centred, so this is the first principal component's share of the variance).

Why standardise then subtract a mean instead of removing the first principal component: the mean over queries is
the shared ranking itself, with no fit to choose (a principal component has a sign and a rank to pick, and where
the factor is weak, as on the validation queries, the first component is not a shared ranking at all), and it is
the ranking the ceiling predicts with.
"""

from __future__ import annotations

import numpy as np
import torch

from das_lightning.evaluation.lds import ArrayLike


def _as_array(values: ArrayLike) -> np.ndarray:
    array = values.detach().cpu().numpy() if torch.is_tensor(values) else np.asarray(values)
    array = array.astype(np.float64, copy=False)
    if array.ndim != 2:
        raise ValueError(f"expected subsets x queries (M x Q), got shape {array.shape}")
    return array


def standardise(values: ArrayLike) -> np.ndarray:
    """Each query's column z-scored over the subsets (M x Q -> M x Q); a constant column becomes zeros."""
    array = _as_array(values)
    centred = array - array.mean(axis=0, keepdims=True)
    scale = np.sqrt((centred**2).mean(axis=0, keepdims=True))
    # a column constant up to rounding carries no ranking: zeros, not amplified rounding error
    tiny = scale <= 1e-12 * np.maximum(1.0, np.abs(array).max(axis=0, keepdims=True))
    return np.where(tiny, 0.0, centred / np.where(tiny, 1.0, scale))


def remove_shared_factor(values: ArrayLike) -> np.ndarray:
    """The centred matrix: standardised per query, minus the per-subset mean over queries (M x Q -> M x Q)."""
    standard = standardise(values)
    centred = standard - standard.mean(axis=1, keepdims=True)
    # z-scores are O(1): what is left below 1e-9 is rounding of a column equal to the shared ranking, and ranking
    # rounding error would give such a query-agnostic column a spurious LDS; zeros make it undefined, as it is
    return np.where(np.abs(centred) < 1e-9, 0.0, centred)


def query_averaged(predicted: ArrayLike) -> np.ndarray:
    """One subset ranking for every query: the mean over queries of the standardised predictions, repeated for each
    query (M x Q -> M x Q)."""
    standard = standardise(predicted)
    return np.repeat(standard.mean(axis=1, keepdims=True), standard.shape[1], axis=1)


def leave_one_query_out(losses: ArrayLike) -> np.ndarray:
    """The query-agnostic ceiling's predictions: for query q, minus the mean of the other queries' standardised
    losses (M x Q -> M x Q; lower loss on the others predicts lower loss on q). Needs at least 2 queries."""
    standard = standardise(losses)
    num_queries = standard.shape[1]
    if num_queries < 2:
        raise ValueError("the leave-one-query-out ceiling needs at least 2 queries")
    others = (standard.sum(axis=1, keepdims=True) - standard) / (num_queries - 1)
    return -others


def factor_share(losses: ArrayLike) -> float:
    """Share (fraction) of the standardised losses' variance on their first principal component."""
    standard = standardise(losses)
    singular = np.linalg.svd(standard, compute_uv=False)
    total = float((singular**2).sum())
    return float(singular[0] ** 2 / total) if total > 0 else float("nan")
