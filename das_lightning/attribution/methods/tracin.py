"""TracIn: the sum over training snapshots of lr x query gradient . train gradient (features per snapshot)."""

from __future__ import annotations

from dataclasses import asdict

from das_lightning.artifacts import network_with_snapshot
from das_lightning.attribution.context import ScoringContext
from das_lightning.attribution.features import FeatureSettings
from das_lightning.attribution.methods.base import Method, MethodScores, register
from das_lightning.attribution.ranking import tracin_scores
from das_lightning.errors import MissingArtifactError


@register("tracin")
class TracIn(Method):
    needs_snapshots = True

    def scores(self, context: ScoringContext, query_set: str) -> MethodScores:
        inputs, settings = context.inputs, self.settings
        if not inputs.snapshots:
            raise MissingArtifactError(
                "method=tracin needs weights saved during training: retrain with train.snapshot_every_n_steps=N (>0)"
            )
        terms = []
        for weights_file, lr in inputs.snapshots:
            unet = network_with_snapshot(inputs.model.network, weights_file)
            features = FeatureSettings(
                **{
                    **asdict(settings.features),
                    "name": f"{settings.features.name}-{weights_file.parent.name}",
                }
            )
            train = context.feature_store(features, inputs.train_set, "train", unet, weights_file)
            queries = context.feature_store(
                features, inputs.query_sets[query_set], query_set, unet, weights_file
            )
            terms.append((lr, queries.features, train.features))
        return MethodScores({None: tracin_scores(terms, block_size=settings.block_size)})
