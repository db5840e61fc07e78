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
held-out queries (see :mod:`das_lightning.selection`, which reads and writes ``lds.json``), else
``method.lambda_scale``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# c used for pictures before an LDS has selected one (see docs/benchmarks.md, LDS at CPU scale)
DEFAULT_LAMBDA_SCALE = 0.01


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
