"""A tiny random Stable Diffusion pipeline saved as a local diffusers folder, so the SD + LoRA path runs offline
in seconds (the tests on a CPU, ``benchmarks/gpu_check.py`` on a GPU): the same file layout as
``lambdalabs/miniSD-diffusers``, with a few thousand weights."""

from __future__ import annotations

import json
import string
from pathlib import Path

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
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tokenizer_files = write_tiny_clip_tokenizer_files(folder.parent / f"{folder.name}-tokenizer-source")
    # from_pretrained reads vocab.json + merges.txt with both the slow (transformers 4) and fast (5) tokenizers
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_files), model_max_length=MAX_TOKENS)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_HIDDEN,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
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
