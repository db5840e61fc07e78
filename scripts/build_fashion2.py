"""Build das_lightning/data/assets/fashion2.npz, the embedded default dataset, from the official
Fashion-MNIST IDX files (Zalando Research, MIT licence; on Debian: ``apt-get install dataset-fashion-mnist``).

Keeps the Sneaker (7) and Bag (8) classes, relabelled 0 and 1, with their full train and test splits in the
official order; why these two is explained in das_lightning/data/registry.py.

    python scripts/build_fashion2.py --source /usr/share/datasets/fashion-mnist
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from das_lightning.data.formats import read_idx
from das_lightning.data.registry import FASHION2_ASSET, FASHION_MNIST_CLASSES

SOURCE_CLASSES = (7, 8)  # Sneaker, Bag
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def find_idx(source: Path, base_name: str) -> Path:
    for candidate in (source / base_name, source / f"{base_name}.gz"):
        if candidate.is_file():
            return candidate
    raise SystemExit(f"{base_name}(.gz) not found in {source}")


def build(source: Path, output: Path) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for split, (images_name, labels_name) in FILES.items():
        images, labels = read_idx(find_idx(source, images_name)), read_idx(find_idx(source, labels_name))
        keep = np.isin(labels, SOURCE_CLASSES)
        arrays[f"{split}_images"] = images[keep].astype(np.uint8)
        arrays[f"{split}_labels"] = np.searchsorted(SOURCE_CLASSES, labels[keep]).astype(np.uint8)
    arrays["class_names"] = np.array([FASHION_MNIST_CLASSES[c] for c in SOURCE_CLASSES])
    arrays["source_classes"] = np.array(SOURCE_CLASSES, dtype=np.int64)
    output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(output, **arrays)
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--output", type=Path, default=FASHION2_ASSET)
    args = parser.parse_args()
    arrays = build(args.source, args.output)
    counts = {split: np.bincount(arrays[f"{split}_labels"]).tolist() for split in FILES}
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.2f} MB), per-class counts {counts}")


if __name__ == "__main__":
    main()
