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
    MIN_SUBSETS,
    SeedSpread,
    seed_spread_difference,
    seed_spread_lds,
)
from das_lightning.evaluation.lambda_selection import (
    heldout_halves,
    seed_subset_rows,
    select_lambda,
    subset_rows,
)
from das_lightning.evaluation.lds import ArrayLike, Lambda
from das_lightning.lambdas import grid_edge
from das_lightning.manifest import atomic_save

log = logging.getLogger(__name__)

INTERVAL = (
    "two-way bootstrap over queries and subsets (half-sampling), bias-corrected, seeds resampled when R > 1"
)


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

    def to_json(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["lambda_scale"] = record.pop("lambda_")
        record["lambda"] = record.pop("lambda_absolute")
        record["per_seed"] = list(record["per_seed"])
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

    @property
    def resolved(self) -> bool:
        """The interval excludes zero: the difference survives the queries, the subsets and the seed."""
        return self.ci_low > 0 or self.ci_high < 0

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "per_seed": list(self.per_seed), "resolved": self.resolved}


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
) -> LDSRecord:
    return LDSRecord(
        method=method,
        query_set=query_set,
        lds=_percent(result.averaged.estimate),
        # the bias correction shifts the interval; a mean Spearman stays within [-100, 100]
        ci_low=max(-100.0, _percent(result.seed_low)),
        ci_high=min(100.0, _percent(result.seed_high)),
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
    )


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
) -> list[LDSRecord]:
    """The two LDS figures of a method, in percent: ``[heldout, oracle]``.

    heldout: lambda chosen on the selection half of :func:`heldout_halves` (``heldout`` mode), LDS (+ CI) on the
    report half. oracle: lambda with the best LDS on all queries and subsets, LDS (+ CI) on all of them.
    A method without lambda passes ``{None: scores}``; with nothing to choose, its heldout record is simply the LDS on
    the report half, so every row of a table compares methods on the same queries (and subsets).
    ``losses`` (M x Q) chooses lambda; ``losses_by_seed`` (R x M x Q, whose mean is ``losses``) gives the per-seed
    values and the seed-aware interval (None: one seed).
    """
    by_seed = _by_seed(losses, losses_by_seed)
    num_subsets, num_queries = np.shape(losses)
    halves = heldout_halves(num_queries, num_subsets, heldout, seed)
    grid = [key for key in scores_by_lambda if key is not None]
    selection_masks, selection_losses = subset_rows(masks, losses, halves.selection_subsets)
    heldout_lambda = select_lambda(
        scores_by_lambda, selection_masks, selection_losses, halves.selection_queries
    )
    oracle_lambda = select_lambda(scores_by_lambda, masks, losses, None)
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
        ),
        _record(method, query_set, oracle, oracle_lambda, "oracle", num_subsets, lambda_unit, grid, heldout),
    ]
    return [dataclasses.replace(record, members=member_records) for record in records]


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
    """LDS(a) - LDS(b) with the paired :data:`INTERVAL` (same queries, subsets and seeds for both), percent."""
    spread = seed_spread_difference(
        scores_a,
        scores_b,
        masks,
        _by_seed(losses, losses_by_seed),
        num_resamples,
        seed,
        scheme=_scheme(len(masks)),
        query_indices=query_indices,
    )
    return PairedDifference(
        a,
        b,
        query_set,
        _percent(spread.averaged.estimate),
        max(-200.0, _percent(spread.seed_low)),
        min(200.0, _percent(spread.seed_high)),
        tuple(_percent(value) for value in spread.per_seed),
    )


def _format_interval(value: float, low: float, high: float) -> str:
    return f"{value:.2f} [{low:.2f}, {high:.2f}]"


def markdown_table(records: Sequence[LDSRecord], differences: Sequence[PairedDifference] = ()) -> str:
    """A markdown table of the records (LDS % with 95% CI) and, if any, one of the paired differences."""
    several_seeds = any(len(record.per_seed) > 1 for record in records)
    seeds_header = " per seed (%) |" if several_seeds else ""
    lines = [
        f"| method | query set | lambda selection | c (lambda) | LDS (%) [95% CI] |{seeds_header} subsets | queries |",
        "|---|---|---|---|---|---|---|" + ("---|" if several_seeds else ""),
    ]
    edges = []
    for record in records:
        lambda_text = "-" if record.lambda_ is None else f"{record.lambda_:g}"
        if record.lambda_absolute is not None:
            lambda_text += f" ({record.lambda_absolute:.3g})"
        if record.edge is not None:
            lambda_text += " *"
            edges.append(f"{record.method}/{record.query_set}/{record.lambda_selection}: {record.edge} edge")
        queries = f"{record.num_queries}" + (
            f" ({record.num_undefined} undefined)" if record.num_undefined else ""
        )
        per_seed = f" {', '.join(f'{value:.2f}' for value in record.per_seed)} |" if several_seeds else ""
        lines.append(
            f"| {record.method} | {record.query_set} | {record.lambda_selection} | {lambda_text} | "
            f"{_format_interval(record.lds, record.ci_low, record.ci_high)} |{per_seed} {record.num_subsets} | "
            f"{queries} |"
        )
    lines.append("")
    lines.append(
        f"95% CI: {INTERVAL}. c: lambda in units of trace(K)/N (das_lightning/lambdas.py)."
        + (
            " * selection on an edge of the grid, the optimum may lie beyond (widen method.lambda_scales): "
            + "; ".join(edges)
            if edges
            else " No selection is on an edge of the grid."
        )
    )
    if differences:
        lines += [
            "",
            "| a | b | query set | LDS(a) - LDS(b) (%) [95% paired CI] | resolved |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {d.a} | {d.b} | {d.query_set} | {_format_interval(d.diff, d.ci_low, d.ci_high)} | "
            f"{'yes' if d.resolved else 'no'} |"
            for d in differences
        ]
    return "\n".join(lines) + "\n"


def snr_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """SNR-LDS rows (``lds.snr_zeta``) as their own table, titled with its label: never an LDS column."""
    if not rows:
        return ""
    lines = [
        "",
        f"{rows[0]['label']}, zeta = {rows[0]['zeta']:g}:",
        "",
        "| method | query set | SNR-LDS (%) | LDS on the same queries (%) | valid | fit failed | empty | rows kept (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {row['method']} | {row['query_set']} | {row['snr_lds']:.2f} | {row['full_lds_on_valid']:.2f} | "
        f"{row['num_valid']} of {row['num_queries']} | {row['num_fit_failed']} | {row['num_empty']} | "
        f"{row['median_rows_kept']:g} |"
        for row in rows
    ]
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
