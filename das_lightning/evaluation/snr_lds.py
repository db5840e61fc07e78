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
subsets).

Two rules (``rule``, ``lds.snr_rule``), which differ in what is fitted and in what the mean is over:

- ``author`` (the default; the author's definition): steps 1-4 are made on the SIGNED PRE-SQUARE score s and step 5
  aggregates the method's readout r(s) (s, s^2 or sign(s) s^2, ``method.square``) over the kept rows. A query whose
  fit fails, that keeps no row, or whose SNR-LDS is undefined counts as 0 in the mean, which is over every query
  (the counts still say how many). Where the readout is s, s is the stored score; for sign(s) s^2 it is recovered
  from the stored v as sign(v) sqrt(|v|); a plain square s^2 keeps no sign, so its s must come from elsewhere
  (``fit_scores``; in the LDS stage, :func:`signed_inputs` looks for a score folder of the same method with a linear
  or signed-square readout) and is refused by name without it, as is an ensemble of squared readouts (its stored
  mean of squares is the square of no one signed score).
- ``stored`` (this project's first rule, kept for comparison): steps 1-4 on the stored scores (for a squared
  readout the background of the squares: all >= 0, fitted as a zero-mean density) unless ``fit_scores`` are given,
  and the mean over valid queries only.

Why the author's: the background model (a zero-mean Gaussian with a few strong rows in both tails) describes the
signed score; the squares of a Gaussian are a chi-square with one degree of freedom, whose "sigma" from a zero-mean
fit is not the noise level, so the stored rule keeps a different, much larger set of rows for squared readouts.
Counting empty queries as 0 does not reward a method for having nothing stand out on its hard queries.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from das_lightning.attribution.settings import READOUT_POWERS, readout_power
from das_lightning.errors import ConfigError
from das_lightning.evaluation.lds import lds_from_predictions, nanmean_with_count, predictions
from das_lightning.manifest import FILES_KEY, read_manifest

log = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor

SNR_LDS_LABEL = "SNR-LDS (restricted to rows above a fitted background; not comparable with the LDS)"
DEFAULT_ZETA = 3.0
GRID_POINTS = 101
MAD_TO_SD = 1.4826  # MAD x 1.4826 = standard deviation for a Gaussian
_KDE_CHUNK_ELEMENTS = 1 << 22  # (queries x grid points x train) per chunk of the KDE: 32 MB in float64

FIT_OK = "ok"

# lds.snr_rule: what is fitted and what the mean is over (module docstring)
SNR_RULES = {
    "author": "fitted on the signed pre-square score, the readout aggregated; failed and empty queries count 0",
    "stored": "fitted on the stored scores; the mean over valid queries only",
}
DEFAULT_SNR_RULE = "author"


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

    ``per_query``: (Q,) what ``mean`` averages: the SNR-LDS of the valid queries and, for the others, 0 under the
    author rule, NaN under the stored rule. ``query_status[q]``: "valid", "fit_failed", "empty" or "undefined"
    (module docstring); ``fit.status`` holds the reason of a failed fit. ``mean``: over every query (author) or the
    valid ones (stored). ``full_lds_on_valid``: the ordinary LDS on the valid queries, for context (the two are
    still not comparable as methods' scores: the rows differ per method).
    """

    label: str
    zeta: float
    rule: str
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
            "rule": self.rule,
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


def signed_root(values: ArrayLike) -> torch.Tensor:
    """s from v = sign(s) s^2 (the signed-square readout): sign(v) sqrt(|v|), exactly invertible."""
    values_t = _as_tensor(values)
    return torch.sign(values_t) * values_t.abs().sqrt()


def check_rule(rule: str) -> str:
    if rule not in SNR_RULES:
        raise ConfigError(f"lds.snr_rule must be one of {list(SNR_RULES)}, not {rule!r}")
    return rule


def snr_lds(
    scores: ArrayLike,
    masks: ArrayLike,
    losses: ArrayLike,
    zeta: float = DEFAULT_ZETA,
    fit_scores: ArrayLike | None = None,
    rule: str = DEFAULT_SNR_RULE,
    readout: str = "linear",
) -> SNRLDSResult:
    """SNR-LDS of a score matrix: (Q x N, M x N, M x Q) -> :class:`SNRLDSResult`. NOT comparable with the LDS.

    ``scores`` are the stored scores, the method's ``readout`` ("linear", "square" or "signed_square") of its signed
    score; they are what the kept rows aggregate. ``fit_scores`` (Q x N) are fitted and thresholded instead when
    given. Without them the author rule fits the signed pre-square score recovered from ``scores`` (itself, or
    sign(v) sqrt(|v|) for a signed square) and refuses a plain square, which keeps no sign; the stored rule fits
    ``scores`` (``readout`` unused).
    """
    check_rule(rule)
    if readout not in READOUT_POWERS:
        raise ValueError(f"readout must be one of {list(READOUT_POWERS)}, not {readout!r}")
    scores_t, masks_t, losses_t = _as_tensor(scores), _as_tensor(masks), _as_tensor(losses)
    if fit_scores is not None:
        fitting = _as_tensor(fit_scores)
    elif rule == "stored" or readout == "linear":
        fitting = scores_t
    elif readout == "signed_square":
        fitting = signed_root(scores_t)
    else:
        raise ValueError(
            "a squared readout s^2 keeps no sign: the author rule fits the signed pre-square scores, give them as "
            "fit_scores (or use rule='stored')"
        )
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
    # author: a query where nothing stands out predicts nothing, so it scores 0 and the mean is over every query
    if rule == "author":
        per_query = torch.where(valid, per_query, 0.0)
        mean = float(per_query.mean()) if per_query.numel() else math.nan
    else:
        per_query = torch.where(valid, per_query, torch.nan)
        mean = nanmean_with_count(per_query)[0]
    return SNRLDSResult(
        label=SNR_LDS_LABEL,
        zeta=float(zeta),
        rule=rule,
        mean=mean,
        per_query=per_query,
        query_status=tuple(status),
        selected=selected,
        fit=fit,
        full_lds_on_valid=nanmean_with_count(torch.where(valid, full, torch.nan))[0],
    )


# ----------------------------------------------------------------------------- what the LDS stage fits, per method


class SignUnavailableError(ConfigError):
    """The author rule needs a method's signed pre-square scores and its score folders do not hold them."""


@dataclass(frozen=True)
class SignedInputs:
    """What :func:`snr_lds` needs beside a method's stored scores under the author rule."""

    readout: str  # the method's readout power (its manifest's method.square)
    fit_scores: np.ndarray | None  # the signed pre-square scores where the stored ones cannot give them
    fit_on: str  # where the fitted scores come from, for the report


# a score manifest's keys that may differ between a squared method and its linear sibling
_SIBLING_FREE_KEYS = {
    "method",
    "picture",
    "complete",
    FILES_KEY,
    "lambda_scales",
    "lambdas",
    "spectrum_relative",
}
_SIBLING_FREE_SETTINGS = {"name", "square", "lambda_scales"}


def signed_inputs(
    scores_dir: Path, method: str, query_set: str, scale: float | None, stored: np.ndarray
) -> SignedInputs:
    """The readout of ``method`` (from its score manifest) and, for a plain square, its signed scores at lambda
    scale ``scale`` from a sibling score folder: the same method and model (every scored setting but ``name``,
    ``square`` and the grid) with a linear or signed-square readout whose square reproduces ``stored`` (Q x N).

    Raises :class:`SignUnavailableError`, naming the method and what would work, for a plain square without such a
    sibling and for an ensemble of squared or signed-square readouts (a mean of squares is the square of no one
    signed score)."""
    manifest = read_manifest(Path(scores_dir) / method / query_set) or {}
    settings = manifest.get("method") or {}
    readout = readout_power(settings.get("square", False))  # methods without a readout power are linear
    if readout == "linear":
        return SignedInputs(readout, None, "stored scores")
    if manifest.get("ensemble"):
        raise SignUnavailableError(
            f"SNR-LDS (lds.snr_rule=author) cannot fit method {method!r}: it is an ensemble of {readout} readouts, "
            "whose stored mean of squares is the square of no one signed score; use lds.snr_rule=stored for it"
        )
    if readout == "signed_square":
        return SignedInputs(readout, None, "signed root of the stored scores")
    tried: list[str] = []
    for folder in sorted(path / query_set for path in Path(scores_dir).iterdir() if path.name != method):
        other = read_manifest(folder) if folder.is_dir() else None
        if other is None or not other.get("complete"):
            continue
        other_settings = other.get("method") or {}
        other_readout = readout_power(other_settings.get("square", False))
        if (
            other_readout == "square"
            or other.get("ensemble")
            or _differ(other, manifest, other_settings, settings)
        ):
            continue
        if scale is not None and scale not in (other.get("lambda_scales") or []):
            tried.append(f"{folder.parent.name} (no c = {scale:g} on its grid)")
            continue
        from das_lightning.attribution.pipeline import load_scores, scores_at  # the LDS stage's reader

        stacked, _ = load_scores(folder)
        signed = np.asarray(scores_at(stacked, other, scale), dtype=np.float64)
        if other_readout == "signed_square":
            signed = signed_root(signed).numpy()
        stored64 = np.asarray(stored, dtype=np.float64)
        atol = 1e-4 * float(np.abs(stored64).max(initial=0.0))
        if signed.shape != stored64.shape or not np.allclose(signed**2, stored64, rtol=1e-3, atol=atol):
            tried.append(f"{folder.parent.name} (its square differs from the stored scores)")
            continue
        return SignedInputs(readout, signed, f"signed scores of {folder.parent.name}")
    at_scale = "" if scale is None else f" at c = {scale:g}"
    candidates = f" (tried: {', '.join(tried)})" if tried else ""
    raise SignUnavailableError(
        f"SNR-LDS (lds.snr_rule=author) cannot fit method {method!r}: its readout is a plain square s^2 "
        f"(method.square=square), which keeps no sign, and no score folder under {scores_dir} holds its signed "
        f"scores for {query_set}{at_scale}{candidates}. Score them, e.g. `python attribute.py method={method} "
        f"method.square=linear method.name={method}_signed`, or use lds.snr_rule=stored"
    )


def _differ(
    other: dict[str, Any], manifest: dict[str, Any], other_settings: dict[str, Any], settings: dict[str, Any]
) -> bool:
    """Whether two score manifests differ in more than a sibling may (name, readout, grid)."""
    keys = (set(other) | set(manifest)) - _SIBLING_FREE_KEYS
    if any(other.get(key) != manifest.get(key) for key in keys - {"lambda_unit"}):
        return True
    units = other.get("lambda_unit"), manifest.get("lambda_unit")
    if (units[0] is None) != (units[1] is None) or (
        units[0] is not None and not math.isclose(float(units[0]), float(units[1]), rel_tol=1e-5)
    ):
        return True
    setting_keys = (set(other_settings) | set(settings)) - _SIBLING_FREE_SETTINGS
    return any(other_settings.get(key) != settings.get(key) for key in setting_keys)


def snr_row(
    scores_dir: Path,
    method: str,
    query_set: str,
    scale: float | None,
    scores: np.ndarray,
    masks: ArrayLike,
    losses: ArrayLike,
    zeta: float,
    rule: str,
) -> dict[str, Any]:
    """The LDS stage's SNR-LDS row of one method on one query set (its scores at lambda scale ``scale``): the
    summary, where the fitted scores came from (``fit_on``), or, where the author rule cannot have the signed scores,
    ``refused`` with the reason (logged too: the LDS itself is still reported)."""
    row: dict[str, Any] = {"method": method, "query_set": query_set}
    if rule == "stored":  # the first rule, exactly: the stored scores fitted and aggregated
        return {
            **row,
            **snr_lds(scores, masks, losses, zeta=zeta, rule=rule).summary(),
            "fit_on": "stored scores",
        }
    try:
        signed = signed_inputs(scores_dir, method, query_set, scale, scores)
    except SignUnavailableError as refusal:
        log.warning("%s", refusal)
        return {**row, "label": SNR_LDS_LABEL, "zeta": zeta, "rule": rule, "refused": str(refusal)}
    result = snr_lds(
        scores, masks, losses, zeta=zeta, fit_scores=signed.fit_scores, rule=rule, readout=signed.readout
    )
    return {**row, **result.summary(), "fit_on": signed.fit_on}
