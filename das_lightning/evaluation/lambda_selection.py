"""Choosing lambda without looking at the reported queries: held-out halves of the queries (and subsets), the
LDS of every c of a grid, and the c with the best LDS on the selection half (METHOD.md §3)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from das_lightning.errors import ConfigError
from das_lightning.evaluation.lds import (
    ArrayLike,
    Lambda,
    _as_tensor,
    _check_contract,
    _select_queries,
    lds_from_predictions,
    nanmean_with_count,
    predictions,
)
from das_lightning.evaluation.shared_factor import remove_shared_factor
from das_lightning.seeding import derive_seed

HELDOUT_MODES = ("queries", "queries_and_subsets")
# which LDS chooses c: the plain one (the protocol's, the default) or the centred one (evaluation/shared_factor.py)
SELECTION_CRITERIA = ("plain", "centred")


def heldout_split(num_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic random halves of the query positions: (selection_idx, report_idx), each sorted.

    Lambda is chosen on the selection half and the LDS reported on the other, so the reported figure never saw the
    queries it is measured on. With an odd count the report half gets the extra query.
    """
    generator = torch.Generator().manual_seed(derive_seed("lds-heldout-split", seed, num_queries))
    order = torch.randperm(num_queries, generator=generator).numpy()
    half = num_queries // 2
    return np.sort(order[:half]), np.sort(order[half:])


@dataclass(frozen=True)
class HeldoutHalves:
    """Which queries (and subsets) choose lambda and which report the LDS.

    ``queries``: lambda is chosen on half the queries and the LDS reported on the other half, both over all subset
    models: the report is independent of the queries that chose lambda, but shares the subset models (their
    training noise) with the choice. ``queries_and_subsets`` also splits the subsets: choice on half the queries x
    half the subsets, report on the other queries x the other subsets, so it shares nothing but the full model.
    Subset fields are None in the first mode (all subsets on both sides).
    """

    selection_queries: np.ndarray
    report_queries: np.ndarray
    selection_subsets: np.ndarray | None = None
    report_subsets: np.ndarray | None = None


def heldout_halves(num_queries: int, num_subsets: int, mode: str = "queries", seed: int = 0) -> HeldoutHalves:
    """The split of :class:`HeldoutHalves` for ``mode`` (``lds.heldout``)."""
    if mode not in HELDOUT_MODES:
        raise ConfigError(f"lds.heldout must be one of {HELDOUT_MODES}, not {mode!r}")
    selection, report = heldout_split(num_queries, seed)
    if mode == "queries":
        return HeldoutHalves(selection, report)
    if num_subsets < 4:
        raise ConfigError(f"lds.heldout=queries_and_subsets needs at least 4 subsets, got {num_subsets}")
    generator = torch.Generator().manual_seed(derive_seed("lds-heldout-subsets", seed, num_subsets))
    order = torch.randperm(num_subsets, generator=generator).numpy()
    half = num_subsets // 2
    return HeldoutHalves(selection, report, np.sort(order[:half]), np.sort(order[half:]))


def subset_rows(
    masks: ArrayLike, losses: ArrayLike, subsets: np.ndarray | None
) -> tuple[ArrayLike, ArrayLike]:
    """Keep some subsets: rows of masks (M x N -> M' x N) and of losses (M x Q -> M' x Q)."""
    if subsets is None:
        return masks, losses
    return np.asarray(masks)[subsets], np.asarray(losses)[subsets]


def seed_subset_rows(losses_by_seed: ArrayLike, subsets: np.ndarray | None) -> ArrayLike:
    """Keep the same subsets of each training seed's losses (R x M x Q -> R x M' x Q), as :func:`subset_rows`."""
    if subsets is None:
        return losses_by_seed
    return np.asarray(losses_by_seed)[:, subsets]


def lds_by_lambda(
    scores_by_lambda: Mapping[Lambda, ArrayLike],
    masks: ArrayLike,
    losses: ArrayLike,
    query_indices: ArrayLike | None = None,
    criterion: str = "plain",
) -> dict[Lambda, float]:
    """Mean LDS (fraction) of each lambda's score matrix, on ``query_indices`` only (all queries if None).

    The other queries are sliced away before anything is computed, so they cannot influence the result (the
    ``centred`` criterion centres predictions and losses on the kept queries alone).
    """
    if criterion not in SELECTION_CRITERIA:
        raise ConfigError(f"lds.selection must be one of {list(SELECTION_CRITERIA)}, not {criterion!r}")
    masks_t, losses_t = _as_tensor(masks), _as_tensor(losses)
    curve: dict[Lambda, float] = {}
    for lambda_, scores in scores_by_lambda.items():
        scores_t = _as_tensor(scores)
        _check_contract(scores_t, masks_t, losses_t)
        scores_sel, losses_sel = _select_queries(scores_t, losses_t, query_indices)
        predicted = predictions(scores_sel, masks_t)
        if criterion == "centred":
            predicted = _as_tensor(remove_shared_factor(predicted))
            losses_sel = _as_tensor(remove_shared_factor(losses_sel))
        curve[lambda_], _ = nanmean_with_count(lds_from_predictions(predicted, losses_sel))
    return curve


def select_lambda(
    scores_by_lambda: Mapping[Lambda, ArrayLike],
    masks: ArrayLike,
    losses: ArrayLike,
    selection_queries: ArrayLike | None,
    criterion: str = "plain",
) -> Lambda:
    """The lambda with the best mean LDS (``criterion``: plain or centred) on ``selection_queries`` (the smallest
    lambda on a tie; NaN loses)."""
    curve = lds_by_lambda(scores_by_lambda, masks, losses, selection_queries, criterion)
    return max(
        sorted(curve, key=lambda value: -math.inf if value is None else value),
        key=lambda value: -math.inf if math.isnan(curve[value]) else curve[value],
    )
