"""Honest intervals for the LDS (issue 19, item 5): two-way bootstrap, paired differences, seed spread.

The LDS is a mean over queries of a per-query Spearman over subsets (METHOD.md §3), so its error has two sources:
which subsets were trained and which queries were drawn. The subsets-only percentile bootstrap (what the LDS report
used until 2026-12-04) ignores the second, and it sits below the point estimate (a resample with replacement repeats
~37% of the subsets; the repeats are ties, and ties lower a Spearman). Here each replicate
resamples both, with the same draws for every method so that differences stay paired on both axes.

How subsets are resampled (``scheme``):

- ``"half"`` (default): half-sampling, m = floor(M/2) subsets drawn WITHOUT replacement. No subset repeats, so there
  are no artificial ties. For a smooth statistic the variance of a half-sample statistic about the full-sample one
  is sigma^2/m x (M - m)/(M - 1) ~= sigma^2/M (the finite-population factor exactly compensates the halved size), so
  the spread needs no rescaling. The replicates sit below the point estimate for a real reason: a Spearman over n
  subsets has a bias of order 1/(n + 1) (E r_s = ((n - 2) rho_s + 3 tau)/(n + 1) for continuous data), twice as large
  at m as at M. From the two sizes the bias of the point estimate itself follows (a Richardson step):
  ``bias = (mean(replicates) - point) x (m + 1)/(M - m)``.
- ``"replacement"``: the classic M-out-of-M bootstrap with replacement (ties from repeated subsets get average
  ranks, as the report's old subsets-only bootstrap did). Kept to compare; its bias estimate is the usual mean(replicates) - point,
  which mixes the Spearman's own small-sample bias with the artefact of the repeats.

Reported (:class:`BootstrapInterval`, fractions): the point estimate (the plain LDS, as in the tables), the percentile
interval of the replicates (shown, not recommended), the bias, the bias-corrected estimate ``point - bias`` and the
corrected interval: the replicates' quantiles re-centred on the corrected estimate (a shifted percentile interval).
The target of the correction is the LDS with infinitely many subsets (the population Spearman averaged over the
population of queries), which does not depend on M, so figures with 16 and 64 subsets estimate the same thing.

Resampling both queries and subsets of a crossed design counts twice the part of each query's subset noise that
is its own (Owen, "The pigeonhole bootstrap", 2007; no bootstrap of a crossed design is exact, McCullagh 2000): the
plain two-way interval is conservative (measured 92-99% coverage for a nominal 90%, worst with few subsets).
``crossed_correction`` (default) shrinks the replicates' spread about their mean by a factor <= 1 that removes the
double count, estimated from the queries-only and subsets-only replicates of the same draws (:func:`_crossed_scale`);
measured coverage of the corrected interval for a nominal 90%: 87-90% (likely the usual shortfall of an interval
whose spread is estimated from 30 queries and 16-32 subsets). tests/test_intervals.py measures it. Pass
``crossed_correction=False`` for the conservative interval.

Seeds (:func:`seed_spread_lds`, :func:`seed_spread_difference`): with ground truth from R training seeds
(losses R x M x Q), the LDS is the point estimate against the seed-averaged losses, with each seed's own LDS beside
it. Its reported interval is the two-way one on the seed-averaged losses: conditional on the seeds that were
trained. A per-model training noise (seed x subset) is already in it, since each subset's models are resampled
with the subset; what it does not cover is what another set of R seeds would change for every subset alike (a
seed-specific attribution). That needs a seed variance, and two seeds cannot estimate one: a hierarchical bootstrap
that resamples R = 2 seeds with replacement scores half its replicates against one seed's ground truth, which is
noisier, so its replicates sit low, and the spread of two values says little about a variance. The hierarchical
interval (seeds resampled at the top, then queries and subsets with the same draws as above; the seeds' part of
each replicate, hierarchical minus two-way, centred on zero so that the noisier duplicate-seed replicates do not
drag it down, then added to the crossed-corrected two-way part) is reported only from
:data:`MIN_SEEDS_FOR_SEED_INTERVAL` seeds on, the count chosen by simulation (benchmarks/coverage.py).
Paired differences follow the same rule; they cancel most of a seed's effect anyway.

Everything is batched over replicates: a replicate only changes how often each subset counts, so its ranks are
the original pairwise comparisons weighted by the counts (matrix products, no sort per replicate). 1000 replicates of
100 queries x 64 subsets take 0.3 to 0.6 s on one core.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from das_lightning.evaluation.lds import CONFIDENCE, lds_from_predictions, nanmean_with_count, predictions
from das_lightning.seeding import generator_for

log = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor

SCHEMES = ("half", "replacement")
# Below this many subsets a per-query Spearman means little: its null standard deviation is 1/sqrt(M - 1) (0.38 at
# M = 8), with M = 2 every value is -1 or +1 (or undefined), and below 5 subsets no Spearman is significant at 5%.
# Half-sampling also needs m = M/2 >= 4 subsets per replicate.
MIN_SUBSETS = 8
# Fewer training seeds than this cannot estimate a seed variance: the seed-aware interval is computed but not
# reported (records carry the two-way interval on the seed-averaged ground truth, conditional on the seeds trained).
# Chosen from benchmarks/coverage.py (docs/benchmarks.md, "Interval coverage").
MIN_SEEDS_FOR_SEED_INTERVAL = 4
_MAX_CHUNK_ELEMENTS = 1 << 21  # per (replicates x queries x subsets) tensor in one chunk: 16 MB in float64


def check_subset_count(num_subsets: int, minimum: int = MIN_SUBSETS, strict: bool = False) -> str | None:
    """A message when ``num_subsets`` is too few for a Spearman over subsets to mean anything, else None.

    The message is also emitted as a ``UserWarning`` (and logged); with ``strict`` it is raised as ValueError.
    """
    if num_subsets >= minimum:
        return None
    message = (
        f"only {num_subsets} subsets: a per-query LDS is a Spearman over {num_subsets} points "
        f"(null standard deviation {1 / math.sqrt(max(num_subsets - 1, 1)):.2f}"
        + (f"; with {num_subsets} subsets every value is -100, 0 or 100" if num_subsets <= 2 else "")
        + f"), too coarse to compare methods; use at least {minimum} (the paper uses 64)"
    )
    if strict:
        raise ValueError(message)
    log.warning(message)
    warnings.warn(message, UserWarning, stacklevel=2)
    return message


@dataclass(frozen=True)
class BootstrapInterval:
    """A bootstrapped LDS (or LDS difference), as FRACTIONS. See the module docstring for the definitions.

    ``estimate``: the plain point estimate (mean over defined queries). ``ci_low/ci_high``: percentile interval of
    the replicates (biased low for the LDS; shown for comparison). ``bias``: the bootstrap estimate of the point
    estimate's bias. ``corrected``: estimate - bias. ``corrected_low/corrected_high``: the interval to report.
    """

    estimate: float
    ci_low: float
    ci_high: float
    bias: float
    corrected: float
    corrected_low: float
    corrected_high: float
    replicate_mean: float
    variance_scale: float  # <= 1: the crossed-design shrink of the two-way spread (1 when not applied)
    confidence: float
    scheme: str
    resample_queries: bool
    num_resamples: int
    num_queries: int
    num_subsets: int
    num_undefined: int  # queries with constant predictions or losses (NaN LDS), excluded from every mean
    warning: str | None = None
    replicates: torch.Tensor | None = field(
        default=None, repr=False, compare=False
    )  # (B,), NaN: no defined query

    @property
    def resolved(self) -> bool:
        """True when the corrected interval excludes zero (for a difference: one method is better)."""
        return bool(self.corrected_low > 0 or self.corrected_high < 0)

    def as_percent(self) -> dict[str, float | int | str | bool | None]:
        """The reported fields in PERCENT (x100), as the LDS tables show them."""
        fields = ("estimate", "ci_low", "ci_high", "bias", "corrected", "corrected_low", "corrected_high")
        record: dict[str, float | int | str | bool | None] = {
            name: 100.0 * getattr(self, name) for name in fields
        }
        record.update(
            variance_scale=self.variance_scale,
            confidence=self.confidence,
            scheme=self.scheme,
            resample_queries=self.resample_queries,
            num_resamples=self.num_resamples,
            num_queries=self.num_queries,
            num_subsets=self.num_subsets,
            num_undefined=self.num_undefined,
            resolved=self.resolved,
            warning=self.warning,
        )
        return record


@dataclass(frozen=True)
class SeedSpread:
    """LDS (or difference) with ground truth from R training seeds, as FRACTIONS.

    ``per_seed``: the point estimate against each seed's losses alone (R values). ``averaged``: the two-way interval
    against the seed-averaged losses (what the paper reports, METHOD.md §3 step 3). ``seed_low/seed_high``: the
    hierarchical interval that also resamples seeds; ``resolved`` uses it.
    """

    per_seed: tuple[float, ...]
    averaged: BootstrapInterval
    seed_low: float
    seed_high: float
    num_seeds: int
    replicates: torch.Tensor | None = field(default=None, repr=False, compare=False)  # (B,) hierarchical, raw

    @property
    def seed_interval(self) -> bool:
        """Whether the seed-aware interval is reported: only from :data:`MIN_SEEDS_FOR_SEED_INTERVAL` seeds on."""
        return self.num_seeds >= MIN_SEEDS_FOR_SEED_INTERVAL

    @property
    def low(self) -> float:
        """The reported interval's low end: the two-way interval on the seed-averaged ground truth (conditional on
        the seeds that were trained)."""
        return self.averaged.corrected_low

    @property
    def high(self) -> float:
        return self.averaged.corrected_high

    @property
    def resolved(self) -> bool:
        """True when the reported interval (:attr:`low`, :attr:`high`) excludes zero."""
        return bool(self.low > 0 or self.high < 0)

    @property
    def seed_resolved(self) -> bool | None:
        """True when the seed-aware interval excludes zero; None below MIN_SEEDS_FOR_SEED_INTERVAL seeds."""
        if not self.seed_interval:
            return None
        return bool(self.seed_low > 0 or self.seed_high < 0)

    def as_percent(self) -> dict[str, object]:
        return {
            "per_seed": [100.0 * value for value in self.per_seed],
            "averaged": self.averaged.as_percent(),
            "seed_low": 100.0 * self.seed_low,
            "seed_high": 100.0 * self.seed_high,
            "num_seeds": self.num_seeds,
            "seed_interval": self.seed_interval,
            "resolved": self.resolved,
        }


# --------------------------------------------------------------------------------------------------- draws


@dataclass(frozen=True)
class _Draws:
    query_counts: torch.Tensor  # B x Q float64 multiplicities (all ones when queries are not resampled)
    subset_index: torch.Tensor  # B x m long, positions in the M axis
    seed_index: torch.Tensor | None  # B x R long, or None


def _draw(
    num_resamples: int,
    num_queries: int,
    num_subsets: int,
    num_seeds: int | None,
    scheme: str,
    resample_queries: bool,
    seed: int,
) -> _Draws:
    """The resampling plan, from separate generators per axis: adding the seed axis leaves the query and subset
    draws unchanged, so the seed-aware replicates differ from the two-way ones by the seeds only."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, not {scheme!r}")
    if resample_queries:
        draws = torch.randint(
            num_queries,
            (num_resamples, num_queries),
            generator=generator_for("lds-two-way-queries", seed, num_queries),
        )
        counts = torch.zeros(num_resamples, num_queries, dtype=torch.float64)
        counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
    else:
        counts = torch.ones(num_resamples, num_queries, dtype=torch.float64)
    subset_generator = generator_for("lds-two-way-subsets", seed, num_subsets, scheme)
    if scheme == "half":
        # a random permutation per replicate, keep its first m: m distinct subsets
        keys = torch.rand(num_resamples, num_subsets, generator=subset_generator)
        subset_index = keys.argsort(dim=1)[:, : num_subsets // 2]
    else:
        subset_index = torch.randint(num_subsets, (num_resamples, num_subsets), generator=subset_generator)
    seed_index = None
    if num_seeds is not None:
        seed_index = torch.randint(
            num_seeds,
            (num_resamples, num_seeds),
            generator=generator_for("lds-two-way-seeds", seed, num_seeds),
        )
    return _Draws(counts, subset_index, seed_index)


# --------------------------------------------------------------------------------------------------- core


def _comparisons(values: torch.Tensor) -> torch.Tensor:
    """For M x C values: M x (C*M), ``[k, c*M + j]`` = 1 if values[k, c] < values[j, c], 1/2 if equal, else 0."""
    columns = values.T.unsqueeze(2)  # C x M(k) x 1
    rows = values.T.unsqueeze(1)  # C x 1 x M(j)
    below = (columns < rows).double() + 0.5 * (columns == rows).double()  # C x M(k) x M(j)
    return below.permute(1, 0, 2).reshape(values.shape[0], -1)


def _weighted_spearman(
    counts: torch.Tensor, pred_below: torch.Tensor, loss_below: torch.Tensor
) -> torch.Tensor:
    """Spearman per (replicate, query) when subset k counts ``counts[b, k]`` times in replicate b (0 or 1 for
    half-sampling, a multiplicity with replacement): (b x M, M x (C*M), M x (C*M)) -> b x C, NaN where undefined.

    In replicate b the average rank of subset j's value is #{< v_j} + (#{= v_j} + 1)/2 counted with multiplicity,
    i.e. (counts @ below)[j] + 1/2; Spearman is the Pearson correlation of those ranks weighted by the counts. Matrix
    products instead of a sort per (replicate, query, method).
    """
    num_subsets = counts.shape[1]
    size = counts.sum(dim=1, keepdim=True)  # b x 1: subsets in each replicate
    # b x M @ M x (C*M) -> b x C x M: the rank of each original subset's value inside each replicate
    pred_ranks = (counts @ pred_below + 0.5).unflatten(1, (-1, num_subsets))
    loss_ranks = (counts @ loss_below + 0.5).unflatten(1, (-1, num_subsets))
    weights = (counts / size).unsqueeze(1)  # b x 1 x M, sums to 1 over M
    # the weighted mean of average ranks is (size + 1)/2 whatever the ties: moments about it, in float64
    mean_rank_squared = ((size + 1) / 2.0) ** 2  # b x 1
    weighted_pred = weights * pred_ranks
    covariance = (weighted_pred * loss_ranks).sum(-1) - mean_rank_squared
    pred_variance = (weighted_pred * pred_ranks).sum(-1) - mean_rank_squared
    loss_variance = (weights * loss_ranks * loss_ranks).sum(-1) - mean_rank_squared
    # all tied (constant) in a replicate: no correlation, NaN and excluded as in lds_per_query. A non-constant rank
    # vector has variance >= ~1/M, so the threshold only catches rounding error around an exact 0.
    defined = (pred_variance > 1e-9) & (loss_variance > 1e-9)
    correlation = covariance / (pred_variance.clamp_min(1e-9) * loss_variance.clamp_min(1e-9)).sqrt()
    return torch.where(defined, correlation, torch.nan).clamp(-1.0, 1.0)


def _seed_groups(
    draws: _Draws, num_seeds: int, resample_seeds: bool
) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """Replicates grouped by the multiset of seeds they drew (the mean of the drawn losses depends on nothing
    else): [(seeds, replicate positions)]. Without seed resampling: one group, every seed once."""
    num_resamples = draws.subset_index.shape[0]
    if not resample_seeds:
        return [(tuple(range(num_seeds)), torch.arange(num_resamples))]
    assert draws.seed_index is not None
    combos = draws.seed_index.sort(dim=1).values
    unique, inverse = combos.unique(dim=0, return_inverse=True)
    return [
        (tuple(int(s) for s in combo), (inverse == group).nonzero().flatten())
        for group, combo in enumerate(unique)
    ]


@dataclass(frozen=True)
class _Replicates:
    two_way: torch.Tensor  # (B,) queries and subsets resampled
    subsets_only: torch.Tensor  # (B,) the same subset draws, every query once
    queries_only: torch.Tensor  # (B,) the same query draws, all subsets once


def _weighted_query_means(totals: torch.Tensor, weight_sums: torch.Tensor) -> torch.Tensor:
    return torch.where(weight_sums > 0, totals / weight_sums.clamp_min(1e-300), torch.nan)


def _replicate_means(
    predicted: list[torch.Tensor], losses: torch.Tensor, draws: _Draws, resample_seeds: bool
) -> list[_Replicates]:
    """Mean LDS per replicate for each method: predictions [M x Q] per method, losses R x M x Q -> [_Replicates].

    Every method sees the same replicates (paired by construction); the ground truth's comparisons are shared.
    The subsets-only and queries-only replicates (same draws) come along for the crossed-design correction.
    """
    num_resamples = draws.subset_index.shape[0]
    num_seeds, num_subsets, num_queries = losses.shape
    counts = torch.zeros(num_resamples, num_subsets, dtype=torch.float64)
    ones = torch.ones_like(draws.subset_index, dtype=torch.float64)
    counts.scatter_add_(1, draws.subset_index, ones)  # B x M multiplicities
    # [method][two-way, subsets-only] running sums over query chunks: (sum of weight x LDS, sum of weights)
    sums = [[torch.zeros(2, num_resamples, dtype=torch.float64) for _ in range(2)] for _ in predicted]
    query_chunk = max(1, _MAX_CHUNK_ELEMENTS // (num_subsets * num_subsets))
    groups = _seed_groups(draws, num_seeds, resample_seeds)
    for query_start in range(0, num_queries, query_chunk):
        queries = slice(query_start, query_start + query_chunk)
        pred_below = [_comparisons(method_predicted[:, queries]) for method_predicted in predicted]
        num_chunk_queries = pred_below[0].shape[1] // num_subsets
        row_chunk = max(1, _MAX_CHUNK_ELEMENTS // (num_chunk_queries * num_subsets))
        for seeds, positions in groups:
            target = losses[list(seeds)].mean(dim=0)[:, queries]  # M x C: the mean of the drawn seeds' losses
            # lower loss when the kept samples carry more attribution = positive LDS, hence -target (as lds.py)
            loss_below = _comparisons(-target)
            for start in range(0, positions.numel(), row_chunk):
                rows = positions[start : start + row_chunk]
                query_counts = draws.query_counts[rows, queries]  # b x C
                for method, method_below in enumerate(pred_below):
                    correlation = _weighted_spearman(counts[rows], method_below, loss_below)  # b x C
                    defined = ~torch.isnan(correlation)
                    values = torch.where(defined, correlation, 0.0)
                    for kind, weights in enumerate((query_counts, torch.ones_like(query_counts))):
                        weights = torch.where(defined, weights, 0.0)
                        sums[method][kind][0, rows] += (weights * values).sum(dim=1)
                        sums[method][kind][1, rows] += weights.sum(dim=1)
    replicates = []
    for method, method_predicted in enumerate(predicted):
        per_query = lds_from_predictions(
            method_predicted, losses.mean(dim=0)
        )  # (Q,) the point's per-query LDS
        defined = ~torch.isnan(per_query)
        weights = torch.where(defined, draws.query_counts, 0.0)  # B x Q
        queries_only = _weighted_query_means(
            (weights * torch.where(defined, per_query, 0.0)).sum(dim=1), weights.sum(dim=1)
        )
        two_way, subsets_only = (_weighted_query_means(*sums[method][kind]) for kind in range(2))
        replicates.append(_Replicates(two_way, subsets_only, queries_only))
    return replicates


def _difference(replicates: list[_Replicates]) -> _Replicates:
    """One method: its replicates; two: a - b, replicate by replicate (same draws)."""
    if len(replicates) == 1:
        return replicates[0]
    a, b = replicates
    return _Replicates(
        a.two_way - b.two_way, a.subsets_only - b.subsets_only, a.queries_only - b.queries_only
    )


def _nanvar(values: torch.Tensor) -> float:
    defined = values[~torch.isnan(values)]
    return float(defined.var()) if defined.numel() > 1 else math.nan


def _crossed_scale(replicates: _Replicates) -> float:
    """Factor (<= 1) that shrinks the two-way replicates' spread to the crossed design's variance.

    For a mean over a crossed design, y_qk = a_q + b_k + e_qk (the Spearman is asymptotically such a mean over
    subsets), Var = A/Q + B/M + E/(QM), while the queries-only, subsets-only and two-way bootstraps give about
    A/Q + E/(QM), B/M + E/(QM) and A/Q + B/M + 3E/(QM) (Owen 2007). Hence Var ~= 2 (V_q + V_s) - V_qs, floored at
    max(V_q, V_s) against noise in the three estimates.
    """
    both = _nanvar(replicates.two_way)
    queries, subsets = _nanvar(replicates.queries_only), _nanvar(replicates.subsets_only)
    if not both > 0 or math.isnan(queries) or math.isnan(subsets):
        return 1.0
    estimate = max(2.0 * (queries + subsets) - both, queries, subsets)
    return min(1.0, math.sqrt(estimate / both))


def _quantiles(samples: torch.Tensor, confidence: float) -> tuple[float, float]:
    samples = samples[~torch.isnan(samples)]
    if samples.numel() == 0:
        return math.nan, math.nan
    tail = (1.0 - confidence) / 2.0
    low, high = torch.quantile(samples, torch.tensor([tail, 1.0 - tail], dtype=samples.dtype))
    return float(low), float(high)


def _interval(
    point: float,
    replicates: _Replicates,
    num_subsets: int,
    scheme: str,
    confidence: float,
    resample_queries: bool,
    crossed_correction: bool,
    num_queries: int,
    num_undefined: int,
    warning: str | None,
) -> BootstrapInterval:
    """Percentile interval, bias, and the (crossed-corrected) interval re-centred on the bias-corrected estimate."""
    two_way = replicates.two_way
    low, high = _quantiles(two_way, confidence)
    replicate_mean, _ = nanmean_with_count(two_way)
    shift = replicate_mean - point
    if scheme == "half":
        # E[replicate] - E[point] = b (1/(m+1) - 1/(M+1)); the point's own bias is b/(M+1)
        half = num_subsets // 2
        bias = shift * (half + 1) / (num_subsets - half)
    else:
        bias = shift
    corrected = point - bias
    scale = _crossed_scale(replicates) if resample_queries and crossed_correction else 1.0
    adjusted_low, adjusted_high = _quantiles(replicate_mean + scale * (two_way - replicate_mean), confidence)
    recentre = corrected - replicate_mean
    return BootstrapInterval(
        estimate=point,
        ci_low=low,
        ci_high=high,
        bias=bias,
        corrected=corrected,
        corrected_low=adjusted_low + recentre,
        corrected_high=adjusted_high + recentre,
        replicate_mean=replicate_mean,
        variance_scale=scale,
        confidence=confidence,
        scheme=scheme,
        resample_queries=resample_queries,
        num_resamples=int(two_way.numel()),
        num_queries=num_queries,
        num_subsets=num_subsets,
        num_undefined=num_undefined,
        warning=warning,
        replicates=two_way,
    )


def _as_tensor(values: ArrayLike) -> torch.Tensor:
    tensor = values if torch.is_tensor(values) else torch.as_tensor(np.asarray(values))
    return tensor.to(torch.float64)


def _prepare(
    scores: list[ArrayLike],
    masks: ArrayLike,
    losses: ArrayLike,
    query_indices: ArrayLike | None,
    seeded: bool,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Check the shape contract and return predictions [M x Q'] per method and losses R x M x Q'."""
    masks_t = _as_tensor(masks)
    losses_t = _as_tensor(losses)
    if seeded:
        if losses_t.dim() != 3:
            raise ValueError(f"losses must be seeds x subsets x queries, got shape {tuple(losses_t.shape)}")
    else:
        if losses_t.dim() != 2:
            raise ValueError(f"losses must be subsets x queries, got shape {tuple(losses_t.shape)}")
        losses_t = losses_t.unsqueeze(0)  # 1 x M x Q: one seed
    if masks_t.dim() != 2:
        raise ValueError(f"masks must be subsets x train, got shape {tuple(masks_t.shape)}")
    num_subsets, num_queries = losses_t.shape[1:]
    if masks_t.shape[0] != num_subsets:
        raise ValueError(f"masks have {masks_t.shape[0]} subsets, losses {num_subsets}")
    predicted = []
    for method_scores in scores:
        scores_t = _as_tensor(method_scores)
        if scores_t.dim() != 2 or scores_t.shape != (num_queries, masks_t.shape[1]):
            raise ValueError(
                f"scores must be queries x train = {(num_queries, masks_t.shape[1])}, got {tuple(scores_t.shape)}"
            )
        predicted.append(predictions(scores_t, masks_t))  # (M x N) @ (N x Q) -> M x Q
    if query_indices is not None:
        index = torch.as_tensor(np.asarray(query_indices), dtype=torch.long)
        predicted = [method_predicted[:, index] for method_predicted in predicted]  # M x Q'
        losses_t = losses_t[:, :, index]  # R x M x Q'
    return predicted, losses_t


def _check_resampling(num_subsets: int, scheme: str, num_resamples: int) -> str | None:
    minimum = 4 if scheme == "half" else 2
    if num_subsets < minimum:
        raise ValueError(f"the {scheme!r} bootstrap needs at least {minimum} subsets, got {num_subsets}")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be positive, got {num_resamples}")
    return check_subset_count(num_subsets)


def _point(predicted: torch.Tensor, losses: torch.Tensor) -> tuple[float, int]:
    return nanmean_with_count(lds_from_predictions(predicted, losses))


# --------------------------------------------------------------------------------------------------- public


def two_way_bootstrap(
    scores: ArrayLike,
    masks: ArrayLike,
    losses: ArrayLike,
    num_resamples: int = 1000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
    scheme: str = "half",
    resample_queries: bool = True,
    crossed_correction: bool = True,
    query_indices: ArrayLike | None = None,
) -> BootstrapInterval:
    """Mean LDS with a bootstrap over queries AND subsets: (Q x N, M x N, M x Q) -> :class:`BootstrapInterval`.

    ``scheme``: "half" (half-sampling without replacement, default) or "replacement"; ``resample_queries=False``
    gives a subsets-only bootstrap (with "replacement": the report's old subsets-only interval, up to the draws).
    ``crossed_correction``: shrink the two-way spread by the crossed-design factor (module docstring).
    ``query_indices`` restricts to those queries first (e.g. the report half).
    """
    (predicted,), losses_t = _prepare([scores], masks, losses, query_indices, seeded=False)
    num_subsets, num_queries = predicted.shape
    warning = _check_resampling(num_subsets, scheme, num_resamples)
    point, num_undefined = _point(predicted, losses_t[0])
    draws = _draw(num_resamples, num_queries, num_subsets, None, scheme, resample_queries, seed)
    (replicates,) = _replicate_means([predicted], losses_t, draws, resample_seeds=False)
    return _interval(
        point,
        replicates,
        num_subsets,
        scheme,
        confidence,
        resample_queries,
        crossed_correction,
        num_queries,
        num_undefined,
        warning,
    )


def paired_two_way_difference(
    scores_a: ArrayLike,
    scores_b: ArrayLike,
    masks: ArrayLike,
    losses: ArrayLike,
    num_resamples: int = 1000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
    scheme: str = "half",
    resample_queries: bool = True,
    crossed_correction: bool = True,
    query_indices: ArrayLike | None = None,
) -> BootstrapInterval:
    """LDS(a) - LDS(b) with the SAME resampled queries and subsets for both methods in every replicate.

    Per-method intervals share the query and subset noise and overlap even when one method is clearly better;
    pairing on both axes cancels it. ``resolved`` on the result: the corrected interval excludes zero.
    ``num_undefined`` counts queries undefined for either method.
    """
    (predicted_a, predicted_b), losses_t = _prepare([scores_a, scores_b], masks, losses, query_indices, False)
    num_subsets, num_queries = predicted_a.shape
    warning = _check_resampling(num_subsets, scheme, num_resamples)
    point_a, undefined_a = _point(predicted_a, losses_t[0])
    point_b, undefined_b = _point(predicted_b, losses_t[0])
    draws = _draw(num_resamples, num_queries, num_subsets, None, scheme, resample_queries, seed)
    replicates = _difference(_replicate_means([predicted_a, predicted_b], losses_t, draws, False))
    return _interval(
        point_a - point_b,
        replicates,
        num_subsets,
        scheme,
        confidence,
        resample_queries,
        crossed_correction,
        num_queries,
        max(undefined_a, undefined_b),
        warning,
    )


def _seed_spread(
    scores: list[ArrayLike],
    masks: ArrayLike,
    losses_by_seed: ArrayLike,
    num_resamples: int,
    seed: int,
    confidence: float,
    scheme: str,
    crossed_correction: bool,
    query_indices: ArrayLike | None,
) -> SeedSpread:
    predicted, losses_t = _prepare(scores, masks, losses_by_seed, query_indices, seeded=True)
    num_seeds, num_subsets, num_queries = losses_t.shape
    warning = _check_resampling(num_subsets, scheme, num_resamples)

    def combine(values: list[float]) -> float:  # one method: its value; two methods: a - b
        return values[0] if len(values) == 1 else values[0] - values[1]

    per_seed = tuple(
        combine([_point(method_predicted, losses_t[r])[0] for method_predicted in predicted])
        for r in range(num_seeds)
    )
    averaged_losses = losses_t.mean(dim=0)  # M x Q: the ground truth averaged over the R models
    points = [_point(method_predicted, averaged_losses) for method_predicted in predicted]
    draws = _draw(num_resamples, num_queries, num_subsets, num_seeds, scheme, True, seed)
    two_way = _difference(_replicate_means(predicted, losses_t, draws, resample_seeds=False))
    averaged = _interval(
        combine([point for point, _ in points]),
        two_way,
        num_subsets,
        scheme,
        confidence,
        True,
        crossed_correction,
        num_queries,
        max(undefined for _, undefined in points),
        warning,
    )
    hierarchical = _difference(_replicate_means(predicted, losses_t, draws, resample_seeds=True)).two_way
    # replicate by replicate (same query and subset draws), hierarchical - two-way is what the seeds add; only the
    # two-way part is shrunk by the crossed-design factor and re-centred by the subset-level bias correction
    mean = averaged.replicate_mean
    # a replicate that draws one seed twice scores against a noisier ground truth (a lower LDS): that shift is not
    # uncertainty about the point, so the seeds' part is centred on zero before it widens the interval
    seed_part = hierarchical - two_way.two_way
    seed_part = seed_part - nanmean_with_count(seed_part)[0]
    adjusted = mean + averaged.variance_scale * (two_way.two_way - mean) + seed_part
    low, high = _quantiles(adjusted, confidence)
    recentre = averaged.corrected - mean
    return SeedSpread(per_seed, averaged, low + recentre, high + recentre, num_seeds, hierarchical)


def seed_spread_lds(
    scores: ArrayLike,
    masks: ArrayLike,
    losses_by_seed: ArrayLike,
    num_resamples: int = 1000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
    scheme: str = "half",
    crossed_correction: bool = True,
    query_indices: ArrayLike | None = None,
) -> SeedSpread:
    """LDS with ground truth from R training seeds: (Q x N, M x N, R x M x Q) -> :class:`SeedSpread`.

    Per-seed LDS, the LDS of the seed-averaged losses with its two-way interval, and the hierarchical interval
    that also resamples seeds (module docstring). With R = 1 the seed interval equals the two-way one.
    """
    return _seed_spread(
        [scores],
        masks,
        losses_by_seed,
        num_resamples,
        seed,
        confidence,
        scheme,
        crossed_correction,
        query_indices,
    )


def seed_spread_difference(
    scores_a: ArrayLike,
    scores_b: ArrayLike,
    masks: ArrayLike,
    losses_by_seed: ArrayLike,
    num_resamples: int = 1000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
    scheme: str = "half",
    crossed_correction: bool = True,
    query_indices: ArrayLike | None = None,
) -> SeedSpread:
    """LDS(a) - LDS(b) per seed, on the seed-averaged losses, and with the seed-aware paired interval (same seeds,
    queries and subsets for both methods in every replicate). ``resolved``: the comparison survives the seed."""
    return _seed_spread(
        [scores_a, scores_b],
        masks,
        losses_by_seed,
        num_resamples,
        seed,
        confidence,
        scheme,
        crossed_correction,
        query_indices,
    )
