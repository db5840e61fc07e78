"""A DDPM pipeline folder in the published layout (google/ddpm-cifar10-32: model_index.json, unet/ with config.json
and safetensors weights, scheduler/scheduler_config.json) loads as it is, alone and as the full model of a paper
experiment; a broken folder is one clear error. The pipeline is a random UNet with the published config's keys at
tiny widths, written by diffusers' own save_pretrained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file
from test_presets import DTRAK_CIFAR10

from das_lightning import cli
from das_lightning.attribution.pipeline import load_scores
from das_lightning.diffusion import make_scheduler
from das_lightning.errors import ConfigError, MissingArtifactError, UserError
from das_lightning.manifest import CorruptArtifactError, hash_file
from das_lightning.models.adapters import PretrainedAdapter
from das_lightning.models.ddpm import load_trained_network

from conftest import compose
from data_fixtures import write_cifar_batch

# D-TRAK's CIFAR-10 keys (the published network's layout, attention in the second block) at tiny widths
TINY_PUBLISHED = {
    **DTRAK_CIFAR10,
    "block_out_channels": [16, 32, 32, 32],
    "norm_num_groups": 8,
    "layers_per_block": 1,
}
# google/ddpm-cifar10-32's scheduler/scheduler_config.json keys (no prediction_type: diffusers' default epsilon)
PUBLISHED_SCHEDULER = dict(
    num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=True
)
WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ddpm-cifar10-32")
    unet = UNet2DModel.from_config(TINY_PUBLISHED)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**PUBLISHED_SCHEDULER)).save_pretrained(
        str(folder), safe_serialization=True
    )
    return folder


@pytest.fixture
def copy_of(published: Path, tmp_path: Path):
    def make() -> Path:
        return Path(shutil.copytree(published, tmp_path / "pipeline"))

    return make


def test_the_published_layout_loads_with_its_own_weights_and_the_papers_schedule(published: Path) -> None:
    assert {path.name for path in published.iterdir()} >= {"model_index.json", "unet", "scheduler"}
    model = PretrainedAdapter(published).load()
    saved = load_file(str(published / WEIGHTS))
    loaded = model.network.state_dict()
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[name], saved[name]) for name in saved)
    assert model.weights_file == published / WEIGHTS
    # the published scheduler is METHOD.md's: the same alphas_cumprod as the models train.py trains
    torch.testing.assert_close(model.alphas_cumprod, make_scheduler().alphas_cumprod, rtol=0, atol=0)
    assert model.scheduler_config["prediction_type"] == "epsilon"
    assert model.network.config.downsample_padding == 0 and model.network.config.freq_shift == 1


def test_weights_under_the_pre_0_15_attention_names_load_as_the_same_network(copy_of) -> None:
    # checkpoints from diffusers' first releases (google/ddpm-*) store attention as query/key/value/proj_attn
    folder = copy_of()
    current = load_file(str(folder / WEIGHTS))
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for name, tensor in current.items():
        for new, old in legacy_names.items():
            name = name.replace(f".{new}.", f".{old}.")
        legacy[name] = tensor
    assert any(".proj_attn." in name for name in legacy)
    save_file(legacy, str(folder / WEIGHTS))
    loaded = PretrainedAdapter(folder).load().network.state_dict()
    assert all(torch.equal(loaded[name], current[name]) for name in current)


def _write_cifar(root: Path, num_train: int, num_test: int) -> None:
    """CIFAR-10's binary batches, random pixels, automobile (1) and horse (7) images among the classes."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-bin"
    labels = np.resize(np.array([1, 7, 3], dtype=np.uint8), num_train)
    images = rng.integers(0, 256, size=(num_train, 3, 32, 32), dtype=np.uint8)
    for batch, part in enumerate(np.array_split(np.arange(num_train), 5), start=1):
        write_cifar_batch(folder / f"data_batch_{batch}.bin", images[part], labels[part])
    test_labels = np.resize(np.array([1, 7], dtype=np.uint8), num_test)
    write_cifar_batch(
        folder / "test_batch.bin",
        rng.integers(0, 256, size=(num_test, 3, 32, 32), dtype=np.uint8),
        test_labels,
    )


def test_the_pipeline_is_the_full_model_of_the_cifar2_experiment(published: Path, tmp_path: Path) -> None:
    _write_cifar(tmp_path / "cifar10", num_train=30, num_test=1000)  # cifar2 keeps 1000 test images
    cfg = compose(
        "attribute",
        [
            "experiment=cifar2_lds",
            "model=pretrained",  # after the experiment: replaces its model=cifar
            f"model.pretrained={published}",
            f"paths.root={tmp_path}",
            f"dataset.root={tmp_path / 'cifar10'}",
            "dataset.num_train=20",
            "queries.sets=[val]",
            "queries.num_val=4",
            "projector.dim=32",
            "method.features.num_timesteps=2",
            "method.features.batch_size=8",
            "logger=none",
            "trainer.enable_progress_bar=false",
        ],
    )
    assert cfg.model.name == "pretrained" and cfg.dataset.name == "cifar2"
    result = cli.run_attribute(cfg)
    scores, manifest = load_scores(result.folders["val"])
    assert scores.shape[1:] == (4, 20) and np.isfinite(scores).all()
    assert manifest["checkpoint"] == hash_file(published / WEIGHTS)


def _error(folder: Path, channels: int = 3, image_size: int = 32) -> UserError:
    adapter = PretrainedAdapter(folder)
    with pytest.raises(UserError) as caught:
        adapter.check_fits(channels, image_size)
        adapter.load()
    assert "\n" not in str(caught.value)  # one line, as the CLI prints it
    return caught.value


def test_a_pipeline_without_its_scheduler_is_refused(copy_of) -> None:
    folder = copy_of()
    shutil.rmtree(folder / "scheduler")
    error = _error(folder)
    assert isinstance(error, MissingArtifactError) and "scheduler/scheduler_config.json" in str(error)


def test_a_pickle_only_unet_is_refused_without_being_read(copy_of) -> None:
    folder = copy_of()
    (folder / WEIGHTS).unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not a pickle: never opened")
    error = _error(folder)
    assert (
        isinstance(error, MissingArtifactError)
        and "pickle" in str(error)
        and "safe_serialization" in str(error)
    )
    with pytest.raises(MissingArtifactError, match="pickle"):
        cli.model_folder_name(compose("attribute", ["model=pretrained", f"model.pretrained={folder}"]))


def test_a_network_that_cannot_take_the_images_is_refused(published: Path) -> None:
    error = _error(published, channels=1)
    assert isinstance(error, ConfigError) and "in_channels 3 vs the dataset's 1 channels" in str(error)
    error = _error(published, image_size=64)
    assert isinstance(error, ConfigError) and "sample_size 32 vs dataset.image_size=64" in str(error)


def test_a_config_that_does_not_describe_the_weights_is_refused(copy_of) -> None:
    # diffusers itself would drop the weights the config has no place for with a log line, and measure another net
    folder = copy_of()
    config_file = folder / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "resnet_time_scale_shift": "scale_shift"}))
    with pytest.raises(CorruptArtifactError, match="attn_norm_num_groups") as caught:
        load_trained_network(folder / "unet")
    assert "other shape" in str(caught.value) and "not in the network" in str(caught.value)


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("num_train_timesteps", 4000, "num_train_timesteps 4000"),
        ("prediction_type", "v_prediction", "prediction_type 'v_prediction'"),
        ("variance_type", "learned_range", "variance_type 'learned_range'"),
        ("beta_schedule", "no_such_schedule", "a schedule diffusers cannot build"),
    ],
)
def test_a_schedule_the_project_cannot_measure_under_is_refused(
    copy_of, key: str, value, reason: str
) -> None:
    folder = copy_of()
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), key: value}))
    error = _error(folder)
    assert isinstance(error, ConfigError) and reason in str(error)
