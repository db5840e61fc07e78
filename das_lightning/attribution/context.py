"""What a method's entry scores with: the model and its image sets (:class:`AttributionInputs`) and, for one
run of the attribute stage, the feature stores, kernel solvers and candidate masks it shares between query sets
(:class:`ScoringContext`). A method asks the context; it never builds a store or a solver itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from das_lightning.attribution.features import CollectionDevice, FeatureSettings, collect_features
from das_lightning.attribution.kernel_solver import KernelSolver
from das_lightning.attribution.ranking import cosine_scores, screen_candidates
from das_lightning.attribution.rows import normalized_rows
from das_lightning.attribution.settings import MethodSettings
from das_lightning.attribution.store import FeatureStore
from das_lightning.clip import clip_embeddings, dataset_images
from das_lightning.data import ImageDataset
from das_lightning.file_queries import FileQueryDataset
from das_lightning.manifest import hash_file
from das_lightning.models.adapters import MeasuredModel

T = TypeVar("T")


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
    """One attribute run's shared work: stores and solvers are built once and reused by every query set.

    What a method computes once per model and reuses across query sets (a solver, residual losses, fitted
    factors) goes through :meth:`shared`; nothing a method computes reaches the pipeline except its
    :class:`~das_lightning.attribution.methods.base.MethodScores`."""

    inputs: AttributionInputs
    method: MethodSettings
    device: CollectionDevice
    logger: Any
    _shared: dict[str, Any] = field(default_factory=dict, repr=False)

    def shared(self, key: str, build: Callable[[], T]) -> T:
        """``build()`` the first time ``key`` is asked for in this run (for this model), the same object after."""
        if key not in self._shared:
            self._shared[key] = build()
        return self._shared[key]

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
        return self.shared(
            f"train:{settings.name}", lambda: self.feature_store(settings, self.inputs.train_set, "train")
        )

    def query_store(self, query_set: str) -> FeatureStore:
        dataset = self.inputs.query_sets[query_set]
        # file queries: one store per content, so a changed file is featurised afresh, never matched to old rows
        key = f"{query_set}-{dataset.content_id}" if isinstance(dataset, FileQueryDataset) else query_set
        if self.inputs.queries_of is not None and query_set == "generated":
            key = f"generated-of-{self.inputs.queries_of}"  # not this model's own generated images
        return self.feature_store(self.method.features, dataset, key)

    def solver(self, normalized: bool = False) -> KernelSolver:
        """The factorised kernel of the train features (of their unit-normalised rows with ``normalized``)."""

        def build() -> KernelSolver:
            train = self.train_store().features
            return KernelSolver.from_features(
                normalized_rows(train) if normalized else train, self.method.block_size
            )

        return self.shared("solver-normalized" if normalized else "solver", build)

    def mask(self, query_set: str) -> np.ndarray | None:
        """Each query's candidates under ``method.screen_by`` (None: every training image)."""
        method = self.method
        if getattr(method, "screen_by", None) is None:
            return None
        if method.screen_by == "pixel":
            cheap = cosine_scores(
                flat_pixels(self.inputs.query_sets[query_set]), flat_pixels(self.inputs.train_set)
            )
        else:
            cheap = cosine_scores(
                clip_embeddings(self.inputs.query_sets[query_set], method.clip_model),
                self.clip_train_embeddings(),
            )
        return screen_candidates(cheap, method.screen_top)

    def clip_train_embeddings(self) -> np.ndarray:
        return self.shared(
            "clip-train", lambda: clip_embeddings(self.inputs.train_set, self.method.clip_model)
        )
