"""The dataset registry: one entry per name, each reading an official file layout into an :class:`ImageDataset`.

``build_dataset(name, split, root, image_size, ...)`` is the one way the rest of the package obtains data.
Splits are "train" and "test" (validation queries come from "test"). Class selection remaps labels to
0..C-1 in the order given; ``num_train`` / ``num_test`` keep a class-stratified subset drawn with numpy seed 42,
re-indexed from 0. Whenever the images behind the indices change (other classes, a subset), ``set_name``
changes too, because the noise rule keys noise by (set_name, index).

The default dataset, ``fashion2``, ships inside the package (data/assets/fashion2.npz): the Sneaker (7) and
Bag (8) classes of Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, Zalando Research, MIT licence,
https://github.com/zalandoresearch/fashion-mnist), relabelled 0 and 1, full splits (12000 train / 2000 test).
Like CIFAR-2's automobile vs horse, the two classes are distinct shape families (a low, wide shoe profile
against a boxy outline with handles) with rich variation inside each (sneaker styles and soles, bag shapes,
straps and textures), so attributions have structure to find both across and within classes; the visually
close pairs (shirt / T-shirt / pullover / coat) would blur the classes, and trouser is nearly uniform.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from das_lightning.data.base import FileImageDataset, ImageDataset, TensorImageDataset
from das_lightning.data.formats import (
    RemoteFile,
    download_verified,
    extract_members,
    missing_files_error,
    read_cifar_binary,
    read_idx,
)
from das_lightning.data.subsets import SUBSET_BASE_SEED, stratified_sample
from das_lightning.errors import ConfigError

SPLITS = ("train", "test")
FASHION2_ASSET = Path(__file__).parent / "assets" / "fashion2.npz"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MNIST_CLASSES = tuple(str(digit) for digit in range(10))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ARTBENCH_STYLES = (
    "art_nouveau",
    "baroque",
    "expressionism",
    "impressionism",
    "post_impressionism",
    "realism",
    "renaissance",
    "romanticism",
    "surrealism",
    "ukiyo_e",
)

_IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Official archives and checksums (the MD5s the dataset authors publish).
_FASHION_MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion",
)
_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist", "http://yann.lecun.com/exdb/mnist")
IDX_REMOTES = {
    "fashion_mnist": {
        "train-images-idx3-ubyte": RemoteFile("train-images-idx3-ubyte.gz", _FASHION_MIRRORS, "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        "train-labels-idx1-ubyte": RemoteFile("train-labels-idx1-ubyte.gz", _FASHION_MIRRORS, "25c81989df183df01b3e8a0aad5dffbe"),
        "t10k-images-idx3-ubyte": RemoteFile("t10k-images-idx3-ubyte.gz", _FASHION_MIRRORS, "bef4ecab320f06d8554ea6380940ec79"),
        "t10k-labels-idx1-ubyte": RemoteFile("t10k-labels-idx1-ubyte.gz", _FASHION_MIRRORS, "bb300cfdad3c16e7a12a480ee83cd310"),
    },
    "mnist": {
        "train-images-idx3-ubyte": RemoteFile("train-images-idx3-ubyte.gz", _MNIST_MIRRORS, "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        "train-labels-idx1-ubyte": RemoteFile("train-labels-idx1-ubyte.gz", _MNIST_MIRRORS, "d53e105ee54ea40749a09fcbcd1e9432"),
        "t10k-images-idx3-ubyte": RemoteFile("t10k-images-idx3-ubyte.gz", _MNIST_MIRRORS, "9fb629c4189551a2d022fa330f9573f3"),
        "t10k-labels-idx1-ubyte": RemoteFile("t10k-labels-idx1-ubyte.gz", _MNIST_MIRRORS, "ec29112dd5afa0611ce80d1b7f02629c"),
    },
}  # fmt: skip
CIFAR10_FOLDER = "cifar-10-batches-bin"
CIFAR10_FILES = {"train": tuple(f"data_batch_{k}.bin" for k in range(1, 6)), "test": ("test_batch.bin",)}
CIFAR10_REMOTE = RemoteFile(
    "cifar-10-binary.tar.gz", ("https://www.cs.toronto.edu/~kriz",), "c32a1d4ab5d03f1284b67883e8d87530"
)
CELEBA_PARTITIONS = {"train": 0, "test": 2}  # list_eval_partition.txt: 0 train, 1 valid, 2 test
CELEBA_CROP = 140


def default_data_root(name: str) -> Path:
    """Where a dataset is looked for (and downloaded to) when no root is given."""
    return Path(os.environ.get("DAS_LIGHTNING_DATA", "~/.cache/das_lightning/data")).expanduser() / name


def resolve_classes(requested: Sequence[str | int], available: Sequence[str], dataset: str) -> list[int]:
    """Positions in ``available`` of the requested classes, given as names (any case) or integer ids."""
    lowered = [name.lower() for name in available]
    resolved = []
    for item in requested:
        text = str(item).strip()
        if text.lower() in lowered:
            resolved.append(lowered.index(text.lower()))
        elif text.lstrip("-").isdigit() and 0 <= int(text) < len(available):
            resolved.append(int(text))
        else:
            raise ConfigError(
                f"{dataset}: unknown class {item!r}; choose names or ids from {list(available)}"
            )
    if len(set(resolved)) != len(resolved):
        raise ConfigError(f"{dataset}: classes {list(requested)} name a class twice")
    return resolved


@dataclass(frozen=True)
class LoadRequest:
    """What a registry entry's loader is asked for: one split of one named dataset, read from ``root``."""

    name: str  # the entry's name (cifar2, artbench5, ...): error messages and set names
    split: str
    root: Path
    image_size: int
    classes: Sequence[str | int] | None  # the user's class selection (None: the entry's default)
    default_classes: Sequence[str | int] | None  # the entry's own selection (None: every class)
    download: bool


def _class_selection(
    classes: Sequence[str | int] | None,
    default_classes: Sequence[str | int] | None,
    class_names: Sequence[str],
    dataset: str,
) -> tuple[list[int], list[int]]:
    """(selected class ids, the entry's default ids): every class when neither is given."""
    default = (
        list(range(len(class_names)))
        if default_classes is None
        else resolve_classes(default_classes, class_names, dataset)
    )
    selected = default if classes is None else resolve_classes(classes, class_names, dataset)
    return selected, default


def _class_tag(selected: Sequence[int], default: Sequence[int], names: Sequence[str]) -> str:
    """Part of set_name that records a non-default class selection (indices then mean other images)."""
    if list(selected) == list(default):
        return ""
    return "[" + ",".join(names[i].replace(" ", "_") for i in selected) + "]"


def _select_in_memory(
    request: LoadRequest, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str]
) -> TensorImageDataset:
    """Keep the selected classes (labels remapped to their order in the selection) and build the dataset."""
    selected, default = _class_selection(request.classes, request.default_classes, class_names, request.name)
    remap = np.full(len(class_names), -1, dtype=np.int64)
    remap[list(selected)] = np.arange(len(selected))
    new_labels = remap[labels.astype(np.int64)]
    keep = np.flatnonzero(new_labels >= 0)
    pixels = torch.from_numpy(np.ascontiguousarray(images[keep]))
    if pixels.dim() == 3:  # grey images (N, H, W) gain their channel axis
        pixels = pixels.unsqueeze(1)
    set_name = f"{request.name}{_class_tag(selected, default, class_names)}:{request.split}"
    return TensorImageDataset(
        set_name, pixels, new_labels[keep], [class_names[i] for i in selected], request.image_size
    )


def _load_fashion2(request: LoadRequest) -> ImageDataset:
    """The embedded Sneaker-vs-Bag set; ``root`` and ``download`` are ignored (it ships with the package)."""
    with np.load(FASHION2_ASSET, allow_pickle=False) as archive:
        images, labels = archive[f"{request.split}_images"], archive[f"{request.split}_labels"]
        class_names = [str(n) for n in archive["class_names"]]
    return _select_in_memory(request, images, labels, class_names)


def _find_idx_file(folders: Sequence[Path], base_name: str) -> Path | None:
    for folder in folders:
        for candidate in (folder / base_name, folder / f"{base_name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _idx_loader(class_names: Sequence[str], torchvision_folder: str) -> Callable[..., ImageDataset]:
    """A loader for an MNIST-style dataset published as IDX files (also found in torchvision's layout)."""

    def load(request: LoadRequest) -> ImageDataset:
        name, split, root = request.name, request.split, request.root
        folders = [root, root / torchvision_folder / "raw"]
        base_names = _IDX_NAMES[split]
        found = [_find_idx_file(folders, base) for base in base_names]
        if None in found and request.download:
            remotes = IDX_REMOTES[name]
            try:
                found = [
                    path or download_verified(remotes[base], root)
                    for path, base in zip(found, base_names, strict=True)
                ]
            except OSError as error:
                raise missing_files_error(
                    name, split, root, [f"{b}(.gz)" for b in base_names], True, str(error)
                ) from None
        if None in found:
            raise missing_files_error(
                name, split, root, [f"{b}(.gz)" for b in base_names], name in IDX_REMOTES
            )
        return _select_in_memory(request, read_idx(found[0]), read_idx(found[1]), class_names)

    return load


def _load_cifar10(request: LoadRequest) -> ImageDataset:
    """CIFAR-10's binary version, in ``root/cifar-10-batches-bin/`` or in ``root`` itself."""
    name, split, root = request.name, request.split, request.root
    expected = [f"{CIFAR10_FOLDER}/{file}" for file in CIFAR10_FILES[split]]
    candidates = [
        [folder / file for file in CIFAR10_FILES[split]] for folder in (root / CIFAR10_FOLDER, root)
    ]
    paths = next((files for files in candidates if all(path.is_file() for path in files)), None)
    if paths is None:
        if not request.download:
            raise missing_files_error(name, split, root, expected, True)
        try:
            archive = download_verified(CIFAR10_REMOTE, root)
            members = [f"{CIFAR10_FOLDER}/{file}" for files in CIFAR10_FILES.values() for file in files]
            extract_members(archive, root, members)
            archive.unlink()
        except (OSError, KeyError) as error:
            raise missing_files_error(name, split, root, expected, True, str(error)) from None
        paths = [root / file for file in expected]
    return _select_in_memory(request, *read_cifar_binary(paths), CIFAR10_CLASSES)


def _load_celeba(
    request: LoadRequest,
    crop_size: int = CELEBA_CROP,
) -> ImageDataset:
    """Aligned CelebA faces (one class), center-cropped to ``crop_size`` then resized."""
    name, split, root, image_size = request.name, request.split, request.root, request.image_size
    base = root / "celeba" if (root / "celeba" / "list_eval_partition.txt").is_file() else root
    partition_file, image_folder = base / "list_eval_partition.txt", base / "img_align_celeba"
    expected = ["img_align_celeba/*.jpg", "list_eval_partition.txt"]
    if not partition_file.is_file() or not image_folder.is_dir():
        raise missing_files_error(name, split, root, expected, False)
    paths = []
    for line in partition_file.read_text().split("\n"):
        if line.strip():
            file_name, partition = line.split()
            if int(partition) == CELEBA_PARTITIONS[split]:
                paths.append(image_folder / file_name)
    # checking 200k files one by one is slow on network disks; the ends catch a wrong or partial folder
    absent = [path for path in paths[:1] + paths[-1:] if not path.is_file()]
    if absent:
        raise missing_files_error(name, split, root, expected, False, f"{absent[0]} is missing")
    labels = np.zeros(len(paths), dtype=np.int64)
    return FileImageDataset(f"{name}:{split}", paths, labels, ["face"], image_size, crop_size=crop_size)


def _load_folder(request: LoadRequest) -> ImageDataset:
    """Class folders ``root/<class>/*.{png,jpg,jpeg}``, or ``root/train/<class>`` and ``root/test/<class>``."""
    name, split, root, image_size = request.name, request.split, request.root, request.image_size
    has_split_folders = (root / "train").is_dir() or (root / "test").is_dir()
    split_root = root / split if has_split_folders else root
    if not has_split_folders and split != "train":
        reason = "without train/ and test/ folders the class folders are the training split only"
        raise missing_files_error(name, split, root, [f"{split}/<class>/*.png|jpg"], False, reason)
    if not split_root.is_dir():
        raise missing_files_error(
            name, split, root, [f"{split_root.relative_to(root)}/<class>/*.png|jpg"], False
        )
    available = sorted(entry.name for entry in split_root.iterdir() if entry.is_dir())
    if not available:
        where = "" if split_root == root else f"{split}/"
        raise missing_files_error(name, split, root, [f"{where}<class>/*.png|jpg"], False, "no class folders")
    default_names = (
        [str(c) for c in request.default_classes] if request.default_classes is not None else available
    )
    if request.classes is None:
        class_names = default_names
    else:
        known = sorted(set(available) | set(ARTBENCH_STYLES if name.startswith("artbench") else ()))
        class_names = [known[i] for i in resolve_classes(request.classes, known, name)]
    paths: list[Path] = []
    labels: list[int] = []
    for label, class_name in enumerate(class_names):
        folder = split_root / class_name
        files = (
            sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if folder.is_dir()
            else []
        )
        if not files:
            relative = folder.relative_to(root)
            raise missing_files_error(name, split, root, [f"{relative}/*.png|jpg"], False)
        paths += files
        labels += [label] * len(files)
    prefix = f"{name}:{root.name}" if name == "imagefolder" else name
    tag = "" if class_names == default_names else "[" + ",".join(class_names) + "]"
    return FileImageDataset(f"{prefix}{tag}:{split}", paths, np.asarray(labels), class_names, image_size)


@dataclass(frozen=True)
class DatasetEntry:
    """A registry entry: a loader plus the defaults that make a named variant (cifar2, artbench2, ...)."""

    name: str
    loader: Callable[..., ImageDataset]
    default_classes: tuple[str, ...] | None = None
    num_train: int | None = None
    num_test: int | None = None

    def __call__(
        self,
        split: str,
        root: str | Path | None,
        image_size: int,
        classes: Sequence[str | int] | None = None,
        num_train: int | None = None,
        download: bool = False,
        num_test: int | None = None,
        **extra: Any,
    ) -> ImageDataset:
        if split not in SPLITS:
            raise ConfigError(f"{self.name}: unknown split {split!r}; choose from {list(SPLITS)}")
        if int(image_size) != image_size or image_size <= 0:
            raise ConfigError(f"{self.name}: image_size must be a positive integer, got {image_size}")
        root_path = Path(root).expanduser() if root is not None else default_data_root(self.name)
        request = LoadRequest(
            self.name, split, root_path, int(image_size), classes, self.default_classes, download
        )
        dataset = self.loader(request, **extra)
        wanted = num_train if num_train is not None else self.num_train
        if split == "test":
            wanted = num_test if num_test is not None else self.num_test
        return stratified_subset(dataset, wanted) if wanted is not None else dataset


def stratified_subset(dataset: ImageDataset, size: int) -> ImageDataset:
    """A class-stratified subset of ``size`` drawn with numpy seed 42, re-indexed and renamed."""
    if not 0 < size <= len(dataset):
        raise ConfigError(f"{dataset.set_name}: cannot keep {size} of {len(dataset)} images")
    if size == len(dataset):
        return dataset
    indices = stratified_sample(dataset.labels, size, np.random.default_rng(SUBSET_BASE_SEED))
    return dataset.take(indices, f"{dataset.set_name}:n{size}")


DATASETS: dict[str, DatasetEntry] = {
    entry.name: entry
    for entry in (
        DatasetEntry("fashion2", _load_fashion2),
        DatasetEntry("fashion_mnist", _idx_loader(FASHION_MNIST_CLASSES, "FashionMNIST")),
        DatasetEntry("mnist", _idx_loader(MNIST_CLASSES, "MNIST")),
        DatasetEntry("cifar10", _load_cifar10),
        DatasetEntry("cifar2", _load_cifar10, ("automobile", "horse"), num_train=5000, num_test=1000),
        DatasetEntry("celeba", _load_celeba),
        DatasetEntry("artbench", _load_folder),
        DatasetEntry("artbench2", _load_folder, ("post_impressionism", "ukiyo_e")),
        DatasetEntry(
            "artbench5",
            _load_folder,
            ("romanticism", "art_nouveau", "baroque", "post_impressionism", "ukiyo_e"),
        ),
        DatasetEntry("imagefolder", _load_folder),
    )
}


def build_dataset(
    name: str, split: str, root: str | Path | None, image_size: int, **options: Any
) -> ImageDataset:
    """Build a registered dataset's split. ``options``: ``classes`` (names or ids, in the order wanted),
    ``num_train`` / ``num_test`` (stratified subsets), ``download``, ``crop_size`` (celeba); see
    :class:`DatasetEntry`.

    Raises:
        ValueError: unknown name, split or class, or a subset larger than the split.
        DatasetNotFoundError: the files are absent (and could not be downloaded); the message says where and how.
    """
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](split, root, image_size, **options)
