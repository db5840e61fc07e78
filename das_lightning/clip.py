"""CLIP image embeddings from the local Hugging Face cache (never downloaded here): the clip baseline, candidate
screening (method.screen_by=clip) and the counterfactual's similarity of regenerated images all use these."""

from __future__ import annotations

import numpy as np
import torch

from das_lightning.data import ImageDataset
from das_lightning.errors import MissingArtifactError


def load_local_clip(model_name: str):
    """(CLIPModel, CLIPProcessor) from the local cache, or one clear error saying how to get them."""
    try:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(model_name, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(model_name, local_files_only=True)
    except (OSError, ImportError, ValueError) as error:
        raise MissingArtifactError(
            f"method=clip needs the CLIP model {model_name!r} in the local Hugging Face cache and it is not there "
            f"({type(error).__name__}). When online, fetch it once with `huggingface-cli download {model_name}` "
            "(and `pip install transformers`), or set method.clip_model=/path/to/a/local/clip/folder."
        ) from error
    return model.eval(), processor


def clip_image_embeddings(images: torch.Tensor, model_name: str) -> np.ndarray:
    """CLIP embeddings of images (B, C, H, W) in [-1, 1]; grey images are repeated over three channels."""
    model, processor = load_local_clip(model_name)
    pixels = ((images + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    if pixels.shape[1] == 1:
        pixels = pixels.repeat(1, 3, 1, 1)
    embeddings = []
    with torch.no_grad():
        for start in range(0, len(pixels), 64):
            batch = [image.permute(1, 2, 0).numpy() for image in pixels[start : start + 64]]
            pixel_values = processor(images=batch, return_tensors="pt")["pixel_values"]
            embeddings.append(model.get_image_features(pixel_values=pixel_values).float())
    return torch.cat(embeddings).numpy()


def clip_embeddings(dataset: ImageDataset, model_name: str) -> np.ndarray:
    """CLIP embeddings of every image of a dataset."""
    return clip_image_embeddings(dataset_images(dataset), model_name)


def dataset_images(dataset: ImageDataset) -> torch.Tensor:
    """All images of a dataset as one (N, C, H, W) tensor."""
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])
