"""Kernel scores of one lambda through the production path (scores.kernel_scores with a method's readout), for
tests that compare them with their definitions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from das_lightning.attribution.kernel_solver import (
    DASReadout,
    InnerProduct,
    RelativeInfluence,
    kernel_scores,
    summed_steps,
)
from das_lightning.attribution.rows import normalized_rows


def sweep(
    kind: str,
    queries: Any,
    train: Any,
    lambdas: Sequence[float],
    residuals: Any = None,
    leverage: bool = True,
    square: bool = True,
    train_psi: Any = None,
    **options: Any,
) -> dict[float, np.ndarray]:
    """{lambda: scores} of the kernel method ``kind`` as its entry in attribution/methods/kernel.py computes them."""
    if kind == "renorm":
        queries, train = normalized_rows(queries), normalized_rows(train)
    if kind == "journey_trak":
        queries = summed_steps(queries)
    if kind == "das":
        readout = DASReadout(residuals, leverage, square, exact=train_psi is not None)
    elif kind == "relatif":
        readout = RelativeInfluence()
    else:
        readout = InnerProduct()
    return kernel_scores(queries, train, lambdas, readout, train_psi=train_psi, **options)


def das(queries, train, lam, residuals=None, leverage=True, square=True, **options) -> np.ndarray:
    return sweep("das", queries, train, [lam], residuals, leverage, square, **options)[float(lam)]


def trak(queries, train, lam, **options) -> np.ndarray:
    return sweep("trak", queries, train, [lam], **options)[float(lam)]


def relatif(queries, train, lam, **options) -> np.ndarray:
    return sweep("relatif", queries, train, [lam], **options)[float(lam)]


def renorm(queries, train, lam, **options) -> np.ndarray:
    return sweep("renorm", queries, train, [lam], **options)[float(lam)]


def journey_trak(steps, train, lam, **options) -> np.ndarray:
    return sweep("journey_trak", steps, train, [lam], **options)[float(lam)]


SINGLE = {"das": das, "trak": trak, "relatif": relatif, "renorm": renorm}
