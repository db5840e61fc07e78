"""The Linear Datamodeling Score (LDS, METHOD.md §3): the metric, with its shape contract, and its bootstrap.

Lambda selection (held-out halves) is in :mod:`.lambda_selection`; the reported records, table and plot in
:mod:`.lds_report`; ``lds.json`` is read and written by :mod:`das_lightning.selection` alone.

Shape contract (checked below, ValueError otherwise; comments mark where shapes change):

- ``scores``: queries x train, ``Q x N`` (tau(q, i), one row per query);
- ``masks``: subsets x train, ``M x N``, bool, ``masks[k, i]`` is True when training sample i is kept in subset k;
- ``losses``: subsets x queries, ``M x Q``, the ground-truth loss of the subset-k model on query q;
- predictions ``g = masks @ scores^T``: subsets x queries, ``M x Q``, g_k(q) = sum over kept i of tau(q, i).

LDS(q) = Spearman over subsets k of (g_k(q), -L_k(q)). Ties get average ranks. A query whose predictions or losses are
constant over the subsets has no rank correlation: it is NaN in :func:`lds_per_query`, excluded from every mean and
counted in the results. (torchmetrics' ``spearman_corrcoef`` ranks ties the same way and agrees to 1e-5, see
tests/test_lds.py, but adds eps=1e-6 to the denominator, so it returns 0 for a constant query, and it ranks column by
column in a Python loop; the bootstrap below needs neither.)

Units: the functions that *compute* (``lds_per_query``, ``bootstrap_lds``, ``paired_bootstrap_difference``,
``lds_by_lambda``) return fractions (a Spearman coefficient in [-1, 1]). Everything that is *reported*
(:class:`LDSRecord`, :class:`PairedDifference`, the JSON, the markdown table and the plot) is in percent (x100), like
the tables of METHOD.md.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from das_lightning.seeding import derive_seed

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


def _nanmean_with_count(per_query: torch.Tensor) -> tuple[float, int]:
    """Mean over the defined queries and the number of undefined (NaN) ones."""
    defined = ~torch.isnan(per_query)
    num_undefined = int((~defined).sum())
    mean = float(per_query[defined].mean()) if defined.any() else math.nan
    return mean, num_undefined


def _resample_indices(num_subsets: int, num_resamples: int, seed: int) -> torch.Tensor:
    """(num_resamples x M) subset indices drawn with replacement; the same for every method given the seed."""
    generator = torch.Generator().manual_seed(derive_seed("lds-bootstrap", seed, num_subsets))
    return torch.randint(num_subsets, (num_resamples, num_subsets), generator=generator)


def _weighted_rank_correlation(
    counts: torch.Tensor, pred_below: torch.Tensor, loss_below: torch.Tensor
) -> torch.Tensor:
    """Spearman per (resample, query) when original subset k appears ``counts[b, k]`` times in resample b.

    counts: B x M; ``below`` (see :func:`_comparisons`) is M x (C*M) for C queries. In resample b the average rank of
    subset k's value is #{< v_k} + (#{= v_k} + 1) / 2 counted with multiplicity, i.e. counts @ below + 1/2, and
    Spearman is the Pearson correlation of those ranks weighted by the multiplicities. -> B x C.
    """
    num_subsets = counts.shape[1]
    # B x M @ M x (C*M) -> B x C x M: the rank of each original subset's value inside each resample
    pred_ranks = (counts @ pred_below + 0.5).unflatten(1, (-1, num_subsets))
    loss_ranks = (counts @ loss_below + 0.5).unflatten(1, (-1, num_subsets))
    weights = (counts / num_subsets).unsqueeze(1)  # B x 1 x M, sums to 1 over M
    # the weighted mean of average ranks is (M + 1) / 2 whatever the ties: moments about it, in float64
    mean_rank = (num_subsets + 1) / 2.0
    weighted_pred = weights * pred_ranks
    weighted_loss = weights * loss_ranks
    covariance = (weighted_pred * loss_ranks).sum(-1) - mean_rank**2
    pred_variance = (weighted_pred * pred_ranks).sum(-1) - mean_rank**2
    loss_variance = (weighted_loss * loss_ranks).sum(-1) - mean_rank**2
    # all-tied values in a resample: no correlation (NaN, excluded as in lds_per_query). A non-constant rank vector
    # has variance >= ~1/M, so the threshold only catches rounding error around an exact 0.
    defined = (pred_variance > 1e-9) & (loss_variance > 1e-9)
    correlation = covariance / (pred_variance.clamp_min(1e-9) * loss_variance.clamp_min(1e-9)).sqrt()
    return torch.where(defined, correlation, torch.nan).clamp(-1.0, 1.0)


def _comparisons(values: torch.Tensor) -> torch.Tensor:
    """For M x C values: M x (C*M) with ``[j, q*M + k]`` = 1 if values[j, q] < values[k, q], 1/2 if equal, else 0."""
    columns = values.T.unsqueeze(2)  # C x M(j) x 1
    rows = values.T.unsqueeze(1)  # C x 1 x M(k)
    below = (columns < rows).double() + 0.5 * (columns == rows).double()  # C x M(j) x M(k)
    return below.permute(1, 0, 2).reshape(values.shape[0], -1)


def _bootstrap_means(
    predicted: torch.Tensor,
    losses: torch.Tensor,
    resamples: torch.Tensor,
    resample_chunk: int = 128,
    max_comparisons: int = 1 << 22,
) -> torch.Tensor:
    """Mean LDS over defined queries for each resample of the subsets: (M x Q, M x Q, R x M) -> (R,).

    A resample only changes how often each subset counts, so the ranks come from the original pairwise comparisons
    weighted by the counts: matrix products instead of a sort per (resample, query).
    """
    num_subsets, num_queries = predicted.shape
    counts = torch.zeros(resamples.shape[0], num_subsets, dtype=torch.float64)
    counts.scatter_add_(1, resamples, torch.ones_like(resamples, dtype=torch.float64))  # R x M multiplicities
    totals = torch.zeros(resamples.shape[0], dtype=torch.float64)
    defined = torch.zeros(resamples.shape[0], dtype=torch.float64)
    query_chunk = max(1, max_comparisons // (num_subsets * num_subsets))
    for query_start in range(0, num_queries, query_chunk):
        queries = slice(query_start, query_start + query_chunk)
        # lower loss = higher LDS, hence -losses (as in lds_from_predictions)
        pred_below, loss_below = _comparisons(predicted[:, queries]), _comparisons(-losses[:, queries])
        for start in range(0, counts.shape[0], resample_chunk):
            rows = slice(start, start + resample_chunk)
            correlation = _weighted_rank_correlation(counts[rows], pred_below, loss_below)  # B x C
            is_defined = ~torch.isnan(correlation)
            totals[rows] += torch.where(is_defined, correlation, 0.0).sum(1)
            defined[rows] += is_defined.sum(1)
    return torch.where(defined > 0, totals / defined.clamp_min(1), torch.nan)


def _percentile_interval(samples: torch.Tensor, confidence: float = CONFIDENCE) -> tuple[float, float]:
    samples = samples[~torch.isnan(samples)]
    if samples.numel() == 0:
        return math.nan, math.nan
    tail = (1.0 - confidence) / 2.0
    low, high = torch.quantile(samples, torch.tensor([tail, 1.0 - tail], dtype=samples.dtype))
    return float(low), float(high)


@dataclass(frozen=True)
class LDSResult:
    """LDS of one score matrix, as fractions: mean over defined queries and its 95% bootstrap CI over subsets."""

    mean: float
    ci_low: float
    ci_high: float
    per_query: torch.Tensor  # (Q,), NaN where undefined
    num_undefined: int  # queries with constant predictions or losses, excluded from the mean


def _select_queries(
    scores: torch.Tensor, losses: torch.Tensor, query_indices: ArrayLike | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Restrict to some queries: rows of scores (Q x N -> Q' x N), columns of losses (M x Q -> M x Q')."""
    if query_indices is None:
        return scores, losses
    index = torch.as_tensor(np.asarray(query_indices), dtype=torch.long)
    return scores[index], losses[:, index]


def bootstrap_lds(
    scores: ArrayLike,
    masks: ArrayLike,
    losses: ArrayLike,
    num_resamples: int = 1000,
    seed: int = 0,
    query_indices: ArrayLike | None = None,
) -> LDSResult:
    """Mean LDS over queries with a 95% percentile bootstrap CI over SUBSETS (M rows resampled with replacement).

    ``query_indices`` restricts the evaluation to those queries (positions in the Q axis), e.g. the report half.
    """
    scores_t, masks_t, losses_t = _as_tensor(scores), _as_tensor(masks), _as_tensor(losses)
    num_subsets, _, _ = _check_contract(scores_t, masks_t, losses_t)
    scores_t, losses_t = _select_queries(scores_t, losses_t, query_indices)
    predicted = predictions(scores_t, masks_t)  # M x Q'
    per_query = lds_from_predictions(predicted, losses_t)
    mean, num_undefined = _nanmean_with_count(per_query)
    if num_undefined:
        log.warning(
            "LDS undefined for %d of %d queries (constant over subsets); excluded",
            num_undefined,
            len(per_query),
        )
    resampled = _bootstrap_means(predicted, losses_t, _resample_indices(num_subsets, num_resamples, seed))
    ci_low, ci_high = _percentile_interval(resampled)
    return LDSResult(mean, ci_low, ci_high, per_query, num_undefined)


def paired_bootstrap_difference(
    scores_a: ArrayLike,
    scores_b: ArrayLike,
    masks: ArrayLike,
    losses: ArrayLike,
    num_resamples: int = 1000,
    seed: int = 0,
    query_indices: ArrayLike | None = None,
) -> tuple[float, float, float]:
    """mean LDS(a) - mean LDS(b) and its 95% CI, resampling the SAME subsets for both methods each time.

    Per-method CIs share the subset noise and overlap even when one method is clearly better; pairing cancels it.
    Returns fractions ``(diff, ci_low, ci_high)``.
    """
    scores_a_t, scores_b_t = _as_tensor(scores_a), _as_tensor(scores_b)
    masks_t, losses_t = _as_tensor(masks), _as_tensor(losses)
    num_subsets, _, _ = _check_contract(scores_a_t, masks_t, losses_t)
    _check_contract(scores_b_t, masks_t, losses_t)
    scores_a_t, losses_sel = _select_queries(scores_a_t, losses_t, query_indices)
    scores_b_t, _ = _select_queries(scores_b_t, losses_t, query_indices)
    predicted_a, predicted_b = (
        predictions(scores_a_t, masks_t),
        predictions(scores_b_t, masks_t),
    )  # M x Q' each
    mean_a, _ = _nanmean_with_count(lds_from_predictions(predicted_a, losses_sel))
    mean_b, _ = _nanmean_with_count(lds_from_predictions(predicted_b, losses_sel))
    resamples = _resample_indices(num_subsets, num_resamples, seed)
    differences = _bootstrap_means(predicted_a, losses_sel, resamples) - _bootstrap_means(
        predicted_b, losses_sel, resamples
    )
    ci_low, ci_high = _percentile_interval(differences)
    return mean_a - mean_b, ci_low, ci_high
