"""The sample contract every dataset follows, and the two ways of holding images (in memory, or as files).

A sample is ``{"index": int, "image": FloatTensor[C, H, W] in [-1, 1], "label": int}``. ``index`` is the
sample's position in THIS dataset: features, scores and the noise rule address training images by it, so it
must never depend on shuffling, subsetting for a dataloader, or augmentation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from das_lightning.errors import ConfigError, MissingArtifactError
from das_lightning.manifest import hash_array

# Resizing whole splits at once would hold a float copy of every image; chunks keep the peak small.
_RESIZE_CHUNK = 4096


class Sample(TypedDict):
    index: int
    image: torch.Tensor
    label: int


class DatasetNotFoundError(MissingArtifactError):
    """The files of a dataset are not where they were looked for (and could not be downloaded)."""


def resize_images(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Resize uint8 images (N, C, H, W) to (N, C, image_size, image_size), returning uint8.

    Downscaling averages the covered pixels (area), so it neither aliases nor shifts brightness; upscaling is
    bilinear.
    """
    if images.shape[-2:] == (image_size, image_size):
        return images
    shrinking = image_size < max(images.shape[-2:])
    chunks = []
    for start in range(0, images.shape[0], _RESIZE_CHUNK):
        chunk = images[start : start + _RESIZE_CHUNK].float()
        if shrinking:
            resized = F.interpolate(chunk, size=(image_size, image_size), mode="area")
        else:
            resized = F.interpolate(
                chunk, size=(image_size, image_size), mode="bilinear", align_corners=False
            )
        chunks.append(resized.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(chunks) if chunks else images.new_empty((0, images.shape[1], image_size, image_size))


def to_signed_unit(image: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1], the range the diffusion models are trained in."""
    return image.float().div(127.5).sub(1.0)


def center_crop_square(image: Image.Image, crop_size: int | None) -> Image.Image:
    """Center crop to ``crop_size`` (or to the shorter side when None), so resizing never distorts."""
    width, height = image.size
    side = min(width, height) if crop_size is None else min(crop_size, width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


class ImageDataset(Dataset[Sample]):
    """Base of every dataset: the sample contract plus the attributes downstream stages rely on.

    Attributes:
        set_name: identity of this exact list of images (dataset, split, class selection, subset size),
            used by the noise rule; two datasets whose index i means different images must differ here.
        labels: int64 class of each sample, readable without loading images (for stratification).
        class_names: name of label 0, 1, ...
        channels: image channels (1 grey, 3 RGB).
        image_size: height = width of every image.
        content_id: for sets whose images can change under the same name (generated queries: regenerate with
            other settings and ``set_name`` stays), an identity of the images themselves, e.g. a file hash; it
            goes into every manifest made from the set (features, latents, ground truth, scores). None otherwise.
    """

    content_id: str | None = None

    def __init__(
        self, set_name: str, labels: np.ndarray, class_names: Sequence[str], channels: int, image_size: int
    ):
        self.set_name = set_name
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)
        self.channels = channels
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Sample:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.set_name} of {len(self)} images")
        index %= len(self)
        return {
            "index": index,
            "image": to_signed_unit(self.image_uint8(index)),
            "label": int(self.labels[index]),
        }

    def image_uint8(self, index: int) -> torch.Tensor:
        """The image at ``index`` as uint8 (C, H, W), already at ``image_size``."""
        raise NotImplementedError

    def take(self, indices: np.ndarray, set_name: str) -> ImageDataset:
        """A new dataset of the images at ``indices``, re-indexed 0..len-1, under a new identity."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(set_name={self.set_name!r}, size={len(self)}, classes={self.class_names}, "
            f"channels={self.channels}, image_size={self.image_size})"
        )


def dataset_identity(dataset: ImageDataset) -> dict[str, Any]:
    """Which images a set holds, for manifests: its name (the noise rule's key), size, labels and content."""
    return {
        "set_name": dataset.set_name,
        "num_images": len(dataset),
        "labels_hash": hash_array(dataset.labels),
        **content_entry(dataset),
    }


def content_entry(dataset: ImageDataset) -> dict[str, str]:
    """``{"content_id": ...}`` for manifests when the set has one, else nothing (older manifests stay valid)."""
    return {} if dataset.content_id is None else {"content_id": dataset.content_id}


class TensorImageDataset(ImageDataset):
    """Images held in memory as one uint8 tensor (N, C, H, W), resized once when built."""

    def __init__(
        self,
        set_name: str,
        images: torch.Tensor,
        labels: np.ndarray,
        class_names: Sequence[str],
        image_size: int,
    ):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ConfigError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if images.shape[0] != len(labels):
            raise ConfigError(f"{images.shape[0]} images but {len(labels)} labels")
        super().__init__(set_name, labels, class_names, images.shape[1], image_size)
        self.images = resize_images(images, image_size).contiguous()

    def image_uint8(self, index: int) -> torch.Tensor:
        return self.images[index]

    def take(self, indices: np.ndarray, set_name: str) -> TensorImageDataset:
        selected = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return TensorImageDataset(
            set_name, self.images[selected], self.labels[selected.numpy()], self.class_names, self.image_size
        )


class ModelSpaceDataset(ImageDataset):
    """Float tensors the network denoises directly, standing in for the images of another set: VAE latents of a
    latent model, or predicted clean samples along a sampling trajectory (Journey-TRAK). ``sample["image"]`` is the
    tensor (C, h, w) as stored, not an image in [-1, 1].

    It keeps the source's ``set_name`` and indices: row i stands for image i, so the noise rule gives it the same
    identity in features and in the LDS ground truth.
    """

    def __init__(self, set_name: str, tensors: torch.Tensor, labels: np.ndarray, class_names: Sequence[str]):
        if tensors.dim() != 4 or tensors.shape[-1] != tensors.shape[-2]:
            raise ConfigError(f"tensors must be square (N, C, h, h), got {tuple(tensors.shape)}")
        if tensors.shape[0] != len(labels):
            raise ConfigError(f"{tensors.shape[0]} tensors but {len(labels)} labels")
        super().__init__(
            set_name, labels, class_names, channels=tensors.shape[1], image_size=tensors.shape[-1]
        )
        self.tensors = tensors.float()

    def __getitem__(self, index: int) -> Sample:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.set_name} of {len(self)} rows")
        index %= len(self)
        return {"index": index, "image": self.tensors[index], "label": int(self.labels[index])}

    def take(self, indices: np.ndarray, set_name: str) -> ModelSpaceDataset:
        indices = np.asarray(indices, dtype=np.int64)
        return ModelSpaceDataset(
            set_name, self.tensors[torch.from_numpy(indices)], self.labels[indices], self.class_names
        )


class FileImageDataset(ImageDataset):
    """Images decoded from files with PIL on every access, for datasets too large to hold in memory.

    Each image is converted to RGB, center-cropped to a square (``crop_size``, or the shorter side) and
    resized with the same resampling as the in-memory datasets.
    """

    def __init__(
        self,
        set_name: str,
        paths: Sequence[Path],
        labels: np.ndarray,
        class_names: Sequence[str],
        image_size: int,
        crop_size: int | None = None,
    ):
        if len(paths) != len(labels):
            raise ConfigError(f"{len(paths)} files but {len(labels)} labels")
        super().__init__(set_name, labels, class_names, 3, image_size)
        self.paths = [Path(path) for path in paths]
        self.crop_size = crop_size

    def image_uint8(self, index: int) -> torch.Tensor:
        with Image.open(self.paths[index]) as image:
            cropped = center_crop_square(image.convert("RGB"), self.crop_size)
            pixels = torch.from_numpy(np.array(cropped, dtype=np.uint8)).permute(2, 0, 1)
        return resize_images(pixels.unsqueeze(0), self.image_size)[0]

    def take(self, indices: np.ndarray, set_name: str) -> FileImageDataset:
        indices = np.asarray(indices, dtype=np.int64)
        return FileImageDataset(
            set_name,
            [self.paths[i] for i in indices],
            self.labels[indices],
            self.class_names,
            self.image_size,
            self.crop_size,
        )
