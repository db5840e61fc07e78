"""Similarity baselines: cosine (or dot) similarity of gradient features, raw pixels or CLIP embeddings."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from das_lightning.attribution.context import ScoringContext, flat_pixels
from das_lightning.attribution.methods.base import Method, MethodScores, register
from das_lightning.attribution.ranking import cosine_scores, dot_scores
from das_lightning.attribution.settings import GradientSimilaritySettings, SimilaritySettings
from das_lightning.clip import clip_embeddings, load_local_clip
from das_lightning.errors import ConfigError

SIMILARITIES: dict[str, Callable[..., np.ndarray]] = {
    "cosine": cosine_scores,
    "dot": dot_scores,
}


class SimilarityMethod(Method):
    """Scores are similarities (``method.similarity``: cosine or dot); no lambda."""

    settings_class = SimilaritySettings

    def validate(self) -> None:
        if self.settings.similarity not in SIMILARITIES:
            raise ConfigError(
                f"method.similarity must be one of {sorted(SIMILARITIES)}, not {self.settings.similarity!r}"
            )

    def similarity(self) -> Callable[..., np.ndarray]:
        return SIMILARITIES[self.settings.similarity]


@register("grad_cos")
class GradientSimilarity(SimilarityMethod):
    """Similarity of the gradient features (the gradient-cosine baseline)."""

    settings_class = GradientSimilaritySettings

    def scores(self, context: ScoringContext, query_set: str) -> MethodScores:
        train = context.train_store().features
        queries = context.query_store(query_set).features
        scores = self.similarity()(
            queries, train, mask=context.mask(query_set), block_size=self.settings.block_size
        )
        return MethodScores({None: scores})


@register("pixel")
class PixelSimilarity(SimilarityMethod):
    """Similarity of raw pixels."""

    needs_features = False

    def scores(self, context: ScoringContext, query_set: str) -> MethodScores:
        inputs = context.inputs
        return MethodScores(
            {
                None: self.similarity()(
                    flat_pixels(inputs.query_sets[query_set]), flat_pixels(inputs.train_set)
                )
            }
        )


@register("clip")
class CLIPSimilarity(SimilarityMethod):
    """Similarity of CLIP image embeddings (the model from the local Hugging Face cache)."""

    needs_features = False

    def check_available(self) -> None:
        load_local_clip(self.settings.clip_model)

    def scores(self, context: ScoringContext, query_set: str) -> MethodScores:
        queries = clip_embeddings(context.inputs.query_sets[query_set], self.settings.clip_model)
        return MethodScores({None: self.similarity()(queries, context.clip_train_embeddings())})
