"""Offline Stable Diffusion fixtures: the tiny random pipeline (built by ``das_lightning_testing.tiny_sd``) and
ArtBench-style image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from das_lightning_testing.tiny_sd import IMAGE_SIZE, build_tiny_sd_pipeline

__all__ = ["IMAGE_SIZE", "build_tiny_sd_pipeline", "write_style_folders"]


def write_style_folders(
    root: Path, styles: tuple[str, ...], per_class: int, size: int = IMAGE_SIZE, seed: int = 0
) -> Path:
    """ArtBench-style folders ``<root>/<style>/*.png``; each style has its own mean colour so classes differ."""
    rng = np.random.default_rng(seed)
    for class_id, style in enumerate(styles):
        folder = root / style
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(40, 215, size=3)
        for image_id in range(per_class):
            noise = rng.integers(-40, 40, size=(size, size, 3))
            pixels = np.clip(base + noise + 10 * class_id, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{image_id:04d}.png")
    return root
