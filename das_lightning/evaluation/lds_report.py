"""What the LDS stage reports, in percent: one record per method, query set and lambda selection, paired
differences, the Markdown table and the plot of LDS against lambda.

Every interval is :data:`INTERVAL`: a bootstrap that resamples the queries and the subsets together (half-sampling
of the subsets, no repeats), re-centred for the bias of a Spearman over few subsets, and, when the ground truth comes
from several training seeds, resampling those too (:mod:`.intervals`), so a comparison counts as resolved only when
it survives the queries, the subsets and the seed. The LDS itself is the plain point estimate on the seed-averaged
losses, comparable with published tables; the per-seed values are reported beside it. ``lds.json`` itself is written by
:mod:`das_lightning.selection` (the one module that reads and writes it)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from das_lightning.evaluation.intervals import (
    MIN_SEEDS_FOR_SEED_INTERVAL,
    MIN_SUBSETS,
    BootstrapInterval,
    SeedSpread,
    paired_two_way_difference,
    seed_spread_difference,
    seed_spread_lds,
    two_way_bootstrap,
)
from das_lightning.evaluation.lambda_selection import (
    heldout_halves,
    seed_subset_rows,
    select_lambda,
    subset_rows,
)
from das_lightning.evaluation.lds import (
    ArrayLike,
    Lambda,
    _as_tensor,
    lds_from_predictions,
    nanmean_with_count,
    predictions,
)
from das_lightning.evaluation.shared_factor import (
    factor_share,
    leave_one_query_out,
    query_averaged,
    remove_shared_factor,
)
from das_lightning.lambdas import grid_edge
from das_lightning.manifest import atomic_save

log = logging.getLogger(__name__)

INTERVAL = (
    "two-way bootstrap over queries and subsets (half-sampling), bias-corrected, on the seed-averaged ground truth"
    f" (conditional on the seeds trained); from R = {MIN_SEEDS_FOR_SEED_INTERVAL} seeds on also the seed-aware"
    " interval (seeds resampled too), in its own column"
)
# The damping-dominated flag: at c >= N (lambda >= trace(K) >= the largest eigenvalue of K, and the same for EK-FAC's
# d = c x trace(G)/N) every eigenvalue of (K + lambda I)^-1 lies within a factor 2 of 1/lambda: the method is, within
# that tolerance, the plain dot product of its features (METHOD.md §8).
DAMPING_DOMINATED_C_PER_TRAIN = 1.0
DAMPING_TOLERANCE = "(K + lambda I)^-1 within a factor 2 of I/lambda (c >= N: lambda >= trace(K))"


def _percent(value: float) -> float:
    return 100.0 * value


@dataclass(frozen=True)
class LDSRecord:
    """One reported LDS, in PERCENT. ``lambda_selection``: "heldout" (lambda chosen on the other half of the queries,
    and in ``heldout_mode=queries_and_subsets`` of the subsets too; LDS on the report half: our honest figure) or
    "oracle" (best lambda on all queries, LDS on all of them: what the papers report). ``lambda_`` is the selected
    scale c (None for methods without a lambda), ``lambda_absolute`` = c x the features' unit when known, and
    ``edge`` is "low"/"high" when the selection is the first/last point of the grid (the optimum was not searched)."""

    method: str
    query_set: str
    lds: float
    ci_low: float
    ci_high: float
    lambda_: Lambda
    lambda_selection: str
    num_subsets: int
    num_queries: int
    num_undefined: int = 0
    lambda_absolute: float | None = None
    edge: str | None = None
    heldout_mode: str = "queries"
    per_seed: tuple[float, ...] = ()  # the LDS against each training seed's ground truth alone (R values)
    bias: float = (
        0.0  # the bootstrap's estimate of the point estimate's small-sample bias (subtracted in the CI)
    )
    interval: str = INTERVAL
    # an ensemble's members: each one's name, weights checksum and own lambda unit (c x unit is its lambda)
    members: tuple[dict[str, Any], ...] = ()
    # the centred LDS (das_lightning/evaluation/shared_factor.py) of the same scores at the same c, on the same
    # queries and subsets: the shared subset ranking removed from losses and predictions; None when not computed
    centred: float | None = None
    centred_ci_low: float | None = None
    centred_ci_high: float | None = None
    centred_per_seed: tuple[float, ...] = ()
    # the LDS of the method's query-averaged prediction (one subset ranking for every query): how much of ``lds``
    # a query-agnostic ranking earns
    query_averaged: float | None = None
    # c >= DAMPING_DOMINATED_C_PER_TRAIN x N: the scores are the plain dot product within DAMPING_TOLERANCE
    damping_dominated: bool = False
    # the seed-aware interval (training seeds resampled too: another draw of the seeds), PERCENT; None below
    # MIN_SEEDS_FOR_SEED_INTERVAL seeds, where it is not claimed
    seed_ci_low: float | None = None
    seed_ci_high: float | None = None
    selected_on: str = "plain"  # which LDS chose c (lds.selection)

    def to_json(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["lambda_scale"] = record.pop("lambda_")
        record["lambda"] = record.pop("lambda_absolute")
        record["per_seed"] = list(record["per_seed"])
        record["centred_per_seed"] = list(record["centred_per_seed"])
        if record["members"]:
            record["members"] = [dict(member) for member in record["members"]]
        else:
            record.pop("members")
        return record


@dataclass(frozen=True)
class PairedDifference:
    """mean LDS(a) - mean LDS(b) with its paired 95% CI (the same queries, subsets and seeds for both), PERCENT."""

    a: str
    b: str
    query_set: str
    diff: float
    ci_low: float
    ci_high: float
    per_seed: tuple[float, ...] = ()
    interval: str = INTERVAL
    # the seed-aware paired interval (seeds resampled too), from MIN_SEEDS_FOR_SEED_INTERVAL seeds on
    seed_ci_low: float | None = None
    seed_ci_high: float | None = None
    # the same difference on the centred LDS (shared subset ranking removed), same draws; None when not computed
    centred_diff: float | None = None
    centred_ci_low: float | None = None
    centred_ci_high: float | None = None

    @property
    def resolved(self) -> bool:
        """The interval excludes zero: the difference survives the queries and the subsets (for the seeds that
        were trained)."""
        return self.ci_low > 0 or self.ci_high < 0

    @property
    def seed_resolved(self) -> bool | None:
        """The seed-aware interval excludes zero (it survives another draw of the seeds); None where not claimed."""
        if self.seed_ci_low is None or self.seed_ci_high is None:
            return None
        return self.seed_ci_low > 0 or self.seed_ci_high < 0

    @property
    def centred_resolved(self) -> bool | None:
        if self.centred_ci_low is None or self.centred_ci_high is None:
            return None
        return self.centred_ci_low > 0 or self.centred_ci_high < 0

    def to_json(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "per_seed": list(self.per_seed),
            "resolved": self.resolved,
            "seed_resolved": self.seed_resolved,
            "centred_resolved": self.centred_resolved,
        }


@dataclass(frozen=True)
class SharedFactorRecord:
    """How much of a query set's LDS one subset ranking can explain, PERCENT: ``factor_share`` (the standardised
    losses' first principal component), and the query-agnostic ceiling (each query predicted by the other queries'
    mean standardised loss) with its interval, on the queries and subsets of ``lambda_selection``'s records
    (heldout: the report half; oracle: all)."""

    query_set: str
    lambda_selection: str
    factor_share: float
    ceiling: float
    ceiling_ci_low: float
    ceiling_ci_high: float
    num_subsets: int
    num_queries: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CentredLDS:
    """The centred LDS of one prediction matrix (fractions): its two-way interval on the centred seed-averaged
    ground truth, the point against each seed's centred ground truth, and the query-averaged prediction's LDS."""

    interval: BootstrapInterval
    per_seed: tuple[float, ...]
    query_averaged: float


def _record(
    method: str,
    query_set: str,
    result: SeedSpread,
    lambda_: Lambda,
    lambda_selection: str,
    num_subsets: int,
    lambda_unit: float | None,
    grid: Sequence[float],
    heldout_mode: str,
    centred: CentredLDS | None,
    num_train: int,
) -> LDSRecord:
    return LDSRecord(
        method=method,
        query_set=query_set,
        lds=_percent(result.averaged.estimate),
        # the bias correction shifts the interval; a mean Spearman stays within [-100, 100]
        ci_low=max(-100.0, _percent(result.low)),
        ci_high=min(100.0, _percent(result.high)),
        lambda_=lambda_,
        lambda_selection=lambda_selection,
        num_subsets=num_subsets,
        num_queries=result.averaged.num_queries,
        num_undefined=result.averaged.num_undefined,
        lambda_absolute=None if lambda_ is None or lambda_unit is None else lambda_ * lambda_unit,
        edge=grid_edge(lambda_, grid),
        heldout_mode=heldout_mode,
        per_seed=tuple(_percent(value) for value in result.per_seed),
        bias=_percent(result.averaged.bias),
        centred=None if centred is None else _percent(centred.interval.estimate),
        centred_ci_low=None if centred is None else max(-100.0, _percent(centred.interval.corrected_low)),
        centred_ci_high=None if centred is None else min(100.0, _percent(centred.interval.corrected_high)),
        centred_per_seed=() if centred is None else tuple(_percent(value) for value in centred.per_seed),
        query_averaged=None if centred is None else _percent(centred.query_averaged),
        damping_dominated=damping_dominated(lambda_, num_train),
        seed_ci_low=max(-100.0, _percent(result.seed_low)) if result.seed_interval else None,
        seed_ci_high=min(100.0, _percent(result.seed_high)) if result.seed_interval else None,
    )


def damping_dominated(lambda_: Lambda, num_train: int) -> bool:
    """True when c >= N (:data:`DAMPING_DOMINATED_C_PER_TRAIN` x N): the method is its features' plain dot product
    within :data:`DAMPING_TOLERANCE`. Methods without a lambda are never flagged."""
    return lambda_ is not None and lambda_ >= DAMPING_DOMINATED_C_PER_TRAIN * num_train


def _rows_and_columns(
    matrix: np.ndarray, subsets: np.ndarray | None, queries: ArrayLike | None
) -> np.ndarray:
    """``matrix[..., subsets, queries]`` for an (R x) M x Q array (None: all)."""
    if subsets is not None:
        matrix = np.take(matrix, subsets, axis=-2)
    if queries is not None:
        matrix = np.take(matrix, np.asarray(queries), axis=-1)
    return matrix


def centred_lds(predicted: ArrayLike, losses_by_seed: ArrayLike, num_resamples: int, seed: int) -> CentredLDS:
    """The centred LDS of predictions (M x Q) against R x M x Q losses, on exactly these subsets and queries (the
    centring sees no others): the seed-averaged losses and the predictions both centred
    (:func:`das_lightning.evaluation.shared_factor.remove_shared_factor`), the two-way interval of
    :data:`INTERVAL` on them (the centring is computed once, not per replicate), and each seed's centred LDS."""
    predicted = np.asarray(predicted, dtype=np.float64)
    by_seed = np.asarray(losses_by_seed, dtype=np.float64)
    centred_predicted = remove_shared_factor(predicted)
    identity = np.eye(len(predicted))  # predictions stand in for scores: g = I @ g
    interval = two_way_bootstrap(
        centred_predicted.T,
        identity,
        remove_shared_factor(by_seed.mean(axis=0)),
        num_resamples,
        seed,
        scheme=_scheme(len(predicted)),
    )
    per_seed = tuple(
        nanmean_with_count(
            lds_from_predictions(_as_tensor(centred_predicted), _as_tensor(remove_shared_factor(losses)))
        )[0]
        for losses in by_seed
    )
    averaged = by_seed.mean(axis=0)
    agnostic, _ = nanmean_with_count(
        lds_from_predictions(_as_tensor(query_averaged(predicted)), _as_tensor(averaged))
    )
    return CentredLDS(interval, per_seed, agnostic)


def shared_factor_record(
    query_set: str,
    lambda_selection: str,
    losses_by_seed: ArrayLike,
    num_resamples: int,
    seed: int,
) -> SharedFactorRecord:
    """The factor share and the query-agnostic ceiling of R x M x Q losses (already restricted to the reported
    subsets and queries), percent."""
    averaged = np.asarray(losses_by_seed, dtype=np.float64).mean(axis=0)
    ceiling = two_way_bootstrap(
        leave_one_query_out(averaged).T,
        np.eye(len(averaged)),
        averaged,
        num_resamples,
        seed,
        scheme=_scheme(len(averaged)),
    )
    return SharedFactorRecord(
        query_set=query_set,
        lambda_selection=lambda_selection,
        factor_share=_percent(factor_share(averaged)),
        ceiling=_percent(ceiling.estimate),
        ceiling_ci_low=max(-100.0, _percent(ceiling.corrected_low)),
        ceiling_ci_high=min(100.0, _percent(ceiling.corrected_high)),
        num_subsets=averaged.shape[0],
        num_queries=averaged.shape[1],
    )


def shared_factor_records(
    query_set: str,
    losses_by_seed: ArrayLike,
    halves: Any,
    num_resamples: int,
    seed: int,
) -> list[SharedFactorRecord]:
    """:func:`shared_factor_record` on the report half (``heldout``) and on everything (``oracle``)."""
    by_seed = np.asarray(losses_by_seed, dtype=np.float64)
    report = _rows_and_columns(by_seed, halves.report_subsets, halves.report_queries)
    return [
        shared_factor_record(query_set, "heldout", report, num_resamples, seed),
        shared_factor_record(query_set, "oracle", by_seed, num_resamples, seed),
    ]


def _by_seed(losses: ArrayLike, losses_by_seed: ArrayLike | None) -> np.ndarray:
    """R x M x Q losses: ``losses_by_seed``, or the one ``losses`` matrix as R = 1; they must agree."""
    if losses_by_seed is None:
        return np.asarray(losses, dtype=np.float64)[None]
    by_seed = np.asarray(losses_by_seed, dtype=np.float64)
    if by_seed.ndim != 3 or by_seed.shape[1:] != np.shape(losses):
        raise ValueError(f"losses_by_seed must be R x {np.shape(losses)}, got {by_seed.shape}")
    return by_seed


def _scheme(num_subsets: int) -> str:
    """Half-sampling draws M/2 distinct subsets per replicate; below MIN_SUBSETS (tests, tiny demos) that is too few
    for a Spearman, so those fall back to the bootstrap with replacement (and the report warns)."""
    return "half" if num_subsets >= MIN_SUBSETS else "replacement"


def reported_lds(
    scores: ArrayLike,
    masks: ArrayLike,
    losses_by_seed: ArrayLike,
    num_resamples: int,
    seed: int,
    query_indices: ArrayLike | None = None,
) -> SeedSpread:
    """The LDS as every table reports it: point estimate, per-seed values and :data:`INTERVAL` (fractions)."""
    return seed_spread_lds(
        scores,
        masks,
        losses_by_seed,
        num_resamples,
        seed,
        scheme=_scheme(len(masks)),
        query_indices=query_indices,
    )


def evaluate_method(
    scores_by_lambda: Mapping[Lambda, ArrayLike],
    masks: ArrayLike,
    losses: ArrayLike,
    method: str,
    query_set: str,
    num_resamples: int = 1000,
    seed: int = 0,
    lambda_unit: float | None = None,
    heldout: str = "queries",
    members: Sequence[Mapping[str, Any]] = (),
    losses_by_seed: ArrayLike | None = None,
    num_train: int | None = None,
    selection: str = "plain",
) -> list[LDSRecord]:
    """The two LDS figures of a method, in percent: ``[heldout, oracle]``, each with its centred LDS and its
    query-averaged prediction's LDS at the same c on the same queries and subsets. ``selection`` (``lds.selection``)
    says which LDS chooses c: ``plain`` (default: the protocol's, so the centred figure describes the score matrix
    the plain one does) or ``centred``.

    heldout: lambda chosen on the selection half of :func:`heldout_halves` (``heldout`` mode), LDS (+ CI) on the
    report half. oracle: lambda with the best LDS on all queries and subsets, LDS (+ CI) on all of them.
    A method without lambda passes ``{None: scores}``; with nothing to choose, its heldout record is simply the LDS on
    the report half, so every row of a table compares methods on the same queries (and subsets).
    ``losses`` (M x Q) chooses lambda; ``losses_by_seed`` (R x M x Q, whose mean is ``losses``) gives the per-seed
    values (None: one seed). ``num_train`` (N, for the damping-dominated flag): default the masks' columns.
    """
    by_seed = _by_seed(losses, losses_by_seed)
    num_train = np.shape(masks)[1] if num_train is None else num_train
    num_subsets, num_queries = np.shape(losses)
    halves = heldout_halves(num_queries, num_subsets, heldout, seed)
    grid = [key for key in scores_by_lambda if key is not None]
    selection_masks, selection_losses = subset_rows(masks, losses, halves.selection_subsets)
    heldout_lambda = select_lambda(
        scores_by_lambda, selection_masks, selection_losses, halves.selection_queries, selection
    )
    oracle_lambda = select_lambda(scores_by_lambda, masks, losses, None, selection)
    report_masks, _ = subset_rows(masks, losses, halves.report_subsets)
    report_by_seed = seed_subset_rows(by_seed, halves.report_subsets)
    heldout_result = reported_lds(
        scores_by_lambda[heldout_lambda],
        report_masks,
        report_by_seed,
        num_resamples,
        seed,
        halves.report_queries,
    )
    oracle = reported_lds(scores_by_lambda[oracle_lambda], masks, by_seed, num_resamples, seed)
    heldout_centred = centred_lds(
        _rows_and_columns(
            predictions(scores_by_lambda[heldout_lambda], report_masks).numpy(), None, halves.report_queries
        ),
        _rows_and_columns(report_by_seed, None, halves.report_queries),
        num_resamples,
        seed,
    )
    oracle_centred = centred_lds(
        predictions(scores_by_lambda[oracle_lambda], masks).numpy(), by_seed, num_resamples, seed
    )
    member_records = tuple(dict(member) for member in members)
    records = [
        _record(
            method,
            query_set,
            heldout_result,
            heldout_lambda,
            "heldout",
            len(report_masks),
            lambda_unit,
            grid,
            heldout,
            heldout_centred,
            num_train,
        ),
        _record(
            method,
            query_set,
            oracle,
            oracle_lambda,
            "oracle",
            num_subsets,
            lambda_unit,
            grid,
            heldout,
            oracle_centred,
            num_train,
        ),
    ]
    return [dataclasses.replace(record, members=member_records, selected_on=selection) for record in records]


def paired_difference(
    a: str,
    scores_a: ArrayLike,
    b: str,
    scores_b: ArrayLike,
    masks: ArrayLike,
    losses: ArrayLike,
    query_set: str,
    num_resamples: int = 1000,
    seed: int = 0,
    query_indices: ArrayLike | None = None,
    losses_by_seed: ArrayLike | None = None,
) -> PairedDifference:
    """LDS(a) - LDS(b) with the paired :data:`INTERVAL` (same queries, subsets and seeds for both), percent, and
    the same difference on the centred LDS (each side centred on these queries and subsets alone)."""
    by_seed = _by_seed(losses, losses_by_seed)
    spread = seed_spread_difference(
        scores_a,
        scores_b,
        masks,
        by_seed,
        num_resamples,
        seed,
        scheme=_scheme(len(masks)),
        query_indices=query_indices,
    )
    centred_a, centred_b = (
        remove_shared_factor(_rows_and_columns(predictions(scores, masks).numpy(), None, query_indices))
        for scores in (scores_a, scores_b)
    )
    centred = paired_two_way_difference(
        centred_a.T,
        centred_b.T,
        np.eye(len(centred_a)),
        remove_shared_factor(_rows_and_columns(by_seed, None, query_indices).mean(axis=0)),
        num_resamples,
        seed,
        scheme=_scheme(len(masks)),
    )
    return PairedDifference(
        a,
        b,
        query_set,
        _percent(spread.averaged.estimate),
        max(-200.0, _percent(spread.low)),
        min(200.0, _percent(spread.high)),
        tuple(_percent(value) for value in spread.per_seed),
        seed_ci_low=max(-200.0, _percent(spread.seed_low)) if spread.seed_interval else None,
        seed_ci_high=min(200.0, _percent(spread.seed_high)) if spread.seed_interval else None,
        centred_diff=_percent(centred.estimate),
        centred_ci_low=max(-200.0, _percent(centred.corrected_low)),
        centred_ci_high=min(200.0, _percent(centred.corrected_high)),
    )


def _format_interval(value: float, low: float, high: float) -> str:
    return f"{value:.2f} [{low:.2f}, {high:.2f}]"


def _optional_interval(value: float | None, low: float | None, high: float | None) -> str:
    return "-" if value is None or low is None or high is None else _format_interval(value, low, high)


def markdown_table(
    records: Sequence[LDSRecord],
    differences: Sequence[PairedDifference] = (),
    shared: Sequence[SharedFactorRecord] = (),
) -> str:
    """A markdown table of the records (plain and centred LDS % with 95% CI, the query-averaged prediction's LDS),
    one of the query-agnostic baselines per query set (``shared``) and one of the paired differences, plain and
    centred."""
    several_seeds = any(len(record.per_seed) > 1 for record in records)
    seed_aware = any(record.seed_ci_low is not None for record in records)
    seeds_header = (" per seed (%) |" if several_seeds else "") + (" seed-aware CI |" if seed_aware else "")
    lines = [
        f"| method | query set | lambda selection | c (lambda) | LDS (%) [95% CI] |{seeds_header} "
        "centred LDS (%) [95% CI] | query-averaged (%) | subsets | queries |",
        "|---|---|---|---|---|---|---|---|---|"
        + ("---|" if several_seeds else "")
        + ("---|" if seed_aware else ""),
    ]
    edges, dominated = [], []
    for record in records:
        lambda_text = "-" if record.lambda_ is None else f"{record.lambda_:g}"
        if record.lambda_absolute is not None:
            lambda_text += f" ({record.lambda_absolute:.3g})"
        if record.edge is not None:
            lambda_text += " *"
            edges.append(f"{record.method}/{record.query_set}/{record.lambda_selection}: {record.edge} edge")
        if record.damping_dominated:
            lambda_text += " †"
            dominated.append(f"{record.method}/{record.query_set}/{record.lambda_selection}")
        queries = f"{record.num_queries}" + (
            f" ({record.num_undefined} undefined)" if record.num_undefined else ""
        )
        per_seed = f" {', '.join(f'{value:.2f}' for value in record.per_seed)} |" if several_seeds else ""
        if seed_aware:
            per_seed += (
                " - |"
                if record.seed_ci_low is None
                else f" [{record.seed_ci_low:.2f}, {record.seed_ci_high:.2f}] |"
            )
        agnostic = "-" if record.query_averaged is None else f"{record.query_averaged:.2f}"
        lines.append(
            f"| {record.method} | {record.query_set} | {record.lambda_selection} | {lambda_text} | "
            f"{_format_interval(record.lds, record.ci_low, record.ci_high)} |{per_seed} "
            f"{_optional_interval(record.centred, record.centred_ci_low, record.centred_ci_high)} | {agnostic} | "
            f"{record.num_subsets} | {queries} |"
        )
    lines.append("")
    lines.append(
        f"95% CI: {INTERVAL}. c: lambda in units of trace(K)/N (das_lightning/lambdas.py), chosen on the plain LDS; "
        "the centred LDS is the same scores at the same c with the subset ranking shared by all queries removed "
        "from losses and predictions, and query-averaged is the LDS of the method's one ranking for all queries "
        "(das_lightning/evaluation/shared_factor.py)."
        + (
            " * selection on an edge of the grid, the optimum may lie beyond (widen method.lambda_scales): "
            + "; ".join(edges)
            + "."
            if edges
            else " No selection is on an edge of the grid."
        )
        + (
            f" † damping-dominated, {DAMPING_TOLERANCE}: the plain dot product of the features: "
            + "; ".join(dominated)
            + "."
            if dominated
            else " No selection is damping-dominated."
        )
    )
    if shared:
        lines += [
            "",
            "How much one subset ranking for all queries explains (query-agnostic baselines):",
            "",
            "| query set | as the records | first factor's share of variance (%) | ceiling: other queries' mean "
            "loss (%) [95% CI] | subsets | queries |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {row.query_set} | {row.lambda_selection} | {row.factor_share:.1f} | "
            f"{_format_interval(row.ceiling, row.ceiling_ci_low, row.ceiling_ci_high)} | {row.num_subsets} | "
            f"{row.num_queries} |"
            for row in shared
        ]
    if differences:
        seeded = any(d.seed_ci_low is not None for d in differences)

        def seed_cell(d: PairedDifference) -> str:
            if not seeded:
                return ""
            if d.seed_ci_low is None:
                return " - |"
            return f" [{d.seed_ci_low:.2f}, {d.seed_ci_high:.2f}] {'yes' if d.seed_resolved else 'no'} |"

        lines += [
            "",
            "| a | b | query set | LDS(a) - LDS(b) (%) [95% paired CI] | resolved |"
            + (" seed-aware CI, resolved |" if seeded else "")
            + " centred LDS(a) - LDS(b) (%) [95% paired CI] | resolved |",
            "|---|---|---|---|---|---|---|" + ("---|" if seeded else ""),
        ]
        lines += [
            f"| {d.a} | {d.b} | {d.query_set} | {_format_interval(d.diff, d.ci_low, d.ci_high)} | "
            f"{'yes' if d.resolved else 'no'} |{seed_cell(d)} "
            f"{_optional_interval(d.centred_diff, d.centred_ci_low, d.centred_ci_high)} | "
            f"{'-' if d.centred_resolved is None else ('yes' if d.centred_resolved else 'no')} |"
            for d in differences
        ]
    return "\n".join(lines) + "\n"


def snr_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """SNR-LDS rows (``lds.snr_zeta``) as their own table, titled with its label and rule: never an LDS column.

    A method the author rule refused (a squared readout without its signed scores) has a row that says so, and the
    reason below the table."""
    from das_lightning.evaluation.snr_lds import SNR_RULES

    if not rows:
        return ""
    rule = rows[0].get("rule", "stored")
    lines = [
        "",
        f"{rows[0]['label']}, zeta = {rows[0]['zeta']:g}, rule = {rule} ({SNR_RULES.get(rule, 'unknown')}):",
        "",
        "| method | query set | SNR-LDS (%) | LDS on the valid queries (%) | valid | fit failed | empty | "
        "rows kept (median) | fitted on |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    refusals = []
    for row in rows:
        if "refused" in row:
            lines.append(f"| {row['method']} | {row['query_set']} | refused | - | - | - | - | - | - |")
            refusals.append(f"- {row['method']}, {row['query_set']}: {row['refused']}")
            continue
        lines.append(
            f"| {row['method']} | {row['query_set']} | {row['snr_lds']:.2f} | {row['full_lds_on_valid']:.2f} | "
            f"{row['num_valid']} of {row['num_queries']} | {row['num_fit_failed']} | {row['num_empty']} | "
            f"{row['median_rows_kept']:g} | {row.get('fit_on', 'stored scores')} |"
        )
    if refusals:
        lines += ["", *refusals]
    return "\n".join(lines) + "\n"


def plot_lds_vs_lambda(
    curves: Mapping[str, Mapping[float, float]], path: Path, selected: Mapping[str, float] | None = None
) -> None:
    """PNG of LDS against lambda (log x axis), one line per method. ``curves`` are fractions as returned by
    :func:`lds_by_lambda`; the plot shows percent. Entries with lambda None are skipped. ``selected`` (method -> c,
    the held-out selection) is marked with a star on its curve; dotted lines mark the grid's first and last c, so a
    selection on an edge shows as a star on a dotted line."""
    import matplotlib

    matplotlib.use("Agg")  # no display on compute nodes
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    try:
        edges: set[float] = set()
        for method, curve in curves.items():
            points = sorted((lambda_, lds) for lambda_, lds in curve.items() if lambda_ is not None)
            if not points:
                continue
            lambdas, values = zip(*points, strict=True)
            edges.update((lambdas[0], lambdas[-1]))
            (line,) = axis.plot(
                lambdas, [_percent(value) for value in values], marker="o", markersize=3, label=method
            )
            chosen = (selected or {}).get(method)
            if chosen is not None and chosen in curve:
                axis.plot(
                    [chosen],
                    [_percent(curve[chosen])],
                    marker="*",
                    markersize=14,
                    color=line.get_color(),
                    markeredgecolor="black",
                    linestyle="none",
                )
        for edge in sorted(edges):
            axis.axvline(edge, color="grey", linestyle=":", linewidth=1)
        axis.set_xscale("log")
        axis.set_xlabel("c = lambda / (trace(K) / N)   (star: held-out selection; dotted: grid edges)")
        axis.set_ylabel("LDS (%)")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
        figure.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_save(Path(path), lambda tmp: figure.savefig(tmp, dpi=120))
    finally:
        plt.close(figure)
