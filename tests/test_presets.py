"""The paper presets are the published networks: every key of the published UNet2DModel configs, and their
parameter counts, as built from the composed experiment (on the meta device: no weights are allocated)."""

from __future__ import annotations

import json
from typing import Any

import hydra
import pytest
import torch
from diffusers import UNet2DModel

from conftest import compose

# sail-sg/D-TRAK CIFAR10/config.json (also the unet/ of google/ddpm-cifar10-32), without its "_" keys
DTRAK_CIFAR10 = {
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
# sail-sg/D-TRAK CelebA/config.json, without its "_" keys
DTRAK_CELEBA = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "center_input_sample": False,
    "down_block_types": [
        "DownBlock2D",
        "DownBlock2D",
        "DownBlock2D",
        "DownBlock2D",
        "AttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 64,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
}
# Jinxu-Lin/DAS CIFAR2/config.json = D-TRAK's CIFAR-10 file + scale_shift time conditioning; the two keys after it
# rebuild the diffusers-0.16 network of the authors' archived model (see conf/model/cifar_das.yaml)
DAS_CIFAR2 = {**DTRAK_CIFAR10, "resnet_time_scale_shift": "scale_shift"}
DAS_CIFAR2_ARCHIVE = {**DAS_CIFAR2, "attn_norm_num_groups": 32, "dropout": 0.1}

# (model preset, experiment it is used with, published keys, exact parameter count)
PRESETS = [
    ("cifar", "cifar2_lds", DTRAK_CIFAR10, 35_746_307),  # "35.7M" (DDPM paper, D-TRAK)
    ("cifar", "cifar10_lds", DTRAK_CIFAR10, 35_746_307),
    ("celeba", "celeba_lds", DTRAK_CELEBA, 113_673_219),  # "113.7M" (D-TRAK)
    ("cifar_das", "cifar2_lds", DAS_CIFAR2_ARCHIVE, 38_307_203),  # "38.3M" (DAS authors, via SNR-LDS)
]


def _plain(config: Any) -> dict[str, Any]:
    """A UNet config as JSON would store it (tuples as lists), without diffusers' private keys."""
    return {
        key: value for key, value in json.loads(json.dumps(dict(config))).items() if not key.startswith("_")
    }


def _build_meta(unet_node) -> UNet2DModel:
    with torch.device("meta"):
        return hydra.utils.instantiate(unet_node)


def _parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@pytest.mark.parametrize(("preset", "experiment", "published", "num_parameters"), PRESETS)
def test_each_paper_preset_is_the_published_network(
    preset: str, experiment: str, published: dict, num_parameters: int, tmp_path
) -> None:
    cfg = compose("train", [f"experiment={experiment}", f"model={preset}", f"paths.root={tmp_path}"])
    model = _build_meta(cfg.model.unet)
    built = _plain(model.config)
    assert {key: built[key] for key in published} == published
    # every other key (those the published file leaves to diffusers' defaults) as diffusers reads that file
    with torch.device("meta"):
        reference = UNet2DModel.from_config(published)
    assert built == _plain(reference.config)
    assert _parameters(model) == _parameters(reference) == num_parameters


def test_the_das_variant_differs_from_dtraks_only_where_its_sources_say() -> None:
    with torch.device("meta"):
        dtrak = UNet2DModel.from_config(DTRAK_CIFAR10)
        das_config_only = UNet2DModel.from_config(DAS_CIFAR2)
        das_archive = UNet2DModel.from_config(DAS_CIFAR2_ARCHIVE)
    # FiLM time conditioning doubles each resnet's time projection: 35.7M -> 38.3M
    assert _parameters(das_config_only) == 38_306_691
    # the only extra weights of the archive's network: the mid-block attention's GroupNorm (2 x 256)
    extra = set(das_archive.state_dict()) - set(das_config_only.state_dict())
    assert extra == {"mid_block.attentions.0.group_norm.weight", "mid_block.attentions.0.group_norm.bias"}
    dtrak_weights, das_weights = dtrak.state_dict(), das_archive.state_dict()
    assert set(dtrak_weights) == set(das_weights)  # D-TRAK's network has that GroupNorm too
    for name, weight in dtrak_weights.items():
        if ".time_emb_proj." in name:  # scale and shift: twice the outputs
            assert das_weights[name].shape[0] == 2 * weight.shape[0]
        else:
            assert das_weights[name].shape == weight.shape


def test_the_paper_presets_follow_the_data_they_are_trained_on(tmp_path) -> None:
    cfg = compose(
        "train", ["model=cifar", "dataset=fashion2", "dataset.image_size=16", f"paths.root={tmp_path}"]
    )
    model = _build_meta(cfg.model.unet)
    assert (model.config.sample_size, model.config.in_channels, model.config.out_channels) == (16, 1, 1)


@pytest.mark.parametrize("preset", ["cifar", "celeba", "cifar_das"])
def test_the_benchmarks_build_by_name_the_network_the_config_builds(preset: str, tmp_path) -> None:
    """benchmarks/features.py and gpu_check.py build the paper networks by name (models.unet.UNET_PRESETS)."""
    from das_lightning.models.unet import build_unet

    cfg = compose(
        "train", [f"model={preset}", "dataset.channels=3", "dataset.image_size=32", f"paths.root={tmp_path}"]
    )
    with torch.device("meta"):
        by_name = build_unet(preset, sample_size=32, channels=3)
    assert _plain(by_name.config) == _plain(_build_meta(cfg.model.unet).config)


def test_the_artbench_stand_in_is_stable_diffusion_1s_unet() -> None:
    """The offline stand-in for miniSD (tests/test_paper_experiments.py without DAS_MINISD) builds SD 1.x's UNet:
    its published parameter count (859,520,964), and model=sd_lora's rank-128 adapters attach to each of its
    attention projections, rank x (inputs + outputs) weights each, the only trainable weights."""
    from diffusers import UNet2DConditionModel

    from das_lightning.models.sd_lora import (
        LORA_PARAMETER_PATTERN,
        LORA_TARGET_MODULES,
        LoRASettings,
        add_lora,
    )
    from das_lightning_testing.tiny_sd import SD1_UNET, SD1_UNET_PARAMETERS

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD1_UNET)
    assert _parameters(unet) == SD1_UNET_PARAMETERS == 859_520_964
    targets = [
        module
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith(tuple(f".{t}" for t in LORA_TARGET_MODULES))
    ]
    assert len(targets) == 128  # 16 transformer blocks x 2 attentions x 4 projections
    with torch.device("meta"):
        add_lora(unet, LoRASettings(rank=128))
    trainable = {name: p.numel() for name, p in unet.named_parameters() if p.requires_grad}
    assert all(LORA_PARAMETER_PATTERN in name for name in trainable)
    assert sum(trainable.values()) == sum(128 * (m.in_features + m.out_features) for m in targets)
