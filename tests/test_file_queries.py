"""Your own images as queries: conversion like the dataset, identity by content, bad files named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from das_lightning import cli
from das_lightning.attribution.pipeline import load_scores
from das_lightning.file_queries import QueryFileError, file_queries

from conftest import TINY_ATTRIBUTE, compose

RUN = Path("fashion2") / "tiny" / "full" / "seed0"


def _write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        array = rng.integers(0, 256, size=(20, 28, 3), dtype=np.uint8)  # not square, RGB: converted on load
        path = folder / f"img{i}.{('png', 'jpg', 'webp')[i % 3]}"
        Image.fromarray(array).save(path, quality=95)
        paths.append(path)
    return paths


def test_images_are_converted_like_the_dataset_and_named_by_content(tmp_path: Path) -> None:
    paths = _write_images(tmp_path / "q", 3)
    (tmp_path / "q" / "notes.txt").write_text("not an image")
    queries = file_queries(tmp_path / "q", channels=1, image_size=8, class_names=["Sneaker", "Bag"])
    assert len(queries) == 3 and queries.file_names == ["img0.png", "img1.jpg", "img2.webp"]
    sample = queries[0]
    assert (
        tuple(sample["image"].shape) == (1, 8, 8)
        and -1.0 <= sample["image"].min() <= sample["image"].max() <= 1.0
    )
    # grey, centre-cropped to 20 x 20, box-resized: the mean brightness of the crop is kept
    with Image.open(paths[0]) as image:
        crop = np.asarray(image.convert("L"), dtype=np.float64)[:, 4:24]
    assert abs(float(queries.image_uint8(0).double().mean()) - crop.mean()) < 1.5
    same = file_queries(tmp_path / "q", channels=1, image_size=8, class_names=["Sneaker", "Bag"])
    assert same.set_name == queries.set_name and same.content_id == queries.content_id
    Image.fromarray(np.zeros((20, 28, 3), dtype=np.uint8)).save(paths[1], quality=95)  # one file changes
    changed = file_queries(tmp_path / "q", channels=1, image_size=8, class_names=["Sneaker", "Bag"])
    assert changed.set_name != queries.set_name


def test_a_list_file_labels_and_bad_files(tmp_path: Path) -> None:
    paths = _write_images(tmp_path / "q", 2)
    listing = tmp_path / "list.txt"
    listing.write_text(f"# my queries\n{paths[1]}\nq/img0.png\n")
    (tmp_path / "labels.csv").write_text("img0.png,Bag\n")
    queries = file_queries(listing, 3, 8, ["Sneaker", "Bag"], label="Sneaker")
    assert queries.file_names == ["img1.jpg", "img0.png"] and queries.labels.tolist() == [0, 1]
    assert queries[0]["image"].shape[0] == 3
    (tmp_path / "q" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(QueryFileError, match="broken.png"):
        file_queries(tmp_path / "q", 1, 8, ["Sneaker", "Bag"])
    listing.write_text("missing.png\n")
    with pytest.raises(QueryFileError, match="missing.png"):
        file_queries(listing, 1, 8, ["Sneaker", "Bag"])
    with pytest.raises(QueryFileError, match="not a class"):
        file_queries(tmp_path / "q" / "img0.png", 1, 8, ["Sneaker", "Bag"], label="Cat")


def test_attribute_folder_queries_and_refeaturise_a_changed_file(trained_root: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "out"
    for part in ("unet", "queries"):
        shutil.copytree(trained_root / RUN / part, root / RUN / part)
    for name in ("manifest.json", "subset.json", "config.json"):
        shutil.copy(trained_root / RUN / name, root / RUN / name)
    paths = _write_images(tmp_path / "mine", 3)
    overrides = [
        f"paths.root={root}",
        *TINY_ATTRIBUTE,
        "queries.sets=[files]",
        f"queries.files={tmp_path / 'mine'}",
    ]
    cli.run_attribute(compose("attribute", overrides))
    folder = root / RUN / "scores" / "das" / "files"
    scores, manifest = load_scores(folder)
    assert scores.shape[1:] == (3, 48) and np.isfinite(scores).all()
    assert json.loads((folder / "topk.json").read_text())["query_names"] == [
        "img0.png",
        "img1.jpg",
        "img2.webp",
    ]
    stores = sorted(p.name for p in (root / RUN / "features" / "das").iterdir() if p.name.startswith("files"))
    assert len(stores) == 1
    Image.fromarray(np.full((20, 28, 3), 200, dtype=np.uint8)).save(paths[2])
    cli.run_attribute(compose("attribute", overrides))
    stores_after = sorted(
        p.name for p in (root / RUN / "features" / "das").iterdir() if p.name.startswith("files")
    )
    assert len(stores_after) == 2  # a new store for the new content; the old rows are never reused for it
    rescored, remanifest = load_scores(folder)
    assert remanifest["content_id"] != manifest["content_id"]
    assert not np.allclose(rescored, scores)
    # the same files again: the store of their content is reused, nothing is recomputed
    store = next(p for p in (root / RUN / "features" / "das").iterdir() if remanifest["content_id"] in p.name)
    stamp = (store / "features.npy").stat().st_mtime_ns
    cli.run_attribute(compose("attribute", overrides))
    assert (store / "features.npy").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(load_scores(folder)[0], rescored)
