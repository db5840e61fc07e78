"""SNR-LDS: the LDS restricted, per query, to the training rows whose score stands out of a fitted background
(METHOD.md §7; the DAS author's 2026 metric, Jinxu-Lin/SNR-LDS). NOT COMPARABLE WITH THE LDS.

Why: most of a query's N scores are Monte-Carlo noise around zero (METHOD.md §7: the lowest ~30% of rows by |score|
are noise-dominated), and in the full LDS they enter every prediction g_k(q) = sum over kept i of tau(q, i). The
restricted metric asks a different question, "do the rows the method singles out predict the retraining
outcome?", on a different, method-dependent set of rows per query, so its values are not LDS values, are not
comparable across methods as an LDS would be, and must never sit in an LDS column. Every result carries
:data:`SNR_LDS_LABEL`.

Per query (a row of ``scores``, shape contract of :mod:`das_lightning.evaluation.lds`):

1. scale the scores by their root mean square (the rule is scale-free; this only keeps the numbers O(1));
2. a Gaussian KDE of the scores with Silverman's bandwidth h = 0.9 min(sd, IQR/1.34) n^(-1/5), evaluated on 101 points
   in [-w, w] with w = 1.4826 MAD (the MAD about the median, the window centred on ZERO: the background is a
   zero-mean density);
3. least squares fit of log f(x) = A + C x^2 on those points, each residual weighted by f(x) (as the author's code
   does: the window's edges, where the KDE is thinnest and noisiest, count less); the background's
   sigma^2 = -1/(2C). Not deconvolved from the kernel: the fitted sigma is sqrt(sigma_bg^2 + h^2), ~2% high at
   N = 2000;
4. keep the rows with |score| / sigma > zeta (strictly; zeta = 3 by default);
5. SNR-LDS(q) = Spearman over subsets of (sum of the KEPT rows' scores in subset k, -L_k(q)).

Queries are reported in four disjoint groups: ``valid`` (a defined SNR-LDS), ``fit_failed`` (constant or all-zero
scores, zero bandwidth or MAD, C >= 0 or a non-finite fit: the reason is kept per query), ``empty`` (the fit worked
and no row passed zeta) and ``undefined`` (rows were kept but the predictions or losses are constant over the
subsets). The mean is over valid queries only, so the counts must be reported beside it.

``fit_scores`` (optional, same shape) are used for the fit and the selection while ``scores`` are aggregated: for
a squared readout (DAS, sign(s) s^2) fit the signed scores before squaring, as the author does.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from das_lightning.evaluation.lds import lds_from_predictions, nanmean_with_count, predictions

ArrayLike = np.ndarray | torch.Tensor

SNR_LDS_LABEL = "SNR-LDS (restricted to rows above a fitted background; not comparable with the LDS)"
DEFAULT_ZETA = 3.0
GRID_POINTS = 101
MAD_TO_SD = 1.4826  # MAD x 1.4826 = standard deviation for a Gaussian
_KDE_CHUNK_ELEMENTS = 1 << 22  # (queries x grid points x train) per chunk of the KDE: 32 MB in float64

FIT_OK = "ok"


@dataclass(frozen=True)
class BackgroundFit:
    """The zero-mean background fitted to each query's scores: (Q,) tensors in SCORE units, NaN where failed.

    ``status[q]`` is "ok" or the reason of the failure ("constant_scores", "zero_bandwidth", "zero_mad",
    "nonnegative_curvature", "nonfinite_fit").
    """

    sigma: torch.Tensor
    bandwidth: torch.Tensor
    window: torch.Tensor  # half-width w of the fitting window, 1.4826 MAD
    curvature: torch.Tensor  # C of log f = A + C x^2, in units of the rms-scaled scores
    status: tuple[str, ...]

    @property
    def ok(self) -> torch.Tensor:
        """(Q,) bool: the fit succeeded."""
        return torch.tensor([status == FIT_OK for status in self.status], dtype=torch.bool)


def _as_tensor(values: ArrayLike) -> torch.Tensor:
    tensor = values if torch.is_tensor(values) else torch.as_tensor(np.asarray(values))
    return tensor.to(torch.float64)


def _kde_log_density(grid: torch.Tensor, samples: torch.Tensor, bandwidth: torch.Tensor) -> torch.Tensor:
    """Gaussian KDE log-density per row: grid Q x G, samples Q x N, bandwidth (Q,) -> Q x G, in chunks of rows."""
    num_queries, num_points = grid.shape
    num_train = samples.shape[1]
    chunk = max(1, _KDE_CHUNK_ELEMENTS // (num_points * num_train))
    log_density = torch.empty_like(grid)
    for start in range(0, num_queries, chunk):
        rows = slice(start, start + chunk)
        width = bandwidth[rows, None, None]
        distance = (grid[rows, :, None] - samples[rows, None, :]) / width  # q x G x N
        normaliser = math.log(num_train) + torch.log(width[:, :, 0]) + 0.5 * math.log(2.0 * math.pi)
        log_density[rows] = torch.logsumexp(-0.5 * distance.square(), dim=2) - normaliser
    return log_density


def fit_background(scores: ArrayLike) -> BackgroundFit:
    """Fit the zero-mean background of every query's scores (Q x N): see the module docstring, steps 1-3."""
    scores_t = _as_tensor(scores)
    if scores_t.dim() != 2:
        raise ValueError(f"scores must be queries x train, got shape {tuple(scores_t.shape)}")
    num_queries, num_train = scores_t.shape
    if num_train < 2:
        raise ValueError(f"the background fit needs at least 2 training rows, got {num_train}")
    if not torch.isfinite(scores_t).all():
        raise ValueError("scores must be finite")
    rms = scores_t.square().mean(dim=1).sqrt()  # (Q,)
    constant = (scores_t == scores_t[:, :1]).all(dim=1)
    scaled = scores_t / torch.where(rms > 0, rms, 1.0)[:, None]
    sd = scaled.std(dim=1)  # ddof = 1
    quartiles = torch.quantile(
        scaled, torch.tensor([0.25, 0.75], dtype=torch.float64), dim=1
    )  # 2 x Q, linear
    iqr = quartiles[1] - quartiles[0]
    bandwidth = 0.9 * torch.minimum(sd, iqr / 1.34) * num_train ** (-0.2)  # Silverman's rule of thumb
    # the usual median (mean of the two middle values; torch.median returns the lower one)
    median = torch.quantile(scaled, 0.5, dim=1, keepdim=True)
    window = MAD_TO_SD * torch.quantile((scaled - median).abs(), 0.5, dim=1)

    usable = ~constant & (bandwidth > 0) & (window > 0)
    safe_bandwidth = torch.where(usable, bandwidth, 1.0)
    safe_window = torch.where(usable, window, 1.0)
    # the window is centred on zero, not on the median: the background is zero-mean by definition
    grid = (
        torch.linspace(-1.0, 1.0, GRID_POINTS, dtype=torch.float64)[None, :] * safe_window[:, None]
    )  # Q x G
    log_density = _kde_log_density(grid, scaled, safe_bandwidth)
    # weighted least squares of log f = A + C x^2 with weights f (rescaled by max f: the minimiser is unchanged)
    weights = (log_density - log_density.max(dim=1, keepdim=True).values).exp()
    squared = grid.square()
    sum_w, sum_wx, sum_wxx = weights.sum(1), (weights * squared).sum(1), (weights * squared.square()).sum(1)
    sum_wy, sum_wxy = (weights * log_density).sum(1), (weights * squared * log_density).sum(1)
    determinant = sum_w * sum_wxx - sum_wx.square()
    curvature = (sum_w * sum_wxy - sum_wx * sum_wy) / determinant
    sigma_scaled = (-1.0 / (2.0 * curvature)).sqrt()  # NaN when C >= 0
    sigma = sigma_scaled * rms

    status = []
    for query in range(num_queries):
        if bool(constant[query]):
            status.append("constant_scores")
        elif not bandwidth[query] > 0:
            status.append("zero_bandwidth")  # more than half the rows tie (IQR 0)
        elif not window[query] > 0:
            status.append("zero_mad")
        elif not math.isfinite(float(curvature[query])):
            status.append("nonfinite_fit")
        elif curvature[query] >= 0:
            status.append("nonnegative_curvature")
        elif not (math.isfinite(float(sigma[query])) and sigma[query] > 0):
            status.append("nonfinite_fit")
        else:
            status.append(FIT_OK)
    failed = torch.tensor([value != FIT_OK for value in status], dtype=torch.bool)
    nan = torch.tensor(math.nan, dtype=torch.float64)
    return BackgroundFit(
        sigma=torch.where(failed, nan, sigma),
        bandwidth=torch.where(usable, bandwidth * rms, nan),
        window=torch.where(usable, window * rms, nan),
        curvature=torch.where(usable, curvature, nan),
        status=tuple(status),
    )


def select_rows(scores: ArrayLike, fit: BackgroundFit, zeta: float = DEFAULT_ZETA) -> torch.Tensor:
    """Q x N bool: rows with |score| / sigma > zeta (strict); nothing where the fit failed."""
    if not zeta > 0:
        raise ValueError(f"zeta must be positive, got {zeta}")
    scores_t = _as_tensor(scores)
    ratio = scores_t.abs() / fit.sigma[:, None]  # NaN rows (failed fits) compare False
    return (ratio > zeta) & fit.ok[:, None]


@dataclass(frozen=True)
class SNRLDSResult:
    """SNR-LDS, as FRACTIONS (x100 for percent). NOT comparable with the LDS: see ``label``.

    ``per_query``: (Q,) SNR-LDS, NaN unless ``query_status`` is "valid". ``query_status[q]``: "valid",
    "fit_failed", "empty" or "undefined" (module docstring); ``fit.status`` holds the reason of a failed fit.
    ``mean``: over valid queries only. ``full_lds_on_valid``: the ordinary LDS on the same valid queries, for context
    (the two are still not comparable as methods' scores: the rows differ per method).
    """

    label: str
    zeta: float
    mean: float
    per_query: torch.Tensor
    query_status: tuple[str, ...]
    selected: torch.Tensor  # Q x N bool
    fit: BackgroundFit
    full_lds_on_valid: float

    @property
    def num_valid(self) -> int:
        return self.query_status.count("valid")

    @property
    def num_fit_failed(self) -> int:
        return self.query_status.count("fit_failed")

    @property
    def num_empty(self) -> int:
        return self.query_status.count("empty")

    @property
    def num_undefined(self) -> int:
        return self.query_status.count("undefined")

    def summary(self) -> dict[str, object]:
        """What a report prints, in PERCENT, with the counts that must stand beside the mean."""
        selected_counts = self.selected.sum(dim=1)[torch.tensor([s == "valid" for s in self.query_status])]
        return {
            "label": self.label,
            "zeta": self.zeta,
            "snr_lds": 100.0 * self.mean,
            "full_lds_on_valid": 100.0 * self.full_lds_on_valid,
            "num_queries": len(self.query_status),
            "num_valid": self.num_valid,
            "num_fit_failed": self.num_fit_failed,
            "num_empty": self.num_empty,
            "num_undefined": self.num_undefined,
            "fit_failures": dict(Counter(status for status in self.fit.status if status != FIT_OK)),
            "median_rows_kept": float(selected_counts.double().median())
            if selected_counts.numel()
            else math.nan,
        }


def snr_lds(
    scores: ArrayLike,
    masks: ArrayLike,
    losses: ArrayLike,
    zeta: float = DEFAULT_ZETA,
    fit_scores: ArrayLike | None = None,
) -> SNRLDSResult:
    """SNR-LDS of a score matrix: (Q x N, M x N, M x Q) -> :class:`SNRLDSResult`. NOT comparable with the LDS.

    ``fit_scores`` (Q x N, default ``scores``) are fitted and thresholded; ``scores`` are aggregated.
    """
    scores_t, masks_t, losses_t = _as_tensor(scores), _as_tensor(masks), _as_tensor(losses)
    fitting = scores_t if fit_scores is None else _as_tensor(fit_scores)
    if fitting.shape != scores_t.shape:
        raise ValueError(f"fit_scores {tuple(fitting.shape)} and scores {tuple(scores_t.shape)} differ")
    if scores_t.dim() != 2 or masks_t.dim() != 2 or masks_t.shape[1] != scores_t.shape[1]:
        raise ValueError(
            f"scores must be queries x train and masks subsets x train, got {tuple(scores_t.shape)} and "
            f"{tuple(masks_t.shape)}"
        )
    if losses_t.shape != (masks_t.shape[0], scores_t.shape[0]):
        raise ValueError(
            f"losses must be subsets x queries = {(masks_t.shape[0], scores_t.shape[0])}, got {tuple(losses_t.shape)}"
        )
    fit = fit_background(fitting)
    selected = select_rows(fitting, fit, zeta)  # Q x N
    restricted = torch.where(selected, scores_t, 0.0)  # Q x N: the unselected rows contribute nothing
    per_query = lds_from_predictions(
        predictions(restricted, masks_t), losses_t
    )  # (M x N) @ (N x Q) -> M x Q -> (Q,)
    full = lds_from_predictions(predictions(scores_t, masks_t), losses_t)
    status = []
    for query in range(scores_t.shape[0]):
        if fit.status[query] != FIT_OK:
            status.append("fit_failed")
        elif not bool(selected[query].any()):
            status.append("empty")
        elif math.isnan(float(per_query[query])):
            status.append("undefined")
        else:
            status.append("valid")
    valid = torch.tensor([value == "valid" for value in status], dtype=torch.bool)
    per_query = torch.where(valid, per_query, torch.nan)
    return SNRLDSResult(
        label=SNR_LDS_LABEL,
        zeta=float(zeta),
        mean=nanmean_with_count(per_query)[0],
        per_query=per_query,
        query_status=tuple(status),
        selected=selected,
        fit=fit,
        full_lds_on_valid=nanmean_with_count(torch.where(valid, full, torch.nan))[0],
    )
