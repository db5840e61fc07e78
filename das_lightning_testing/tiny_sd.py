"""A tiny random Stable Diffusion pipeline saved as a local diffusers folder, so the SD + LoRA path runs offline
in seconds (the tests on a CPU, ``benchmarks/gpu_check.py`` on a GPU): the same file layout as
``lambdalabs/miniSD-diffusers``, with a few thousand weights."""

from __future__ import annotations

import json
import string
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

IMAGE_SIZE = 16  # pixels by default; the default VAE halves it once, so latents are 4 x 8 x 8
TEXT_HIDDEN = 16
MAX_TOKENS = 24


def write_tiny_clip_tokenizer_files(folder: Path) -> Path:
    """vocab.json + merges.txt of a character-level BPE vocabulary (lower-case letters, digits, end-of-word forms),
    enough for CLIPTokenizer to encode prompts like "a ukiyo e painting"."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits)
    tokens = ["<|startoftext|>", "<|endoftext|>"] + symbols + [symbol + "</w>" for symbol in symbols]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def build_tiny_sd_pipeline(
    folder: Path,
    seed: int = 0,
    image_size: int = IMAGE_SIZE,
    vae_channels: tuple[int, ...] = (8, 16),
) -> Path:
    """Random VAE, CLIP text encoder + tokenizer and UNet2DConditionModel, saved with
    ``StableDiffusionPipeline.save_pretrained``; returns the folder (usable as ``model.pretrained``).

    The VAE halves the image once per block after the first: ``vae_channels=(8, 8, 16, 16)`` downsamples 8x as
    Stable Diffusion's does (256 px images, 32 x 32 latents)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer, text_encoder = _text_parts(folder, TEXT_HIDDEN)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        block_out_channels=tuple(vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=image_size,
    )
    unet = UNet2DConditionModel(
        sample_size=image_size // 2 ** (len(vae_channels) - 1),
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=4,
        cross_attention_dim=TEXT_HIDDEN,
    )
    return _save_pipeline(folder, tokenizer, text_encoder, vae, unet)


# Stable Diffusion 1.x's UNet and VAE, key for key where they differ from diffusers' defaults (CompVis/
# stable-diffusion-v1-4 unet/config.json and vae/config.json). lambdalabs/miniSD-diffusers, the paper's ArtBench
# network (METHOD.md §4), is v1.4 fine-tuned at 256 px: the same networks, 32 x 32 latents.
SD1_UNET = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
}
SD1_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
}
SD1_UNET_PARAMETERS = 859_520_964  # UNet2DConditionModel(**SD1_UNET): Stable Diffusion 1.x's 860M


def build_sd1_shaped_pipeline(folder: Path, seed: int = 0) -> Path:
    """A random pipeline in miniSD's layout whose UNet and VAE are Stable Diffusion 1.x's networks
    (:data:`SD1_UNET`, :data:`SD1_VAE`: 860M + 84M parameters, 3.8 GB on disk), so the ArtBench experiments run
    offline on the paper-size UNet, where the LoRA adapters and every attribution gradient live. The frozen text
    encoder keeps SD's width (768, the UNet's cross-attention size) but one layer and the character vocabulary of
    :func:`write_tiny_clip_tokenizer_files`: CLIP's own vocabulary and weights cannot be made offline."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer, text_encoder = _text_parts(folder, SD1_UNET["cross_attention_dim"])
    vae, unet = AutoencoderKL(**SD1_VAE), UNet2DConditionModel(**SD1_UNET)
    return _save_pipeline(folder, tokenizer, text_encoder, vae, unet)


def _text_parts(folder: Path, text_hidden: int):
    """The character tokenizer and a random one-layer CLIP text encoder of width ``text_hidden``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer_files = write_tiny_clip_tokenizer_files(folder.parent / f"{folder.name}-tokenizer-source")
    # from_pretrained reads vocab.json + merges.txt with both the slow (transformers 4) and fast (5) tokenizers
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_files), model_max_length=MAX_TOKENS)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_hidden,
            intermediate_size=2 * text_hidden,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return tokenizer, text_encoder


def _save_pipeline(folder: Path, tokenizer, text_encoder, vae, unet) -> Path:
    """SD 1.x's scheduler beside the parts, saved as a diffusers pipeline folder (safetensors)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    # Stable Diffusion 1.x's scheduler as pipelines ship it: PNDM with scaled-linear betas, no clip_sample key
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(folder), safe_serialization=True)
    return folder


@dataclass
class LoRAStepResult:
    """What :func:`lora_step_and_features` measured."""

    device: str
    frozen_dtypes: list[str]  # dtypes of the frozen UNet weights after the step (float32 on a CPU, see below)
    lora_dtypes: list[str]
    loss: float
    step_seconds: float  # the training step: Trainer start-up included, so an upper bound
    num_lora_parameters: int
    features: torch.Tensor  # (B, k) projected LoRA features, float32, on the CPU
    feature_seconds: float


def lora_step_and_features(
    pretrained: str | Path,
    device: torch.device | str,
    image_size: int,
    frozen_dtype: str = "bfloat16",
    batch_size: int = 4,
    rank: int = 4,
    timesteps: Sequence[int] = (100, 400, 700),
    dim: int = 256,
    seed: int = 0,
) -> LoRAStepResult:
    """One LoRA training step through Lightning (frozen weights cast to ``frozen_dtype`` on a GPU, as
    ``model=sd_lora`` does), then projected per-sample LoRA features of the same random images with the trained
    adapters and the frozen weights still in that dtype.

    ``StableDiffusionLoRAModule`` casts the frozen weights only on CUDA (half-precision kernels are slow on a CPU),
    so on a CPU the same code runs in float32; ``frozen_dtypes`` says what ran.
    """
    from torch.utils.data import DataLoader

    from das_lightning.attribution.grads import PerSampleGradients
    from das_lightning.attribution.projectors import build_projector
    from das_lightning.models.ddpm import OptimizerSettings
    from das_lightning.models.sd_lora import (
        LORA_PARAMETER_PATTERN,
        StableDiffusionLoRAModule,
        load_pretrained_unet,
    )

    device = torch.device(device)
    pretrained = str(pretrained)
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand((batch_size, 3, image_size, image_size), generator=generator) * 2 - 1
    labels = torch.arange(batch_size) % 2
    samples = [{"image": image, "label": label} for image, label in zip(images, labels, strict=True)]
    torch.manual_seed(seed)
    module = StableDiffusionLoRAModule(
        load_pretrained_unet(pretrained),
        OptimizerSettings(lr=1e-3, warmup_steps=0, total_steps=1),
        seed=seed,
        pretrained=pretrained,
        rank=rank,
        frozen_dtype=frozen_dtype,
        class_names=["post_impressionism", "ukiyo_e"],
    )
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    started = time.perf_counter()
    trainer.fit(module, DataLoader(samples, batch_size=batch_size))
    step_seconds = time.perf_counter() - started
    loss = float(trainer.callback_metrics["train/loss"])

    module.to(device)  # Lightning hands the module back on the CPU
    lora = [parameter for name, parameter in module.unet.named_parameters() if LORA_PARAMETER_PATTERN in name]
    frozen = [
        parameter for name, parameter in module.unet.named_parameters() if LORA_PARAMETER_PATTERN not in name
    ]
    batch = {"image": images.to(device), "label": labels.to(device)}
    started = time.perf_counter()
    latents, extra = module.model_inputs(batch)  # in the frozen VAE's dtype, as the UNet's frozen weights
    gradients = PerSampleGradients(
        module.unet,
        module.alphas_cumprod,
        "mean",
        list(timesteps),
        normalize_per_timestep=True,
        param_filter=LORA_PARAMETER_PATTERN,
    )
    projector = build_projector("dense", gradients.num_parameters, dim, seed=seed)
    rows = projector.project(gradients.flat_gradients(latents, list(range(batch_size)), "lora-check", extra))
    features = rows.float().cpu()  # waits for the device
    return LoRAStepResult(
        device=str(device),
        frozen_dtypes=sorted({str(parameter.dtype).removeprefix("torch.") for parameter in frozen}),
        lora_dtypes=sorted({str(parameter.dtype).removeprefix("torch.") for parameter in lora}),
        loss=loss,
        step_seconds=step_seconds,
        num_lora_parameters=gradients.num_parameters,
        features=features,
        feature_seconds=time.perf_counter() - started,
    )
