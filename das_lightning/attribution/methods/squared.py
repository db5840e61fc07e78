"""D-TRAK with DAS's square: (phi_q^T (K + lambda I)^-1 phi_i)^2 on D-TRAK's features.

SNR-LDS measured that squaring a kernel method's scores raises its LDS; this entry separates what DAS's square
does from what its features, leverage and residual do. It is also the README's worked example of adding a method:
this file and conf/method/dtrak_squared.yaml are all it takes."""

from __future__ import annotations

import torch

from das_lightning.attribution import scores as scoring
from das_lightning.attribution.context import ScoringContext
from das_lightning.attribution.methods.base import register
from das_lightning.attribution.methods.kernel import DTRAK


class Squared(scoring.Readout):
    """Another readout's score, squared (ranks by the size of the change, not its sign)."""

    def __init__(self, inner: scoring.Readout) -> None:
        self.inner = inner
        self.needs_leverage = inner.needs_leverage

    def __call__(self, terms: scoring.BlockTerms) -> torch.Tensor:
        return self.inner(terms).square()


@register("dtrak_squared")
class SquaredDTRAK(DTRAK):
    def readout(self, context: ScoringContext) -> scoring.Readout:
        return Squared(super().readout(context))

    def headers(self) -> tuple[str, str, str]:
        return ("query", "largest change", "smallest change")
