"""The query sets of an experiment, built the same way by attribute.py and evaluate_lds.py.

``val``: a class-stratified sample of the test split; ``generated``: the full model's DDIM samples; ``files``: your
own images (``queries.files=PATH``, see :mod:`das_lightning.file_queries`). Each set has its own identity (``set_name``) so the noise rule gives its images noise of their own, the same in features and in the
LDS ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from das_lightning.artifacts import GENERATED_FILE, load_generated_queries
from das_lightning.data import ImageDataset, TensorImageDataset, stratified_sample
from das_lightning.errors import ConfigError
from das_lightning.file_queries import file_queries
from das_lightning.manifest import hash_file
from das_lightning.paths import RunPaths
from das_lightning.seeding import derive_seed

QUERY_SETS = ("val", "generated", "files")


@dataclass
class QuerySettings:
    sets: list[str] = field(default_factory=lambda: ["val", "generated"])
    num_val: int = 64
    # 0: the validation images every run has used; d > 0: ``num_val`` other test images, none of them in draws
    # 0..d-1 (a fresh evaluation on images that chose nothing, issue 26)
    val_draw: int = 0
    num_generated: int = 64
    files: str | None = None  # sets=[files]: a folder of PNG/JPEG/WebP images or a text file listing them
    files_recursive: bool = False  # look into subfolders of queries.files
    files_label: str | int | None = None  # one class (name or index) for every file image without labels.csv


def validation_indices(test_set: ImageDataset, count: int, draw: int = 0) -> np.ndarray:
    """The sorted test-split indices of :func:`validation_queries` (the rule in one place: the bundle checks it)."""
    if draw < 0:
        raise ConfigError(f"queries.val_draw must be 0 or more, got {draw}")
    if not 0 < count * (draw + 1) <= len(test_set):
        raise ConfigError(
            f"queries.num_val={count} (val_draw {draw}: {count * (draw + 1)} distinct images) but the test split "
            f"{test_set.set_name} holds {len(test_set)} images; choose queries.num_val between 1 and "
            f"{len(test_set) // (draw + 1)}"
        )
    taken = np.zeros(len(test_set), dtype=bool)
    for current in range(draw + 1):
        keys = ("val-queries", test_set.set_name, count) + ((current,) if current else ())
        rng = np.random.default_rng(derive_seed(*keys))
        remaining = np.flatnonzero(~taken)
        indices = remaining[stratified_sample(np.asarray(test_set.labels)[remaining], count, rng)]
        taken[indices] = True
    return indices


def validation_queries(test_set: ImageDataset, count: int, draw: int = 0) -> ImageDataset:
    """``count`` test images, class-stratified; refuses more than the test split holds (never fewer, silently).

    ``draw`` d > 0 picks ``count`` images disjoint from those of draws 0..d-1 (stratified among the rest), named
    ``...:q<count>:d<d>`` so that their noise and caches are their own; draw 0 is the set every run has used."""
    indices = validation_indices(test_set, count, draw)
    name = f"{test_set.set_name}:q{count}" + (f":d{draw}" if draw else "")
    return test_set.take(indices, name)


def generated_queries(paths: RunPaths, count: int, image_size: int) -> ImageDataset:
    """The first ``count`` images the full model generated, each with the class it was conditioned on."""
    images, labels, class_names = load_generated_queries(paths)
    if count > len(images):
        raise ConfigError(
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
        raise ConfigError(f"unknown query sets {sorted(unknown)}; choose from {list(QUERY_SETS)}")
    if "files" in settings.sets and not settings.files:
        raise ConfigError(
            "queries.sets includes files: give the images with queries.files=PATH (folder or list)"
        )
    builders = {
        "val": lambda: validation_queries(test_set, settings.num_val, settings.val_draw),
        "generated": lambda: generated_queries(paths, settings.num_generated, test_set.image_size),
        "files": lambda: file_queries(
            settings.files,
            test_set.channels,
            test_set.image_size,
            list(test_set.class_names),
            settings.files_recursive,
            settings.files_label,
        ),
    }
    return {name: builders[name]() for name in settings.sets}
