"""Latent diffusion: a frozen VAE (``AutoencoderKL``) maps images to latents once, and a UNet is trained on them.

The latents of a dataset are encoded once and cached on disk beside a manifest naming the VAE (its class, config
and a hash of its weights): features, LDS ground truth and every subset model read the same latents, and a cache
made by another VAE is refused instead of silently mixed in.

Latents are the posterior MEAN times the VAE's scaling factor, not a posterior sample: a feature or a ground-truth
loss must be a function of the image alone, and the Stable Diffusion VAE's posterior is so narrow that the mean is
what a sample would be up to noise far below the diffusion noise.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from typing_extensions import override

from das_lightning.data import ImageDataset, ModelSpaceDataset, content_entry
from das_lightning.diffusion import make_scheduler
from das_lightning.distributed import process_device
from das_lightning.manifest import check_or_write_manifest, commit_file, hash_array, verified_file
from das_lightning.models.adapters import MeasuredModel, ModelAdapter, latent_cache_folder
from das_lightning.models.ddpm import DiffusionModule, OptimizerSettings, load_trained_network
from das_lightning.models.pretrained import load_pretrained_component

log = logging.getLogger(__name__)

LATENTS_FILE = "latents.safetensors"


def _scaling_factor(vae: torch.nn.Module) -> float:
    return float(getattr(vae.config, "scaling_factor", 1.0))


@torch.no_grad()
def encode_latents(vae: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Scaled posterior-mean latents of images in [-1, 1] (B, C, H, W), in the VAE's dtype, without gradients."""
    parameter = next(vae.parameters())
    posterior = vae.encode(images.to(device=parameter.device, dtype=parameter.dtype)).latent_dist
    return posterior.mean * _scaling_factor(vae)


@torch.no_grad()
def decode_latents(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (float32) from scaled latents."""
    parameter = next(vae.parameters())
    images = vae.decode(
        latents.to(device=parameter.device, dtype=parameter.dtype) / _scaling_factor(vae)
    ).sample
    return images.float().clamp(-1.0, 1.0)


def vae_identity(vae: torch.nn.Module) -> dict[str, Any]:
    """What makes one VAE's latents differ from another's: class, config and a hash of the weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    config = {key: value for key, value in dict(vae.config).items() if not key.startswith("_")}
    return {"class": type(vae).__name__, "config": config, "weights_sha256": digest.hexdigest()[:32]}


def cached_latents(
    vae: torch.nn.Module,
    dataset: ImageDataset,
    folder: Path,
    batch_size: int = 32,
    num_workers: int = 0,
) -> ModelSpaceDataset:
    """The latents of every image of ``dataset``: read from ``folder`` when cached, else encoded once and saved.

    Raises:
        ManifestMismatchError: ``folder`` holds latents of another VAE or another image set.
    """
    folder = Path(folder)
    manifest = {
        "vae": vae_identity(vae),
        "set_name": dataset.set_name,
        "num_images": len(dataset),
        "labels_hash": hash_array(dataset.labels),
        **content_entry(dataset),
        "image_size": dataset.image_size,
        "latent": "posterior mean x scaling_factor",
    }
    check_or_write_manifest(folder, manifest)
    target = verified_file(folder, LATENTS_FILE, f"delete {folder} and rerun to encode the latents again")
    if target is not None:
        latents = load_file(str(target))["latents"]
    else:
        log.info("encoding %d images of %s into %s", len(dataset), dataset.set_name, folder)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        was_training = vae.training
        vae.eval()
        try:
            latents = torch.cat([encode_latents(vae, batch["image"]).float().cpu() for batch in loader])
        finally:
            vae.train(was_training)
        # a reader never sees half a cache, and a damaged one is refused by its checksum
        commit_file(folder, LATENTS_FILE, lambda tmp: save_file({"latents": latents.contiguous()}, str(tmp)))
    encoded = ModelSpaceDataset(dataset.set_name, latents, dataset.labels, list(dataset.class_names))
    encoded.content_id = dataset.content_id
    return encoded


def load_vae(pretrained: str, subfolder: str | None = "vae") -> torch.nn.Module:
    """A frozen ``AutoencoderKL`` from a local folder or a cached hub id (offline; clear error when absent)."""
    from diffusers import AutoencoderKL

    return load_pretrained_component(AutoencoderKL, pretrained, subfolder).requires_grad_(False).eval()


class LatentEncoder:
    """Image set -> its cached latents under ``latents_dir`` (one folder per set, guarded by the VAE's identity);
    and back: :meth:`decode` turns sampled latents into images."""

    def __init__(self, vae: torch.nn.Module, latents_dir: Path, batch_size: int = 32):
        self.vae = vae
        self.latents_dir = Path(latents_dir)
        self.batch_size = batch_size

    def __call__(self, dataset: ImageDataset) -> ModelSpaceDataset:
        if isinstance(dataset, ModelSpaceDataset):
            return dataset
        folder = latent_cache_folder(self.latents_dir, dataset.set_name)
        return cached_latents(self.vae, dataset, folder, self.batch_size)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (float32, on the latents' device) of scaled latents, ``batch_size`` at a time."""
        return torch.cat(
            [
                decode_latents(self.vae, latents[start : start + self.batch_size]).to(latents.device)
                for start in range(0, len(latents), self.batch_size)
            ]
        )

    def to(self, device: torch.device | str) -> LatentEncoder:
        self.vae.to(device)
        return self


def class_label_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The label of each sample as the ``class_labels`` input of a class-conditional UNet."""
    return {"class_labels": torch.as_tensor(batch["label"]).long()}


class LatentDiffusionAdapter(ModelAdapter):
    """Measures a latent model on the VAE latents of each image set (class-conditional when its UNet is)."""

    def __init__(self, vae_pretrained: str, vae_subfolder: str | None = "vae", encode_batch_size: int = 32):
        self.vae_pretrained = vae_pretrained
        self.vae_subfolder = vae_subfolder
        self.encode_batch_size = encode_batch_size

    @override
    def load(self, unet_dir: Path, latents_dir: Path) -> MeasuredModel:
        network = load_trained_network(unet_dir)
        vae = load_vae(self.vae_pretrained, self.vae_subfolder)
        num_classes = int(getattr(network.config, "num_class_embeds", None) or 0)
        encoder = LatentEncoder(vae, latents_dir, self.encode_batch_size)
        schedule = make_scheduler()  # LatentDiffusionModule trains under the DDPM schedule
        return MeasuredModel(
            network,
            schedule.alphas_cumprod,
            self.weights_file(unet_dir),
            extra_inputs=class_label_inputs if num_classes else None,
            encode=encoder,
            # latents are not confined to [-1, 1]: DDIM must not clip its x_0 estimates
            scheduler_config={**schedule.config, "clip_sample": False},
            decode=encoder.decode,
            num_classes=num_classes,
        )


class LatentDiffusionModule(DiffusionModule):
    """L_simple training of a ``UNet2DModel`` on cached VAE latents (class-conditional when the UNet has
    ``num_class_embeds``: the label goes in as ``class_labels``).

    Args:
        unet, optimizer, seed: as for :class:`DiffusionModule`; the UNet's ``in_channels`` and ``sample_size``
            are the latent's (4 and image_size / 8 for the Stable Diffusion VAE).
        vae_pretrained, vae_subfolder: where the frozen VAE comes from (a pipeline folder with ``vae/``, or a
            standalone VAE with ``vae_subfolder=None``).
        latents_dir: the experiment's latent cache (``RunPaths.latents_dir``): the training set's latents go in
            its folder for that set, the same folder attribution and the LDS ground truth read.
        encode_batch_size: images per VAE call while filling the cache.

    Queries are generated in latent space and decoded by :class:`LatentDiffusionAdapter` (see
    :func:`~das_lightning.models.sampling.ddim_sample`).

    Horizontal flips (``train.random_flip``) then mirror latents, which approximates the latent of the mirrored
    image; turn them off to train on exact latents.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        optimizer: OptimizerSettings,
        seed: int = 0,
        *,
        vae_pretrained: str,
        latents_dir: str,
        vae_subfolder: str | None = "vae",
        encode_batch_size: int = 32,
    ):
        super().__init__(unet, optimizer, seed)
        self.vae_pretrained = vae_pretrained
        self.vae_subfolder = vae_subfolder
        self.latents_dir = Path(latents_dir)
        self.encode_batch_size = encode_batch_size

    @override
    def prepare_training_set(self, dataset: ImageDataset) -> ImageDataset:
        """The cached latents of ``dataset`` (encoded now when the cache is empty)."""
        vae = load_vae(self.vae_pretrained, self.vae_subfolder)
        vae = vae.to(process_device("auto"))
        folder = latent_cache_folder(self.latents_dir, dataset.set_name)
        return cached_latents(vae, dataset, folder, self.encode_batch_size)

    @override
    def model_inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if getattr(self.unet.config, "num_class_embeds", None):
            return batch["image"], {"class_labels": batch["label"]}
        return batch["image"], {}
