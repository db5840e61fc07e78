"""Shared fixtures: tiny settings for every stage, and a helper to run the entry points as a user would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A run small enough for the test suite: 8 px images, 48 training images, a few steps.
TINY_DATA = ["dataset.image_size=8", "dataset.num_train=48"]
TINY_TRAIN = [
    *TINY_DATA,
    "train.max_steps=12",
    "train.batch_size=16",
    "train.optimizer.warmup_steps=2",
    "generate.num_images=6",
    "generate.sampler.num_inference_steps=4",
    "logger=none",
    "trainer.enable_progress_bar=false",
]
TINY_ATTRIBUTE = [
    *TINY_DATA,
    "queries.num_val=6",
    "queries.num_generated=6",
    "projector.dim=32",
    "method.features.num_timesteps=2",
    # one draw per grid timestep, for every method: DAS's default draws (15 stratified timesteps x an antithetic
    # pair) are tested where they are the point (test_draws.py, test_configs.py)
    "method.features.sampling=grid",
    "method.features.draws_per_timestep=1",
    "method.features.antithetic=false",
    "method.features.batch_size=16",
    "logger=none",
    "trainer.enable_progress_bar=false",
]


def entry_env(wandb_mode: str = "disabled") -> dict[str, str]:
    env = dict(os.environ)
    env.update({"WANDB_MODE": wandb_mode, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env.pop("DAS_OUTPUT_ROOT", None)
    env.pop("WANDB_API_KEY", None)  # never online from a test
    return env


def run_entry(
    script: str,
    *overrides: str,
    cwd: Path,
    check: bool = True,
    timeout: int = 600,
    wandb_mode: str = "disabled",
):
    """Run train.py / attribute.py / evaluate_lds.py in a subprocess (DDP re-launches need a real command)."""
    result = subprocess.run(
        [sys.executable, str(REPO / script), *overrides],
        cwd=cwd,
        env=entry_env(wandb_mode),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


@pytest.fixture(scope="session")
def trained_root(tmp_path_factory) -> Path:
    """A tiny full model with generated queries, trained once per session by train.py."""
    root = tmp_path_factory.mktemp("trained")
    run_entry("train.py", f"paths.root={root}", *TINY_TRAIN, cwd=root)
    return root


RUN = Path("fashion2") / "tiny" / "full" / "seed0"


def copy_model(trained_root: Path, target: Path) -> Path:
    """A fresh copy of the trained model (no features or scores), so each test starts from the same state."""
    for part in ("unet", "queries"):
        shutil.copytree(trained_root / RUN / part, target / RUN / part)
    for name in ("manifest.json", "subset.json", "config.json"):
        shutil.copy(trained_root / RUN / name, target / RUN / name)
    return target


@pytest.fixture(scope="session")
def das_root(trained_root: Path, tmp_path_factory) -> Path:
    """The tiny model with DAS features and scores for both query sets, made once per session in-process."""
    from das_lightning import cli

    root = copy_model(trained_root, tmp_path_factory.mktemp("das"))
    cli.run_attribute(compose("attribute", [f"paths.root={root}", *TINY_ATTRIBUTE]))
    return root


# The tiny LDS: 3 subset models, DAS and pixel, ground truth on 4 timesteps x 2 e_seeds
TINY_LDS = [
    "lds.num_subsets=3",
    "lds.timestep_stride=250",
    "lds.e_seeds=[0,1]",
    "lds.num_resamples=50",
    "methods=[das,pixel]",
    "pairs=[[das,pixel]]",
    "queries.num_val=6",
    "queries.num_generated=6",
    "dataset.image_size=8",
    "dataset.num_train=48",
    "logger=none",
    "trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="session")
def lds_run(trained_root: Path, tmp_path_factory) -> Path:
    """What the tiny LDS needs, made once per session: the tiny model, its 3 subset models (train.py -m), and its
    DAS and pixel scores. Tests copy it (shutil.copytree) before writing into it."""
    from das_lightning import cli

    root = tmp_path_factory.mktemp("lds-run")
    shutil.copytree(trained_root / "fashion2", root / "fashion2")
    shutil.rmtree(root / RUN / "features", ignore_errors=True)
    shutil.rmtree(root / RUN / "scores", ignore_errors=True)
    run_entry(
        "train.py",
        "-m",
        "subset=lds",
        "subset.index=0,1,2",
        f"paths.root={root}",
        *TINY_TRAIN,
        "train.max_steps=4",
        cwd=root,
    )
    cli.run_attribute(compose("attribute", [f"paths.root={root}", *TINY_ATTRIBUTE]))
    pixel = [o for o in TINY_ATTRIBUTE if not o.startswith("method.features")]
    cli.run_attribute(compose("attribute", [f"paths.root={root}", *pixel, "method=pixel"]))
    return root


def tiny_unet(seed: int = 0, dropout: float = 0.0, channels: int = 3, sample_size: int = 8):
    """The tests' hand-sized UNet: the ``tiny`` preset's blocks (one with attention) at widths (8, 16), seeded."""
    import torch

    from das_lightning.models.unet import build_unet

    torch.manual_seed(seed)
    return build_unet(
        "tiny",
        sample_size,
        channels,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        attention_head_dim=4,
        dropout=dropout,
    )


def compose(config_name: str, overrides: list[str], return_hydra_config: bool = False):
    """The config an entry point would see for these overrides (to call das_lightning.cli in-process)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(
            config_name=config_name, overrides=overrides, return_hydra_config=return_hydra_config
        )
