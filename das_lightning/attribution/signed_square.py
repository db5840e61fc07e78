"""The signed-square readout sign(s) x s^2 = s |s| (METHOD.md §7), beside the plain score s and its square s^2.

SNR-LDS reports it as the best readout for EK-FAC influence and FMAS on the DAS authors' CIFAR-2 model: like the
square it stretches the large scores away from the noise-dominated small ones, but unlike the square it keeps
whether keeping a training image raises or lowers the query's measurement. It is a monotone map of s, so it never
reorders the scores of one query: what changes is how a sum of scores over a subset (the LDS prediction) weighs
them.

:class:`SignedSquare` wraps a kernel readout as :class:`~das_lightning.attribution.kernel_solver.Squared` does;
:func:`signed_square` applies the same map to finished scores (EK-FAC's, a numpy array).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

from das_lightning.attribution.kernel_solver import MappedReadout

Scores = TypeVar("Scores", torch.Tensor, np.ndarray)


def signed_square(scores: Scores) -> Scores:
    """s |s| elementwise (sign(s) s^2, written without sign() so that -0.0 and 0 stay 0)."""
    if isinstance(scores, torch.Tensor):
        return scores * scores.abs()
    return np.multiply(scores, np.abs(scores))


class SignedSquare(MappedReadout):
    """Another readout's score s as s |s|: ranks by size within each sign, keeps the sign
    (``method.square=signed_square`` on a kernel method; for DAS it wraps the unsquared ``DASReadout``)."""

    def transform(self, scores: torch.Tensor) -> torch.Tensor:
        return signed_square(scores)
