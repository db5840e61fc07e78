"""What a method's entry scores with: the model and its image sets (:class:`AttributionInputs`) and, for one
run of the attribute stage, the feature stores, kernel solvers and candidate masks it shares between query sets
(:class:`ScoringContext`). A method asks the context; it never builds a store or a solver itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from das_lightning.attribution import scores as scoring
from das_lightning.attribution.features import CollectionDevice, FeatureSettings, collect_features
from das_lightning.attribution.settings import MethodSettings
from das_lightning.attribution.store import FeatureStore
from das_lightning.clip import clip_embeddings, dataset_images
from das_lightning.data import ImageDataset
from das_lightning.file_queries import FileQueryDataset
from das_lightning.manifest import hash_file
from das_lightning.models.adapters import MeasuredModel


@dataclass
class AttributionInputs:
    """A trained model and the images to attribute, as the attribute stage sees them.

    The sets stay images (for pictures and pixel baselines); the network sees ``model.model_space(set)`` (latents of
    a latent model) and ``model.extra_inputs(batch)`` (conditioning), see :mod:`das_lightning.models.adapters`.
    """

    model: MeasuredModel
    train_set: ImageDataset
    query_sets: dict[str, ImageDataset]
    features_dir: Path
    scores_dir: Path
    snapshots: list[tuple[Path, float]] = field(default_factory=list)  # (weights file, lr) for TracIn
    journey: dict[str, list[tuple[int, torch.Tensor]]] = field(default_factory=dict)  # set -> [(t, x0_hat)]
    lds_file: Path | None = None  # lds.json of this model: its held-out lambda selection feeds the pictures
    member: str | None = None  # an ensemble member's name (seed<r> or step<N>); None outside ensembles
    queries_of: str | None = (
        None  # another run's generated queries (an ensemble member's): their own store key
    )


def flat_pixels(dataset: ImageDataset) -> np.ndarray:
    return dataset_images(dataset).flatten(1).numpy()


@dataclass
class ScoringContext:
    """One attribute run's shared work: stores and solvers are built once and reused by every query set."""

    inputs: AttributionInputs
    method: MethodSettings
    device: CollectionDevice
    logger: Any
    cache: dict[str, Any] = field(default_factory=dict)

    def feature_store(
        self,
        settings: FeatureSettings,
        dataset: ImageDataset,
        key: str,
        unet: torch.nn.Module | None = None,
        checkpoint_file: Path | None = None,
    ) -> FeatureStore:
        """The finished store of ``settings`` features of ``dataset`` (collected now if it is not finished)."""
        model = self.inputs.model
        checkpoint = Path(checkpoint_file or model.weights_file)
        store = collect_features(
            unet or model.network,
            model.alphas_cumprod,
            model.model_space(dataset),
            hash_file(checkpoint),
            self.inputs.features_dir / settings.name / key,
            settings,
            self.device,
            self.logger,
            extra_inputs=model.extra_inputs,
        )
        return store.require_complete()

    def train_store(self, settings: FeatureSettings | None = None) -> FeatureStore:
        """The training set's features (the method's own unless ``settings`` names others), cached by name."""
        settings = settings or self.method.features
        key = f"train:{settings.name}"
        if key not in self.cache:
            self.cache[key] = self.feature_store(settings, self.inputs.train_set, "train")
        return self.cache[key]

    def query_store(self, query_set: str) -> FeatureStore:
        dataset = self.inputs.query_sets[query_set]
        # file queries: one store per content, so a changed file is featurised afresh, never matched to old rows
        key = f"{query_set}-{dataset.content_id}" if isinstance(dataset, FileQueryDataset) else query_set
        if self.inputs.queries_of is not None and query_set == "generated":
            key = f"generated-of-{self.inputs.queries_of}"  # not this model's own generated images
        return self.feature_store(self.method.features, dataset, key)

    def solver(self, normalized: bool = False) -> scoring.KernelSolver:
        """The factorised kernel of the train features (of their unit-normalised rows with ``normalized``)."""
        key = "solver-normalized" if normalized else "solver"
        if key not in self.cache:
            train = self.train_store().features
            self.cache[key] = scoring.KernelSolver.from_features(
                scoring.normalized_rows(train) if normalized else train, self.method.block_size
            )
        return self.cache[key]

    def mask(self, query_set: str) -> np.ndarray | None:
        """Each query's candidates under ``method.screen_by`` (None: every training image)."""
        method = self.method
        if method.screen_by is None:
            return None
        if method.screen_by == "pixel":
            cheap = scoring.cosine_scores(
                flat_pixels(self.inputs.query_sets[query_set]), flat_pixels(self.inputs.train_set)
            )
        else:
            cheap = scoring.cosine_scores(
                clip_embeddings(self.inputs.query_sets[query_set], method.clip_model),
                self.clip_train_embeddings(),
            )
        return scoring.screen_candidates(cheap, method.screen_top)

    def clip_train_embeddings(self) -> np.ndarray:
        if "clip-train" not in self.cache:
            self.cache["clip-train"] = clip_embeddings(self.inputs.train_set, self.method.clip_model)
        return self.cache["clip-train"]

    def by_scale(self, solver: scoring.KernelSolver, score) -> dict[float, np.ndarray]:
        """{c: scores} from a kernel scorer called with the absolute lambdas c * unit of the method's grid; records
        the unit and the relative spectrum for the score manifest."""
        unit = solver.lambda_unit
        self.cache["lambda_unit"] = unit
        self.cache["spectrum"] = solver.relative_spectrum()
        scales = [float(c) for c in self.method.lambda_scales]
        by_lambda = score([c * unit for c in scales])
        return {c: by_lambda[c * unit] for c in scales}
