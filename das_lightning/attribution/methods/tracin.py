"""TracIn: the sum over training snapshots of lr x query gradient . train gradient (features per snapshot)."""

from __future__ import annotations

import copy
from dataclasses import asdict

import numpy as np
import torch
from safetensors.torch import load_file

from das_lightning.attribution import scores as scoring
from das_lightning.attribution.context import ScoringContext
from das_lightning.attribution.features import FeatureSettings
from das_lightning.attribution.methods.base import Method, register
from das_lightning.errors import ConfigError, MissingArtifactError


@register("tracin")
class TracIn(Method):
    needs_snapshots = True

    def scores(self, context: ScoringContext, query_set: str) -> dict[float | None, np.ndarray]:
        inputs, settings = context.inputs, self.settings
        if not inputs.snapshots:
            raise MissingArtifactError(
                "method=tracin needs weights saved during training: retrain with train.snapshot_every_n_steps=N (>0)"
            )
        terms = []
        for weights_file, lr in inputs.snapshots:
            unet = copy_with_weights(inputs.model.network, load_file(str(weights_file)))
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
        return {None: scoring.tracin_scores(terms, block_size=settings.block_size)}


def copy_with_weights(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``unet`` with a snapshot's weights (all of them, or a LoRA run's adapters); every snapshot
    tensor must land on a parameter of the UNet."""
    clone = copy.deepcopy(unet)
    result = clone.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ConfigError(f"snapshot weights do not fit the model: unexpected {result.unexpected_keys[:5]}")
    return clone
