"""Counterfactual check (METHOD.md §3): remove a generated image's top attributed training images, retrain with the
same recipe and seed, regenerate the image from the same noise, and measure how far it moved. Removing as many
random images is the control; a better attribution moves the image further."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from das_lightning.artifacts import load_finished, load_generated_queries, stored_sampler
from das_lightning.attribution.pipeline import load_scores, scores_at
from das_lightning.clip import clip_image_embeddings, load_local_clip
from das_lightning.lambdas import DEFAULT_LAMBDA_SCALE
from das_lightning.manifest import atomic_write_text
from das_lightning.models.adapters import ModelAdapter
from das_lightning.models.sampling import ddim_sample
from das_lightning.paths import RunPaths
from das_lightning.seeding import derive_seed
from das_lightning.selection import choose_scale, lds_json_path
from das_lightning.training import SubsetSettings, TrainingRecipe

log = logging.getLogger(__name__)


@dataclass
class CounterfactualSettings:
    method: str = "das"
    num_queries: int = 4
    remove_top: int = 100
    clip_model: str = "openai/clip-vit-base-patch32"  # used when it is in the local Hugging Face cache


@dataclass
class CounterfactualResult:
    method: str
    median_l2_top: float
    median_l2_random: float
    l2_top: list[float]
    l2_random: list[float]
    median_clip_cosine_top: float | None = None  # None: no local CLIP model
    median_clip_cosine_random: float | None = None
    lambda_scale: float | None = None  # the c whose top-k were removed (None: a method without lambda)
    lambda_source: str | None = None  # lds.json (held-out selection) or method.lambda_scale


def removal_sets(
    scores: np.ndarray, num_queries: int, remove_top: int, num_train: int
) -> dict[str, list[np.ndarray]]:
    """Per query: its top-``remove_top`` proponents, and as many random training images (the control)."""
    top = [np.argsort(-scores[q], kind="stable")[:remove_top] for q in range(num_queries)]
    random = [
        np.random.default_rng(derive_seed("counterfactual-random", q, remove_top)).choice(
            num_train, remove_top, replace=False
        )
        for q in range(num_queries)
    ]
    return {"top": top, "random": random}


def counterfactual(
    paths: RunPaths, settings: CounterfactualSettings, recipe: TrainingRecipe
) -> CounterfactualResult:
    """Retrain without each query's top-k (and k random) images with the full model's ``recipe`` (its training
    set, seed and settings); pixel L2 between old and new image j. The recipe's adapter loads the retrained models
    for regeneration (default: pixel DDPM; see ``model.adapter``)."""
    train_set = recipe.train_set
    folder = paths.scores_dir / settings.method / "generated"
    stacked, manifest = load_scores(folder)
    # the lambda the LDS selected (held-out) for this method, else the method's own default c
    chosen = None
    if manifest.get("lambda_scales"):
        default = (manifest.get("picture") or {}).get("lambda_scale", DEFAULT_LAMBDA_SCALE)
        chosen = choose_scale(lds_json_path(paths), settings.method, "generated", default)
        log.info("counterfactual: top-k of %s at c = %g (%s)", settings.method, chosen.scale, chosen.source)
    scores = scores_at(stacked, manifest, None if chosen is None else chosen.scale)
    originals, _, _ = load_generated_queries(paths)
    adapter = recipe.adapter or ModelAdapter()
    sampler = stored_sampler(paths)
    count = min(settings.num_queries, len(scores))
    removals = removal_sets(scores, count, settings.remove_top, len(train_set))
    distances: dict[str, list[float]] = {"top": [], "random": []}
    regenerated_images: dict[str, list[torch.Tensor]] = {"top": [], "random": []}
    for variant, removed_per_query in removals.items():
        for query, removed in enumerate(removed_per_query):
            keep = np.setdiff1d(np.arange(len(train_set)), removed)
            run = paths.sibling(
                f"cf-{settings.method if variant == 'top' else 'random'}-q{query}", paths.seed
            )
            # same seed as the full model: the removed images are the only difference
            recipe.run(run, SubsetSettings(kind="custom", indices=keep.tolist(), seed_tag=paths.tag))
            regenerated = ddim_sample(load_finished(run, adapter), 1, sampler, first_index=query).images[0]
            distances[variant].append(float(torch.linalg.vector_norm(regenerated - originals[query])))
            regenerated_images[variant].append(regenerated)
    result = CounterfactualResult(
        settings.method,
        float(np.median(distances["top"])),
        float(np.median(distances["random"])),
        distances["top"],
        distances["random"],
        *_clip_cosines(originals[:count], regenerated_images, settings.clip_model),
        lambda_scale=None if chosen is None else chosen.scale,
        lambda_source=None if chosen is None else chosen.source,
    )
    out = paths.lds_results_dir / f"counterfactual_{settings.method}.json"
    atomic_write_text(Path(out), json.dumps(result.__dict__, indent=2))
    return result


def _clip_cosines(
    originals: torch.Tensor, regenerated: dict[str, list[torch.Tensor]], clip_model: str
) -> tuple[float | None, float | None]:
    """Median CLIP cosine between each original and its regenerated image, per variant; (None, None) offline."""
    try:
        load_local_clip(clip_model)
    except FileNotFoundError:
        return None, None
    reference = clip_image_embeddings(originals, clip_model)
    medians = []
    for variant in ("top", "random"):
        embedded = clip_image_embeddings(torch.stack(regenerated[variant]), clip_model)
        cosine = np.sum(reference * embedded, axis=1) / (
            np.linalg.norm(reference, axis=1) * np.linalg.norm(embedded, axis=1)
        )
        medians.append(float(np.median(cosine)))
    return medians[0], medians[1]
