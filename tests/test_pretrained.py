"""Models trained elsewhere: a diffusers DDPMPipeline / UNet2DModel folder written by the test, attributed against a
training set the user names, with the schedule read from the folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from das_lightning import cli
from das_lightning.attribution.pipeline import load_scores
from das_lightning.manifest import hash_file
from das_lightning.models.adapters import PretrainedAdapter
from das_lightning.models.unet import build_unet

from conftest import TINY_ATTRIBUTE, compose


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("pipeline")
    unet = build_unet(preset="tiny", sample_size=8, channels=1)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(folder), safe_serialization=True)
    return folder


def _overrides(root: Path, folder: Path, *extra: str) -> list[str]:
    return [f"paths.root={root}", *TINY_ATTRIBUTE, "model=pretrained", f"model.pretrained={folder}", *extra]


def test_a_pipeline_folder_is_attributed_with_its_own_schedule(pipeline_folder: Path, tmp_path: Path) -> None:
    adapter = PretrainedAdapter(pipeline_folder)
    model = adapter.load()
    expected = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod
    torch.testing.assert_close(model.alphas_cumprod, expected)  # not the linear default
    cfg = compose("attribute", _overrides(tmp_path, pipeline_folder, "queries.sets=[val]"))
    result = cli.run_attribute(cfg)
    folder = result.folders["val"]
    scores, manifest = load_scores(folder)
    assert scores.shape[1:] == (6, 48) and np.isfinite(scores).all()
    weights = pipeline_folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert manifest["checkpoint"] == hash_file(weights)  # the manifest pins the weights trained elsewhere
    assert hash_file(weights)[:12] in str(folder)  # and their artifacts live apart from any other model's
    features = json.loads((folder.parents[2] / "features" / "das" / "train" / "manifest.json").read_text())
    assert features["checkpoint"] == hash_file(weights)


def test_a_unet_folder_works_too_and_misfits_are_refused_before_any_work(
    pipeline_folder: Path, tmp_path: Path
) -> None:
    unet_only = pipeline_folder / "unet"
    assert PretrainedAdapter(unet_only).weights_file().exists()
    with pytest.raises(ValueError, match="sample_size 8 vs dataset.image_size=16"):
        cli.run_attribute(compose("attribute", _overrides(tmp_path, unet_only, "dataset.image_size=16")))
    assert not list(tmp_path.rglob("features.npy"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        cli.run_attribute(compose("attribute", _overrides(tmp_path, tmp_path / "empty")))
