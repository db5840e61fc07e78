"""How the measuring stages (features, DAS residuals, LDS ground truth) load a trained model and feed it.

A pixel DDPM denoises images under the DDPM schedule with no conditioning; a latent or Stable Diffusion + LoRA model
denoises cached VAE latents under its own schedule, with per-sample conditioning (class labels, text embeddings).
The model config names its adapter (``model.adapter``, default :class:`ModelAdapter`), so attribute.py and
evaluate_lds.py never branch on model names.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from das_lightning.data import ImageDataset
from das_lightning.diffusion import NUM_TRAIN_TIMESTEPS, make_scheduler
from das_lightning.errors import ConfigError, MissingArtifactError
from das_lightning.models.ddpm import load_trained_network

log = logging.getLogger(__name__)

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


class PretrainedAdapter(ModelAdapter):
    """A pixel-space diffusers model trained elsewhere (``model=pretrained model.pretrained=PATH``): a
    ``DDPMPipeline`` folder as published (google/ddpm-cifar10-32's layout: ``model_index.json``, ``unet/`` with
    ``config.json`` + ``diffusion_pytorch_model.safetensors``, ``scheduler/scheduler_config.json``), or a bare
    ``UNet2DModel`` folder. The training schedule is read from the pipeline's ``scheduler/`` (a bare UNet gets the
    DDPM default of METHOD.md §4, said in the log). Weights load through safetensors only, never a pickle."""

    bin_name = "diffusion_pytorch_model.bin"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()

    @property
    def is_pipeline(self) -> bool:
        return (self.folder / "model_index.json").exists() or (self.folder / "unet").is_dir()

    @property
    def unet_dir(self) -> Path:
        return self.folder / "unet" if self.is_pipeline else self.folder

    def weights_file(self, unet_dir: Path | None = None) -> Path:
        path = self.unet_dir / self.weights_name
        if path.exists():
            return path
        if (self.unet_dir / self.bin_name).exists():
            raise MissingArtifactError(
                f"model.pretrained={self.folder}: {self.unet_dir} holds only {self.bin_name}, a pickle, which "
                "das-lightning never loads (unpickling can run code). Convert it once, on a machine where you "
                f"trust the file: UNet2DModel.from_pretrained('{self.unet_dir}', use_safetensors=False)"
                f".save_pretrained('{self.unet_dir}', safe_serialization=True) writes {self.weights_name} beside it"
            )
        raise MissingArtifactError(
            f"model.pretrained={self.folder}: no {self.weights_name} in {self.unet_dir} (a diffusers DDPMPipeline "
            "folder with unet/ and scheduler/, or a UNet2DModel folder, saved with safetensors)"
        )

    def unet_config(self) -> dict[str, Any]:
        path = self.unet_dir / "config.json"
        if not path.exists():
            raise MissingArtifactError(
                f"model.pretrained={self.folder}: no config.json in {self.unet_dir} (a diffusers UNet2DModel folder)"
            )
        return json.loads(path.read_text())

    def schedule(self) -> dict[str, Any]:
        """The training scheduler's config, from the pipeline's ``scheduler/`` (one clear error when the project
        cannot measure under it); the DDPM default for a bare UNet folder."""
        from diffusers import DDPMScheduler

        config_file = self.folder / "scheduler" / "scheduler_config.json"
        if not config_file.exists():
            if self.is_pipeline:  # a pipeline without its scheduler: the schedule its UNet learned is unknown
                raise MissingArtifactError(
                    f"model.pretrained={self.folder} is a diffusers pipeline without {config_file.relative_to(self.folder)}"
                    ": the noise schedule the UNet was trained under is unknown (copy the scheduler/ folder of the "
                    "published pipeline beside unet/)"
                )
            log.warning(
                "%s has no scheduler/: assuming the DDPM default (1000 steps, linear betas)", self.folder
            )
            return _pixel_schedule()
        raw = json.loads(config_file.read_text())
        problems = []
        class_name = raw.get("_class_name", "DDPMScheduler")
        if class_name != "DDPMScheduler" and class_name not in DDPMScheduler._compatibles:
            problems.append(f"_class_name {class_name!r} is not a DDPM-compatible diffusers scheduler")
        steps = raw.get("num_train_timesteps", raw.get("timesteps"))
        if steps is not None and int(steps) != NUM_TRAIN_TIMESTEPS:
            problems.append(
                f"num_train_timesteps {steps} (the timestep grids and ground truth use {NUM_TRAIN_TIMESTEPS})"
            )
        if raw.get("prediction_type", "epsilon") != "epsilon":
            problems.append(
                f"prediction_type {raw['prediction_type']!r} (features and losses are of predicted noise)"
            )
        if str(raw.get("variance_type", "fixed_small")).startswith("learned"):
            problems.append(
                f"variance_type {raw['variance_type']!r} (a UNet that also predicts its variance)"
            )
        if not problems:
            try:
                config = dict(DDPMScheduler.from_config(raw).config)
            except (NotImplementedError, ValueError) as error:
                problems.append(f"a schedule diffusers cannot build ({error})")
        if problems:
            raise ConfigError(
                f"{config_file}: das-lightning measures epsilon-prediction DDPMs trained on {NUM_TRAIN_TIMESTEPS} "
                "timesteps; this scheduler has " + "; ".join(problems)
            )
        training = _pixel_schedule()
        differs = [key for key in ("beta_schedule", "beta_start", "beta_end") if config[key] != training[key]]
        if differs or config.get("trained_betas") is not None:
            log.warning(
                "%s: the pipeline's schedule (%s) is not train.py's (linear 1e-4..0.02): features use the "
                "pipeline's own; subset models for an LDS must be trained under the same schedule",
                config_file,
                ", ".join(f"{key}={config[key]}" for key in differs) or "trained_betas",
            )
        return config

    def check_fits(self, channels: int, image_size: int) -> None:
        """A clear error before any work when the network cannot take the training images."""
        config = self.unet_config()
        sample_size = config.get("sample_size")
        sample_size = sample_size[0] if isinstance(sample_size, list | tuple) else sample_size
        problems = []
        if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
            problems.append(
                f"a {config['_class_name']} (only pixel-space UNet2DModel pipelines are supported)"
            )
        if config.get("in_channels") != channels:
            problems.append(f"in_channels {config.get('in_channels')} vs the dataset's {channels} channels")
        if config.get("out_channels", config.get("in_channels")) != config.get("in_channels"):
            problems.append(
                f"out_channels {config.get('out_channels')} != in_channels (a UNet that predicts more than the noise)"
            )
        if sample_size is not None and int(sample_size) != image_size:
            problems.append(f"sample_size {sample_size} vs dataset.image_size={image_size}")
        if config.get("num_class_embeds") or config.get("class_embed_type"):
            problems.append("a class-conditioned UNet (only unconditioned pretrained models are supported)")
        if problems:
            raise ConfigError(f"model.pretrained={self.folder} does not fit the data: " + "; ".join(problems))

    def load(self, unet_dir: Path | None = None, latents_dir: Path | None = None) -> MeasuredModel:
        from diffusers import DDPMScheduler

        weights = self.weights_file()  # first: a pickle-only folder is refused before anything is read
        schedule = self.schedule()
        return MeasuredModel(
            load_trained_network(self.unet_dir),
            DDPMScheduler.from_config(schedule).alphas_cumprod,
            weights,
            scheduler_config=schedule,
        )
