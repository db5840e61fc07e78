"""UNet presets by name: the tiny CPU model, a ~1M-parameter 32x32 model for benchmarks, and the paper's CIFAR,
CelebA and DAS-CIFAR-2 UNets (METHOD.md §4; the YAMLs of conf/model/ name their published sources)."""

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
    # the paper networks, key for key as conf/model/{cifar,celeba,cifar_das}.yaml (their sources are named there;
    # tests/test_presets.py checks that both build the same network) for the benchmarks that build by name
    # D-TRAK's CIFAR10/config.json: 35,746,307 parameters at 32x32
    "cifar": dict(
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        norm_eps=1e-6,
        dropout=0.0,
    ),
    # D-TRAK's CelebA/config.json: 113,673,219 parameters at 64x64
    "celeba": dict(
        block_out_channels=(128, 128, 256, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
        attention_head_dim=8,
        dropout=0.0,
    ),
}
# the DAS authors' CIFAR-2 variant (Jinxu-Lin/DAS CIFAR2/config.json): D-TRAK's with scale_shift, 38,307,203
UNET_PRESETS["cifar_das"] = {
    **UNET_PRESETS["cifar"],
    "resnet_time_scale_shift": "scale_shift",
    "attn_norm_num_groups": 32,
    "dropout": 0.1,
}


def build_unet(preset: str, sample_size: int, channels: int, **overrides: Any) -> UNet2DModel:
    """A ``UNet2DModel`` from a named preset; ``overrides`` replace preset keys (e.g. ``dropout=0.0``)."""
    if preset not in UNET_PRESETS:
        raise ConfigError(f"unknown UNet preset {preset!r}; choose one of {sorted(UNET_PRESETS)}")
    kwargs = {**UNET_PRESETS[preset], **overrides}
    kwargs = {key: tuple(value) if isinstance(value, list) else value for key, value in kwargs.items()}
    return UNet2DModel(sample_size=sample_size, in_channels=channels, out_channels=channels, **kwargs)


def count_parameters(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())
