"""Regularisation on the features' own scale: lambda = c * unit, with unit = trace(Phi^T Phi) / N.

The unit is the mean squared norm of the train features, i.e. the mean eigenvalue of the N x N Gram matrix
Phi Phi^T. Multiplying every feature by a constant a multiplies K = Phi^T Phi and the unit by a^2, so
(K + c unit I)^-1 scales by 1/a^2 and every kernel score (phi_q^T (K + lambda I)^-1 phi_i, the leverages, DAS) is
unchanged: the same c means the same regularisation whatever the projector's convention (the dense and sparse
projectors scale by 1/sqrt(k), TRAK's CUDA projector does not), the dimension k or the output function.

The grid of c spans from below the smallest non-negligible eigenvalue of K to above its largest (the largest is at
most trace(K) = N * unit, so c > N is always above it; DAS features put ~99% of the trace in one eigenvalue and the
median eigenvalue near 1e-4 unit). A selection on the first or last grid point means the optimum was not searched:
lds.md says so, and ``method.lambda_scales`` widens the grid.

Downstream of the LDS (grids, top-k, W&B tables, the counterfactual) one c is used: the one the LDS selected on
held-out queries when ``lds.json`` has it for that method and query set, else ``method.lambda_scale``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from das_lightning.manifest import read_json

log = logging.getLogger(__name__)

DEFAULT_LAMBDA_SCALE = 0.01  # c used for pictures before an LDS has selected one (see README, LDS section)
LDS_JSON_VERSION = 2  # version 1 recorded absolute lambdas on the old fixed grid


def default_scale_grid() -> list[float]:
    """c in {1, 2, 5} x 10^e for e in -8..3, ascending: from below DAS's small eigenvalues to above N = 5000."""
    return [float(f"{mantissa}e{exponent}") for exponent in range(-8, 4) for mantissa in (1, 2, 5)]


def grid_edge(scale: float | None, grid: Sequence[float]) -> str | None:
    """ "low" or "high" when ``scale`` is the first or last point of ``grid`` (the optimum may lie beyond)."""
    if scale is None or len(grid) < 2:
        return None
    ordered = sorted(float(value) for value in grid)
    if math.isclose(scale, ordered[0], rel_tol=1e-9):
        return "low"
    if math.isclose(scale, ordered[-1], rel_tol=1e-9):
        return "high"
    return None


@dataclass(frozen=True)
class ChosenScale:
    """The c used downstream of the scores, and where it came from (printed and stored in manifests)."""

    scale: float
    source: str  # "lds.json (held-out selection)" or "method.lambda_scale"

    def describe(self, unit: float | None = None) -> dict[str, object]:
        described: dict[str, object] = {"lambda_scale": self.scale, "source": self.source}
        if unit is not None:
            described["lambda"] = self.scale * unit
        return described


def selected_scale(lds_file: Path, method: str, query_set: str) -> float | None:
    """The c that the LDS selected on held-out queries for ``method`` on ``query_set``, if ``lds_file`` has it."""
    path = Path(lds_file)
    if not path.exists():
        return None
    # written atomically: a file that does not parse was damaged, and ignoring it would change the pictures' c
    document = read_json(path, "delete it and rerun `python evaluate_lds.py` to select lambda again")
    if document.get("version") != LDS_JSON_VERSION:
        log.warning(
            "%s was written with absolute lambdas (version %s); ignoring it", path, document.get("version")
        )
        return None
    for record in document.get("records", []):
        if (
            record.get("method") == method
            and record.get("query_set") == query_set
            and record.get("lambda_selection") == "heldout"
            and record.get("lambda_scale") is not None
        ):
            return float(record["lambda_scale"])
    return None


def choose_scale(lds_file: Path | None, method: str, query_set: str, default: float) -> ChosenScale:
    """The held-out LDS selection when there is one, else ``default`` (``method.lambda_scale``)."""
    selected = None if lds_file is None else selected_scale(lds_file, method, query_set)
    if selected is not None:
        return ChosenScale(selected, f"{lds_file} (held-out selection)")
    return ChosenScale(float(default), "method.lambda_scale")
