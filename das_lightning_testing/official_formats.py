"""Tiny synthetic datasets written in the OFFICIAL on-disk formats that ``das_lightning.data`` reads, so the paper
experiments (cifar2_lds, cifar10_lds, celeba_lds, artbench2_lds, ArtBench-5) run end to end offline at trimmed size.

- CIFAR-10, binary version: ``<root>/cifar-10-batches-bin/data_batch_{1..5}.bin`` and ``test_batch.bin``, each a
  run of 3073-byte records (one label byte, then the red, green and blue 32 x 32 planes), as in
  ``cifar-10-binary.tar.gz``. ``cifar2`` (automobile + horse) and ``cifar10`` both read this folder.
- CelebA, aligned and cropped: ``<root>/img_align_celeba/<nnnnnn>.jpg`` (178 x 218 JPEGs, numbered from 000001)
  and ``<root>/list_eval_partition.txt`` (``<file> <0|1|2>`` per line: train, valid, test).
- ArtBench-10, ImageFolder release (``artbench-10-imagefolder-split``): ``<root>/train/<style>/*.jpg`` and
  ``<root>/test/<style>/*.jpg``, 256 x 256 JPEGs, the ten style folders.

Every image is a deterministic function of (seed, split, index): a smooth random field around a per-class colour,
so classes differ and images within a class do too. Nothing is downloaded; the writers take a few seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from das_lightning.data.formats import CIFAR_RECORD_BYTES
from das_lightning.data.registry import (
    ARTBENCH_STYLES,
    CELEBA_PARTITIONS,
    CIFAR10_CLASSES,
    CIFAR10_FILES,
    CIFAR10_FOLDER,
)

CELEBA_WIDTH, CELEBA_HEIGHT = 178, 218  # the aligned-and-cropped release's image size
ARTBENCH_SIZE = 256  # ArtBench-10's images are 256 x 256
CELEBA_VALID = 1  # list_eval_partition.txt: 0 train, 1 valid, 2 test


def synthetic_images(
    count: int, height: int, width: int, class_ids: Sequence[int], num_classes: int, seed: int
) -> np.ndarray:
    """``count`` RGB images uint8 (count, height, width, 3): a per-class base colour plus a smooth random field
    (a coarse 4 x 4 noise grid upsampled), deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    palette = np.random.default_rng(12345).uniform(40, 215, size=(num_classes, 3))
    coarse = rng.normal(0.0, 40.0, size=(count, 4, 4, 3))
    rows = np.minimum(np.arange(height) * 4 // height, 3)
    cols = np.minimum(np.arange(width) * 4 // width, 3)
    field = coarse[:, rows][:, :, cols]  # nearest-neighbour upsampling: (count, height, width, 3)
    fine = rng.normal(0.0, 8.0, size=(count, height, width, 3))
    base = palette[np.asarray(class_ids, dtype=np.int64)][:, None, None, :]
    return np.clip(base + field + fine, 0, 255).astype(np.uint8)


def _balanced_labels(count: int, num_classes: int) -> np.ndarray:
    return np.arange(count) % num_classes


def write_cifar10_binary(
    root: Path, per_class_train: int = 4, per_class_test: int = 2, seed: int = 0
) -> Path:
    """``root/cifar-10-batches-bin/``: five training batches and the test batch, every class equally often.

    Returns ``root`` (the ``dataset.root`` of cifar2 and cifar10)."""
    folder = Path(root) / CIFAR10_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    num_classes = len(CIFAR10_CLASSES)
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        files = CIFAR10_FILES[split]
        labels = _balanced_labels(per_class * num_classes, num_classes)
        images = synthetic_images(len(labels), 32, 32, labels, num_classes, seed + (split == "test"))
        planes = images.transpose(0, 3, 1, 2).reshape(len(labels), -1)  # R plane, G plane, B plane
        records = np.concatenate([labels.astype(np.uint8)[:, None], planes], axis=1)
        assert records.shape[1] == CIFAR_RECORD_BYTES
        for file, part in zip(files, np.array_split(records, len(files)), strict=True):
            (folder / file).write_bytes(part.tobytes())
    (folder / "batches.meta.txt").write_text("\n".join(CIFAR10_CLASSES) + "\n")
    return Path(root)


def write_celeba(
    root: Path, num_train: int = 24, num_valid: int = 2, num_test: int = 8, seed: int = 0
) -> Path:
    """``root/img_align_celeba/*.jpg`` and ``root/list_eval_partition.txt``: train, then valid, then test images
    numbered as in the release. Returns ``root`` (celeba's ``dataset.root``)."""
    root = Path(root)
    folder = root / "img_align_celeba"
    folder.mkdir(parents=True, exist_ok=True)
    partitions = (
        [CELEBA_PARTITIONS["train"]] * num_train
        + [CELEBA_VALID] * num_valid
        + [CELEBA_PARTITIONS["test"]] * num_test
    )
    images = synthetic_images(len(partitions), CELEBA_HEIGHT, CELEBA_WIDTH, [0] * len(partitions), 1, seed)
    lines = []
    for number, (partition, pixels) in enumerate(zip(partitions, images, strict=True), start=1):
        name = f"{number:06d}.jpg"
        Image.fromarray(pixels).save(folder / name, quality=95)
        lines.append(f"{name} {partition}")
    (root / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return root


def write_artbench(
    root: Path,
    per_style_train: int = 4,
    per_style_test: int = 2,
    styles: Sequence[str] = ARTBENCH_STYLES,
    image_size: int = ARTBENCH_SIZE,
    seed: int = 0,
) -> Path:
    """``root/train/<style>/*.jpg`` and ``root/test/<style>/*.jpg`` (ArtBench-10's ImageFolder split release).
    Returns ``root`` (artbench2's and artbench5's ``dataset.root``)."""
    root = Path(root)
    num_classes = len(ARTBENCH_STYLES)
    for split, per_style in (("train", per_style_train), ("test", per_style_test)):
        for style in styles:
            class_id = ARTBENCH_STYLES.index(style)
            folder = root / split / style
            folder.mkdir(parents=True, exist_ok=True)
            images = synthetic_images(
                per_style,
                image_size,
                image_size,
                [class_id] * per_style,
                num_classes,
                seed + 7 * class_id + (split == "test"),
            )
            for index, pixels in enumerate(images):
                Image.fromarray(pixels).save(folder / f"{style}_{index:05d}.jpg", quality=95)
    return root
