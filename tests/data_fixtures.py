"""Writers of small dataset files in the OFFICIAL formats, so loader tests read what the real files hold."""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

IDX_UBYTE = 0x08


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """An IDX file of uint8 data: magic 0x0000 08 <ndim>, big-endian int32 dims, then the bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, IDX_UBYTE, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    payload = header + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)
    return path


def write_idx_split(
    root: Path, split: str, images: np.ndarray, labels: np.ndarray, compress: bool = False
) -> None:
    """The image and label IDX files of one MNIST-style split (train / t10k naming)."""
    prefix = "train" if split == "train" else "t10k"
    write_idx(root / f"{prefix}-images-idx3-ubyte", images, compress)
    write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, compress)


def write_cifar_batch(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """A CIFAR-10 binary batch: per record one label byte then the R, G, B 32x32 planes."""
    records = np.concatenate(
        [
            np.asarray(labels, dtype=np.uint8)[:, None],
            np.asarray(images, dtype=np.uint8).reshape(len(labels), -1),
        ],
        axis=1,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(records.tobytes())


def write_image(path: Path, pixels: np.ndarray, quality: int = 95) -> None:
    """An RGB image (H, W, 3) as PNG or JPEG according to the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path, quality=quality)


def write_celeba(root: Path, partitions: Sequence[int], pixels: Sequence[np.ndarray]) -> list[str]:
    """img_align_celeba/<nnnnnn>.jpg plus list_eval_partition.txt, as in the official release."""
    names = [f"{k + 1:06d}.jpg" for k in range(len(partitions))]
    for name, image in zip(names, pixels, strict=True):
        write_image(root / "img_align_celeba" / name, image)
    lines = [f"{name} {partition}" for name, partition in zip(names, partitions, strict=True)]
    (root / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return names
