"""An attribution method scored outside das-lightning: pixel cosine similarity against an LDS bundle, with numpy
and PIL alone (nothing from the package), written as the .npz that ``evaluate_lds.py bundle=... scores=...`` reads.

python examples/outside_scorer.py benchmarks/bundles/fashion2 pixel_mine.npz
python evaluate_lds.py bundle=benchmarks/bundles/fashion2 scores=pixel_mine.npz

Replace ``cosine_scores`` with your method: it gets the training images and one query set's images (uint8,
images x channels x height x width, in the bundle's order) and returns queries x train scores, larger = the training
image helps the query more (the bundle's README.md has the whole format).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image


def read_train_images(bundle: Path, description: dict) -> np.ndarray:
    """train x channels x height x width uint8, row i = training image i, checked against the recorded checksum."""
    identity = description["train_set"]
    images = np.load(bundle / identity["images_file"], allow_pickle=False)
    digest = hashlib.blake2b(images.tobytes(), digest_size=16).hexdigest()
    if digest != identity["images_blake2b"]:
        raise SystemExit(
            f"{identity['images_file']} is not the training set bundle.json names: copy it again"
        )
    return images


def read_queries(bundle: Path, entry: dict) -> np.ndarray:
    """queries x channels x height x width uint8, in the order of the set's PNG list (the scores' rows)."""
    pictures = []
    for relative in entry["images"]:
        with Image.open(bundle / relative) as picture:
            pixels = np.asarray(picture)
        pictures.append(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))
    return np.stack(pictures)


def cosine_scores(train: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Cosine of the flattened pixels in [-1, 1] (what the models saw; [0, 1] pixels give another method)."""

    def unit_rows(images: np.ndarray) -> np.ndarray:
        flat = images.reshape(len(images), -1).astype(np.float64) / 127.5 - 1.0
        return flat / np.linalg.norm(flat, axis=1, keepdims=True)

    return unit_rows(queries) @ unit_rows(train).T  # queries x train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="the bundle folder")
    parser.add_argument("output", type=Path, help="the .npz to write (one array per query set)")
    args = parser.parse_args()
    description = json.loads((args.bundle / "bundle.json").read_text())
    train = read_train_images(args.bundle, description)
    scores = {
        name: cosine_scores(train, read_queries(args.bundle, entry))
        for name, entry in description["query_sets"].items()
    }
    np.savez(args.output, **scores)
    shapes = ", ".join(f"{name} {matrix.shape[0]} x {matrix.shape[1]}" for name, matrix in scores.items())
    print(f"wrote {args.output} ({shapes}: queries x train)")
    print(f"evaluate it with: python evaluate_lds.py bundle={args.bundle} scores={args.output}")


if __name__ == "__main__":
    main()
