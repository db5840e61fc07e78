"""Journey-TRAK: TRAK summed over the denoising steps of each generated query, each step's feature taken at
its own timestep on the model's prediction of the clean image at that step."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from das_lightning.attribution.context import ScoringContext
from das_lightning.attribution.features import FeatureSettings
from das_lightning.attribution.kernel_solver import kernel_scores, summed_steps
from das_lightning.attribution.methods.base import MethodScores, register
from das_lightning.attribution.methods.kernel import KernelMethod
from das_lightning.attribution.settings import JourneySettings
from das_lightning.data import ModelSpaceDataset
from das_lightning.errors import ConfigError


@register("journey_trak")
class JourneyTRAK(KernelMethod):
    settings_class = JourneySettings
    needs_journey = True
    needs_query_sets = ("generated",)  # only generated images have a denoising trajectory

    def validate(self) -> None:
        if self.settings.journey_steps < 1:
            raise ConfigError(f"method.journey_steps must be at least 1, got {self.settings.journey_steps}")

    def scores(self, context: ScoringContext, query_set: str) -> MethodScores:
        inputs, settings = context.inputs, self.settings
        if query_set not in inputs.journey:
            raise ConfigError(
                f"journey_trak attributes generated queries along their trajectory; {query_set!r} has none"
            )
        dataset = inputs.query_sets[query_set]
        steps = []
        for timestep, predicted_clean in inputs.journey[query_set]:
            features = FeatureSettings(
                **{
                    **asdict(settings.features),
                    # the step's own timestep, whatever the method's sampling of timesteps
                    "timestep_strategy": "explicit",
                    "timesteps": [int(timestep)],
                    "sampling": "grid",
                }
            )
            # already in the network's space (pixels, or latents of a latent model): no encoding on the way in
            state = ModelSpaceDataset(
                f"{dataset.set_name}:journey-t{timestep}",
                predicted_clean,
                dataset.labels,
                dataset.class_names,
            )
            state.content_id = dataset.content_id  # replayed from exactly these generated images
            steps.append(context.feature_store(features, state, f"{query_set}-journey-t{timestep}").features)
        queries = summed_steps(np.stack([np.asarray(step) for step in steps]))
        train = context.train_store().features
        solver = context.solver()
        return self.on_grid(
            solver,
            lambda lambdas: kernel_scores(
                queries, train, lambdas, self.readout(context), solver=solver, block_size=settings.block_size
            ),
        )
