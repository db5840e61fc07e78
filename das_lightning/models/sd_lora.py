"""Stable Diffusion fine-tuned with LoRA (the paper's ArtBench setting, METHOD.md §4).

A pretrained pipeline (``model.pretrained``: a local diffusers folder or a Hugging Face hub id already in the local
cache; nothing is ever downloaded) supplies a frozen VAE, CLIP text encoder + tokenizer, the UNet and its training
noise schedule. Each image is conditioned on the prompt "a {style} painting" of its class; LoRA adapters on the
UNet's attention projections are the only weights that train, the only weights saved, and the parameters whose
gradients make the attribution features (``param_pattern="lora_"``).

For features, pass latents (:func:`das_lightning.models.latent.cached_latents`) as the images and
:class:`TextConditioning` as ``extra_inputs``: the VAE and the text encoder run once per batch outside the
differentiated function, which sees only latents and ``encoder_hidden_states``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from typing_extensions import override

from das_lightning.data import ImageDataset
from das_lightning.errors import ConfigError
from das_lightning.manifest import atomic_save, atomic_write_text
from das_lightning.models.adapters import MeasuredModel, ModelAdapter
from das_lightning.models.ddpm import DiffusionModule, OptimizerSettings, write_trained_loader
from das_lightning.models.latent import LatentEncoder, encode_latents
from das_lightning.models.pretrained import PretrainedModelNotFoundError, load_pretrained_component

PROMPT_TEMPLATE = "a {style} painting"
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
LORA_PARAMETER_PATTERN = "lora_"  # regex selecting the adapter weights (PerSampleGradients param_filter)
LORA_WEIGHTS_NAME = "lora_weights.safetensors"
LORA_SETTINGS_NAME = "lora.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class StableDiffusionParts:
    """The components of a Stable Diffusion pipeline that training and attribution use."""

    unet: (
        torch.nn.Module | None
    )  # None when the caller already holds the UNet (load_stable_diffusion(unet=False))
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    scheduler: Any  # a DDPMScheduler built from the pipeline's scheduler config (its training noise schedule)


@dataclass
class LoRASettings:
    """LoRA on the UNet attention projections; ``alpha=None`` means alpha = rank (scale 1), as in diffusers' examples."""

    rank: int = 128
    alpha: float | None = None
    target_modules: tuple[str, ...] = LORA_TARGET_MODULES
    dropout: float = 0.0


def load_stable_diffusion(pretrained: str, unet: bool = True) -> StableDiffusionParts:
    """The components of ``pretrained`` (a local folder or a cached hub id), as saved; callers freeze what they
    do not train. ``unet=False`` skips the UNet (the training module is handed one already)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    scheduler = load_pretrained_component(DDPMScheduler, pretrained, "scheduler")
    if scheduler.config.prediction_type != "epsilon":
        raise ConfigError(
            f"{pretrained} predicts {scheduler.config.prediction_type!r}; das-lightning's features and losses "
            "assume epsilon prediction (SD 1.x / miniSD)"
        )
    return StableDiffusionParts(
        unet=load_pretrained_component(UNet2DConditionModel, pretrained, "unet") if unet else None,
        vae=load_pretrained_component(AutoencoderKL, pretrained, "vae"),
        text_encoder=load_pretrained_component(CLIPTextModel, pretrained, "text_encoder"),
        tokenizer=load_pretrained_component(CLIPTokenizer, pretrained, "tokenizer"),
        scheduler=scheduler,
    )


def load_pretrained_unet(pretrained: str) -> torch.nn.Module:
    """The pretrained UNet alone (what ``model.unet`` instantiates for ``model=sd_lora``)."""
    from diffusers import UNet2DConditionModel

    return load_pretrained_component(UNet2DConditionModel, pretrained, "unet")


def add_lora(unet: torch.nn.Module, settings: LoRASettings) -> None:
    """Freeze ``unet`` and add trainable LoRA adapters to its attention projections (in place)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=settings.rank,
            lora_alpha=settings.alpha if settings.alpha is not None else settings.rank,
            lora_dropout=settings.dropout,
            init_lora_weights="gaussian",
            target_modules=list(settings.target_modules),
        )
    )


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, under PEFT's adapter-free names (what :func:`load_lora_weights` reads)."""
    from peft.utils import get_peft_model_state_dict

    return {
        name: tensor.detach().cpu().contiguous() for name, tensor in get_peft_model_state_dict(unet).items()
    }


def load_lora_weights(unet: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load adapter weights saved by :func:`lora_state_dict`; refuses a file whose names do not all fit."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, dict(state))
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ConfigError(f"LoRA weights do not fit the UNet: unexpected keys {unexpected[:5]}")


def class_prompts(class_names: Sequence[str], template: str = PROMPT_TEMPLATE) -> list[str]:
    """One prompt per class, e.g. post_impressionism -> "a post impressionism painting"."""
    return [template.format(style=name.replace("_", " ")) for name in class_names]


class TextConditioning:
    """Per-class CLIP text embeddings, encoded once: a batch's conditioning is a row lookup by label.

    The text encoder is frozen and there are only as many prompts as classes, so encoding the prompts once gives
    exactly what encoding every sample's prompt would. Call it on a batch (it reads ``batch["label"]``) to get the
    per-sample ``extra`` inputs of :class:`~das_lightning.attribution.grads.PerSampleGradients`.
    """

    def __init__(self, tokenizer: Any, text_encoder: torch.nn.Module, prompts: Sequence[str]):
        self.prompts = list(prompts)
        tokens = tokenizer(
            self.prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        parameter = next(text_encoder.parameters())
        with torch.no_grad():
            hidden = text_encoder(tokens.input_ids.to(parameter.device))[0]
        self.embeddings = hidden.detach().float().cpu()  # (classes, tokens, text width)
        self._on_device: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def for_labels(self, labels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``encoder_hidden_states`` (B, tokens, width) for class labels (B,)."""
        key = (str(labels.device), dtype)
        if key not in self._on_device:
            self._on_device[key] = self.embeddings.to(device=labels.device, dtype=dtype)
        return self._on_device[key][labels.long()]

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {"encoder_hidden_states": self.for_labels(torch.as_tensor(batch["label"]))}


class StableDiffusionLoRAModule(DiffusionModule):
    """LoRA fine-tuning of a pretrained Stable Diffusion UNet on class-prompted images (L_simple in latent space).

    Args:
        unet: the pretrained ``UNet2DConditionModel`` (adapters are added here; its own weights are frozen).
        optimizer: AdamW + schedule settings (the paper: lr 3e-4).
        seed: training-noise seed (see :class:`DiffusionModule`).
        pretrained: the pipeline ``unet`` came from; the VAE, text encoder, tokenizer and schedule are read from it.
        rank, alpha: LoRA rank (128 in the paper) and alpha (None: = rank).
        prompt_template: the prompt of a class, with ``{style}`` for its name.
        frozen_dtype: dtype of the frozen weights on a GPU ("float16" or "bfloat16" halve their memory; the LoRA
            weights stay float32 for the optimizer). Ignored on the CPU, where half-precision kernels are slow.
        class_names: the class of each label; normally filled from the training set by :meth:`prepare_training_set`.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        optimizer: OptimizerSettings,
        seed: int = 0,
        *,
        pretrained: str,
        rank: int = 128,
        alpha: float | None = None,
        prompt_template: str = PROMPT_TEMPLATE,
        frozen_dtype: str = "float32",
        class_names: Sequence[str] | None = None,
    ):
        if frozen_dtype not in _DTYPES:
            raise ConfigError(f"frozen_dtype must be one of {sorted(_DTYPES)}, not {frozen_dtype!r}")
        lora_settings = LoRASettings(rank=int(rank), alpha=alpha)
        add_lora(unet, lora_settings)  # before the base class sees the UNet, so its EMA copy (if any) matches
        super().__init__(unet, optimizer, seed)
        self.lora_settings = lora_settings
        parts = load_stable_diffusion(pretrained, unet=False)  # the UNet is the one handed in: load it once
        self.pretrained = pretrained
        self.vae = parts.vae.requires_grad_(False).eval()
        self.text_encoder = parts.text_encoder.requires_grad_(False).eval()
        self.tokenizer = parts.tokenizer
        # the pipeline's own training schedule (SD: scaled-linear betas), not the pixel DDPM one
        self.noise_scheduler = parts.scheduler
        self.alphas_cumprod = parts.scheduler.alphas_cumprod.clone()
        self.prompt_template = prompt_template
        self.frozen_dtype = frozen_dtype
        self.class_names = list(class_names) if class_names is not None else None
        self._conditioning: TextConditioning | None = None
        # checkpoints hold only the adapters (see on_save_checkpoint); the frozen weights come from `pretrained`
        self.strict_loading = False

    @override
    def prepare_training_set(self, dataset: ImageDataset) -> ImageDataset:
        """Read the class names the prompts are made from; images stay pixels (flipped, then encoded per batch)."""
        if self.class_names is None:
            self.class_names = list(dataset.class_names)
        elif list(self.class_names) != list(dataset.class_names):
            raise ConfigError(
                f"class_names {self.class_names} differ from the dataset's {dataset.class_names}"
            )
        return dataset

    @property
    def conditioning(self) -> TextConditioning:
        if self._conditioning is None:
            if self.class_names is None:
                raise RuntimeError("no class names: call prepare_training_set(dataset) or pass class_names")
            prompts = class_prompts(self.class_names, self.prompt_template)
            self._conditioning = TextConditioning(self.tokenizer, self.text_encoder, prompts)
        return self._conditioning

    @override
    def train(self, mode: bool = True) -> StableDiffusionLoRAModule:
        """Lightning switches the whole module to train mode; the frozen encoders stay deterministic."""
        super().train(mode)
        self.vae.eval()
        self.text_encoder.eval()
        return self

    @override
    def on_fit_start(self) -> None:
        if self.device.type != "cuda" or self.frozen_dtype == "float32":
            return
        self.cast_frozen_weights(_DTYPES[self.frozen_dtype])

    def cast_frozen_weights(self, dtype: torch.dtype) -> None:
        """Every weight of the UNet, VAE and text encoder but the adapters to ``dtype`` (on_fit_start does it on
        a GPU; tests and benchmarks call it on any device)."""
        trainable = {id(parameter) for parameter in self.trainable_parameters()}
        for module in (self.unet, self.vae, self.text_encoder):
            for parameter in module.parameters():
                if id(parameter) not in trainable:
                    # in place on .data: the optimizer already holds these Parameter objects
                    parameter.data = parameter.data.to(dtype)

    @override
    def model_inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(VAE latents of the images, {"encoder_hidden_states": the class prompts' text embeddings})."""
        latents = encode_latents(self.vae, batch["image"])
        hidden = self.conditioning.for_labels(batch["label"], dtype=latents.dtype)
        return latents, {"encoder_hidden_states": hidden}

    @override
    def save_trained(self, folder: str) -> None:
        """Only the adapters (safetensors) and what rebuilds the pipeline around them."""
        target = Path(folder)
        target.mkdir(parents=True, exist_ok=True)
        state = lora_state_dict(self.unet)
        atomic_save(target / LORA_WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp)))
        settings = {
            "pretrained": self.pretrained,
            "lora": asdict(self.lora_settings),
            "prompt_template": self.prompt_template,
            "class_names": self.class_names,
        }
        atomic_write_text(target / LORA_SETTINGS_NAME, json.dumps(settings, indent=2))
        write_trained_loader(target, f"{__name__}:load_trained_unet")

    @override
    def snapshot_state(self) -> dict[str, torch.Tensor]:
        """The adapters only, under the UNet's own names: the frozen weights are the pretrained pipeline's."""
        return {
            name: tensor
            for name, tensor in super().snapshot_state().items()
            if LORA_PARAMETER_PATTERN in name
        }

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] = {
            name: tensor
            for name, tensor in checkpoint["state_dict"].items()
            if LORA_PARAMETER_PATTERN in name
        }


@dataclass
class TrainedLoRAModel:
    """A trained LoRA run rebuilt around its pretrained pipeline: everything attribution needs."""

    parts: StableDiffusionParts  # parts.unet carries the trained adapters
    class_names: list[str]
    prompt_template: str
    lora: LoRASettings = field(default_factory=LoRASettings)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.parts.scheduler.alphas_cumprod

    def text_conditioning(self) -> TextConditioning:
        return TextConditioning(
            self.parts.tokenizer,
            self.parts.text_encoder,
            class_prompts(self.class_names, self.prompt_template),
        )

    def pipeline(self) -> Any:
        """A ``StableDiffusionPipeline`` (DDIM-ready scheduler of the same schedule) for sampling."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.parts.vae,
            text_encoder=self.parts.text_encoder,
            tokenizer=self.parts.tokenizer,
            unet=self.parts.unet,
            scheduler=self.parts.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def load_trained_lora(folder: str | Path) -> TrainedLoRAModel:
    """Rebuild the pretrained pipeline named in ``folder`` and load the adapters saved there."""
    folder = Path(folder)
    settings = json.loads((folder / LORA_SETTINGS_NAME).read_text())
    lora = LoRASettings(**{**settings["lora"], "target_modules": tuple(settings["lora"]["target_modules"])})
    parts = load_stable_diffusion(settings["pretrained"])
    add_lora(parts.unet, lora)
    load_lora_weights(parts.unet, load_file(str(folder / LORA_WEIGHTS_NAME)))
    # as in training: adapters require grad, everything else is frozen, so "all trainable" = "the adapters"
    parts.unet.eval()
    for module in (parts.vae, parts.text_encoder):
        module.requires_grad_(False).eval()
    return TrainedLoRAModel(parts, list(settings["class_names"] or []), settings["prompt_template"], lora)


def load_trained_unet(folder: str | Path) -> torch.nn.Module:
    """The UNet with its trained adapters (the loader ``artifacts.load_unet`` uses for LoRA runs)."""
    return load_trained_lora(folder).parts.unet


class LoRAAdapter(ModelAdapter):
    """Measures a LoRA run: its adapted UNet on the VAE latents of each image set, conditioned on the class
    prompts, under the pipeline's own schedule; the adapter weights file identifies the model."""

    weights_name = LORA_WEIGHTS_NAME

    def __init__(self, encode_batch_size: int = 32):
        self.encode_batch_size = encode_batch_size

    @override
    def load(self, unet_dir: Path, latents_dir: Path) -> MeasuredModel:
        trained = load_trained_lora(unet_dir)
        encoder = LatentEncoder(trained.parts.vae, latents_dir, self.encode_batch_size)
        return MeasuredModel(
            trained.parts.unet,
            trained.alphas_cumprod.clone(),
            self.weights_file(unet_dir),
            extra_inputs=trained.text_conditioning(),
            encode=encoder,
            # the pipeline's own schedule and offsets (set_alpha_to_one, steps_offset, spacing), except clipping:
            # SD latents are not bounded by 1, and a PNDM config without clip_sample would inherit DDIM's True
            scheduler_config={**trained.parts.scheduler.config, "clip_sample": False},
            decode=encoder.decode,
            num_classes=len(trained.class_names),
        )


__all__ = [
    "PretrainedModelNotFoundError",
    "load_pretrained_component",
]  # re-exported: their home is models/pretrained.py
