"""Query images from files: a folder of PNG/JPEG/WebP images (optionally recursive) or a text file listing them.

Each image is converted like the training data: decoded with Pillow, made grey ("L") for a 1-channel dataset or
RGB for a 3-channel one (alpha dropped), centre-cropped to a square, resized to ``dataset.image_size`` (area
averaging when shrinking), mapped to [-1, 1]. The set's identity is the content of its files: ``set_name`` is
``files:<hash>`` of the ordered (file name, SHA-256 of bytes) list, so the noise rule and the feature stores treat
it like any other set, and a changed, added or removed file makes a new set that is featurised afresh instead of
being matched to stale features.

Labels, for conditioned models: ``labels.csv`` beside the images (``file,label`` rows; label a class name or
index), or one label for all (``queries.files_label``); otherwise every image gets class 0.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from das_lightning.data import TensorImageDataset
from das_lightning.data.base import center_crop_square
from das_lightning.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
LABELS_FILE = "labels.csv"


class QueryFileError(ConfigError):
    """A query image file that cannot be found or read; the message names it."""


def list_image_files(source: Path, recursive: bool = False) -> list[Path]:
    """The image files of a folder (sorted by relative path), of a text file (one path per line, relative to the
    text file's folder; blank lines and ``#`` comments skipped), or one image file."""
    source = Path(source)
    if source.is_dir():
        pattern = "**/*" if recursive else "*"
        files = sorted(
            (
                path
                for path in source.glob(pattern)
                if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
            ),
            key=lambda path: path.relative_to(source).as_posix(),
        )
    elif source.is_file() and source.suffix.lower() in IMAGE_SUFFIXES:
        files = [source]  # one image
    elif source.is_file():
        lines = [line.strip() for line in source.read_text().splitlines()]
        files = [
            (path if path.is_absolute() else source.parent / path)
            for path in (Path(line) for line in lines if line and not line.startswith("#"))
        ]
        for path in files:
            if not path.is_file():
                raise QueryFileError(f"query image {path} (listed in {source}) does not exist")
    else:
        raise QueryFileError(f"queries.files={source} is neither a folder nor a text file listing images")
    if not files:
        raise QueryFileError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {source}")
    return files


def _load(path: Path, channels: int, image_size: int) -> torch.Tensor:
    """One image as uint8 (C, image_size, image_size), converted like the dataset."""
    try:
        with Image.open(path) as image:
            image.load()
            converted = image.convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise QueryFileError(f"cannot read query image {path}: {error}") from error
    square = center_crop_square(converted, None).resize((image_size, image_size), Image.Resampling.BOX)
    array = np.asarray(square, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(array.copy())


def _labels(files: list[Path], root: Path, class_names: list[str], label: str | int | None) -> np.ndarray:
    table: dict[str, str] = {}
    csv_path = (root if root.is_dir() else root.parent) / LABELS_FILE
    if csv_path.is_file():
        with open(csv_path, newline="") as handle:
            table = {row[0].strip(): row[1].strip() for row in csv.reader(handle) if len(row) >= 2}
    labels = []
    for path in files:
        value = table.get(path.name, table.get(str(path), label))
        labels.append(_class_index(value, class_names, path))
    return np.asarray(labels, dtype=np.int64)


def _class_index(value: str | int | None, class_names: list[str], path: Path) -> int:
    if value is None:
        return 0
    text = str(value)
    if text in class_names:
        return class_names.index(text)
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(class_names):
        return int(text)
    raise QueryFileError(f"label {text!r} of query image {path} is not a class of the dataset: {class_names}")


class FileQueryDataset(TensorImageDataset):
    """Query images read from files, with their file names (shown in grids and top-k lists)."""

    file_names: list[str]


def file_queries(
    source: str | Path,
    channels: int,
    image_size: int,
    class_names: list[str],
    recursive: bool = False,
    label: str | int | None = None,
) -> FileQueryDataset:
    """The ``files`` query set (see the module docstring). Every file is read before anything is computed, so an
    unreadable one stops the run with its name, and no store of another set is touched."""
    root = Path(source).expanduser()
    files = list_image_files(root, recursive)
    images = torch.stack([_load(path, channels, image_size) for path in files])
    names = [path.relative_to(root).as_posix() if root.is_dir() else path.name for path in files]
    digest = hashlib.sha256()
    for name, path in zip(names, files, strict=True):
        digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    content = digest.hexdigest()[:20]
    dataset = FileQueryDataset(
        f"files:{content}", images, _labels(files, root, class_names, label), class_names, image_size
    )
    dataset.content_id = content
    dataset.file_names = names
    return dataset
