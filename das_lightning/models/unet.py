"""UNet presets: the tiny CPU model, a ~1M-parameter 32x32 model for benchmarks, and the paper's CIFAR and
CelebA UNets (METHOD.md §4). One registry, so configs, tests and benchmarks build the same networks."""

from __future__ import annotations

from typing import Any

from diffusers import UNet2DModel

from das_lightning.errors import ConfigError

UNET_PRESETS: dict[str, dict[str, Any]] = {
    # ~0.1 s per batch of 64 at 16x16 on 2 CPU cores: the default for demos and tests
    "tiny": dict(
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    ),
    # ~1M parameters: the larger CPU benchmark model
    "small": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
        attention_head_dim=16,
    ),
    # the DDPM CIFAR-10 UNet used by D-TRAK and DAS (35.7M parameters at 32x32)
    "cifar": dict(
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        dropout=0.1,
    ),
}
# CelebA 64x64: METHOD.md §4 names only "DDPM UNet 64x64", no architecture of its own, so the preset IS the CIFAR
# UNet (one definition, not a copy) and differs only by the sample size the dataset config gives it (64 px).
UNET_PRESETS["celeba"] = UNET_PRESETS["cifar"]


def build_unet(preset: str, sample_size: int, channels: int, **overrides: Any) -> UNet2DModel:
    """A ``UNet2DModel`` from a named preset; ``overrides`` replace preset keys (e.g. ``dropout=0.0``)."""
    if preset not in UNET_PRESETS:
        raise ConfigError(f"unknown UNet preset {preset!r}; choose one of {sorted(UNET_PRESETS)}")
    kwargs = {**UNET_PRESETS[preset], **overrides}
    kwargs = {key: tuple(value) if isinstance(value, list) else value for key, value in kwargs.items()}
    return UNet2DModel(sample_size=sample_size, in_channels=channels, out_channels=channels, **kwargs)


def count_parameters(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())
