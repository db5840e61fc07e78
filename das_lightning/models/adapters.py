"""How the measuring stages (features, DAS residuals, LDS ground truth) load a trained model and feed it.

A pixel DDPM denoises images under the DDPM schedule with no conditioning; a latent or Stable Diffusion + LoRA model
denoises cached VAE latents under its own schedule, with per-sample conditioning (class labels, text embeddings).
The model config names its adapter (``model.adapter``, default :class:`ModelAdapter`), so attribute.py and
evaluate_lds.py never branch on model names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from das_lightning.data import ImageDataset
from das_lightning.diffusion import make_scheduler
from das_lightning.models.ddpm import load_trained_network

# batch {"index", "label", ...} -> per-sample keyword inputs of the network, leading dimension = batch
ExtraInputs = Callable[[Mapping[str, Any]], Mapping[str, torch.Tensor]]
Encoder = Callable[[ImageDataset], ImageDataset]


def _pixel_schedule() -> dict[str, Any]:
    return dict(make_scheduler().config)


@dataclass
class MeasuredModel:
    """A trained network and what it needs to be measured on a dataset, and to generate from.

    ``num_classes`` > 0 means the network is conditioned on a class (a class embedding, or the class's prompt):
    generated image j then belongs to class j mod num_classes, and ``extra_inputs`` of its label condition it.
    """

    network: torch.nn.Module
    alphas_cumprod: torch.Tensor  # the schedule the network was trained with
    weights_file: Path  # hashed into feature, score, ground-truth and generated-query manifests
    extra_inputs: ExtraInputs | None = None
    # images -> what the network denoises (latents); None: the images themselves
    encode: Encoder | None = None
    # the training schedule's config, which DDIM sampling is built from
    scheduler_config: Mapping[str, Any] = field(default_factory=_pixel_schedule)
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None  # sampled latents -> images in [-1, 1]
    num_classes: int = 0

    def model_space(self, dataset: ImageDataset) -> ImageDataset:
        """``dataset`` as the network sees it, with the same set name and indices (so the same rule noise)."""
        return self.encode(dataset) if self.encode is not None else dataset

    def to(self, device: torch.device | str) -> MeasuredModel:
        """Move the network and the encoder/decoder's weights (a VAE) to ``device``."""
        self.network.to(device)
        if hasattr(self.encode, "to"):
            self.encode.to(device)
        return self


def dataset_extra(extra_inputs: ExtraInputs | None, dataset: ImageDataset) -> dict[str, torch.Tensor] | None:
    """The extra inputs of every row of ``dataset`` at once (row i belongs to ``dataset[i]``), on the CPU."""
    if extra_inputs is None:
        return None
    batch = {
        "index": torch.arange(len(dataset)),
        "label": torch.as_tensor(np.asarray(dataset.labels), dtype=torch.long),
    }
    return {key: value.detach().cpu() for key, value in extra_inputs(batch).items()}


def latent_cache_folder(latents_dir: Path, set_name: str) -> Path:
    """One cache folder per image set (set names such as ``artbench2/test:q64`` hold path separators)."""
    return Path(latents_dir) / set_name.replace("/", "_").replace(":", "_")


class ModelAdapter:
    """The default: a pixel-space ``UNet2DModel`` trained under the DDPM schedule, unconditioned."""

    weights_name = "diffusion_pytorch_model.safetensors"

    def weights_file(self, unet_dir: Path) -> Path:
        """The file whose hash identifies the trained weights (cheap: nothing is loaded)."""
        return Path(unet_dir) / self.weights_name

    def load(self, unet_dir: Path, latents_dir: Path) -> MeasuredModel:
        """The model saved in ``unet_dir``; ``latents_dir`` is where latent models cache encoded image sets."""
        return MeasuredModel(
            load_trained_network(unet_dir), make_scheduler().alphas_cumprod, self.weights_file(unet_dir)
        )
