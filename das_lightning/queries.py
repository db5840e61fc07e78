"""The query sets of an experiment, built the same way by attribute.py and evaluate_lds.py.

``val``: a class-stratified sample of the test split; ``generated``: the full model's DDIM samples. Each set has its
own identity (``set_name``) so the noise rule gives its images noise of their own, the same in features and in the
LDS ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from das_lightning.data import ImageDataset, TensorImageDataset, stratified_sample
from das_lightning.manifest import hash_file
from das_lightning.paths import RunPaths
from das_lightning.seeding import derive_seed
from das_lightning.training import GENERATED_FILE, load_generated_queries

QUERY_SETS = ("val", "generated")


@dataclass
class QuerySettings:
    sets: list[str] = field(default_factory=lambda: list(QUERY_SETS))
    num_val: int = 64
    num_generated: int = 64


def validation_queries(test_set: ImageDataset, count: int) -> ImageDataset:
    count = min(count, len(test_set))
    rng = np.random.default_rng(derive_seed("val-queries", test_set.set_name, count))
    indices = stratified_sample(test_set.labels, count, rng)
    return test_set.take(indices, f"{test_set.set_name}:q{count}")


def generated_queries(paths: RunPaths, count: int, image_size: int) -> ImageDataset:
    """The first ``count`` images the full model generated, each with the class it was conditioned on."""
    images, labels, class_names = load_generated_queries(paths)
    if count > len(images):
        raise ValueError(
            f"{count} generated queries asked for but {paths.queries_dir} holds {len(images)}; "
            "raise generate.num_images when training, or lower queries.num_generated"
        )
    pixels = ((images[:count].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    dataset = TensorImageDataset(
        f"generated:{paths.dataset}/{paths.model}/{paths.tag}/seed{paths.seed}",
        pixels,
        labels[:count].numpy().astype(np.int64),
        class_names,
        image_size,
    )
    # regenerating (other sampler settings, a retrained model) keeps the name: the file hash tells the sets apart
    dataset.content_id = f"{hash_file(paths.queries_dir / GENERATED_FILE)[:32]}:{count}"
    return dataset


def build_query_sets(
    settings: QuerySettings, test_set: ImageDataset, paths: RunPaths
) -> dict[str, ImageDataset]:
    unknown = set(settings.sets) - set(QUERY_SETS)
    if unknown:
        raise ValueError(f"unknown query sets {sorted(unknown)}; choose from {list(QUERY_SETS)}")
    builders = {
        "val": lambda: validation_queries(test_set, settings.num_val),
        "generated": lambda: generated_queries(paths, settings.num_generated, test_set.image_size),
    }
    return {name: builders[name]() for name in settings.sets}
