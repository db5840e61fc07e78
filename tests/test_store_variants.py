"""Stores (and score folders) of different feature settings coexist: a store whose home folder holds other semantic
settings lives in ``<name>-<hash of its settings>`` instead of being refused; the folders made first keep their names
(features.store_folder, features.store_suffix, the attribute stage's score folder)."""

from __future__ import annotations

import copy
import hashlib
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from das_lightning.attribution.features import (
    CollectionDevice,
    FeatureSettings,
    collect_features,
    draw_suffix,
    settings_suffix,
    store_folder,
    store_suffix,
)
from das_lightning.attribution.projectors import ProjectorSettings
from das_lightning.data.base import ModelSpaceDataset
from das_lightning.diffusion import make_scheduler
from das_lightning.manifest import ManifestMismatchError

from conftest import RUN, TINY_ATTRIBUTE, compose, tiny_unet

SHAPE = (3, 8, 8)
BASE = {"num_timesteps": 2, "batch_size": 2, "projector": {"dim": 16}}


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    return tiny_unet().eval()


@pytest.fixture(scope="module")
def alphas_cumprod() -> torch.Tensor:
    return make_scheduler().alphas_cumprod


def probe_dataset(count: int = 4) -> ModelSpaceDataset:
    tensors = torch.randn(count, *SHAPE, generator=torch.Generator().manual_seed(2))
    return ModelSpaceDataset("probe:train", tensors, np.zeros(count, dtype=np.int64), ["a"])


def settings(**changes) -> FeatureSettings:
    merged = {**BASE, **changes}
    merged["projector"] = ProjectorSettings(**{**BASE["projector"], **changes.get("projector", {})})
    return FeatureSettings(**merged)


def digest(folder: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.iterdir())
        if path.is_file() and not path.name.startswith(".")
    }


def score_digest(folder: Path) -> dict[str, str]:
    return {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in ("scores.npy", "topk.json")
    }


@pytest.fixture
def collect(unet: UNet2DModel, alphas_cumprod: torch.Tensor, tmp_path: Path):
    dataset = probe_dataset()

    def run(chosen: FeatureSettings, root: Path = tmp_path, checkpoint: str = "ckpt", key: str = "train"):
        folder = root / "features" / chosen.name / key
        return collect_features(
            copy.deepcopy(unet),
            alphas_cumprod,
            dataset,
            checkpoint,
            folder,
            chosen,
            CollectionDevice(enable_progress_bar=False),
        )

    return run


# every semantic setting the issue names, each one change away from the first store's settings
VARIANTS = {
    "K": {"num_timesteps": 3},
    "projector dim": {"projector": {"dim": 8}},
    "projector seed": {"projector": {"seed": 1}},
    "projector kind": {"projector": {"kind": "sparse"}},
    "e_seed": {"e_seed": 1},
    "timesteps": {"timestep_strategy": "cumulative"},
    "output function": {"output_function": "loss", "normalize": "none"},
    "dtype": {"dtype": "float16"},
}


def test_other_settings_get_their_own_folder_beside_the_first_store_untouched(
    collect, tmp_path: Path
) -> None:
    first = collect(settings())
    assert (
        first.folder == tmp_path / "features" / "das" / "train"
    )  # the first store: the plain folder, as before
    before = digest(first.folder)
    folders = {first.folder}
    for label, change in VARIANTS.items():
        store = collect(settings(**change))
        assert store.folder.name == "train", label
        assert store.folder.parent.name == "das" + settings_suffix(settings(**change)), label
        assert store.folder not in folders, label  # one folder per settings
        folders.add(store.folder)
        assert store.is_complete
    assert digest(first.folder) == before  # the plain store is neither rewritten nor touched
    # each is found again where it was made and reused, not recomputed
    for label, change in VARIANTS.items():
        store_file = store_folder(first.folder, settings(**change)) / "features.npy"
        stamp = store_file.stat().st_mtime_ns
        assert collect(settings(**change)).folder == store_file.parent, label
        assert store_file.stat().st_mtime_ns == stamp, label
    assert collect(settings()).folder == first.folder


def test_the_features_differ_where_the_settings_do(collect) -> None:
    """Not a renamed copy: a store of another e_seed (other noise) or projector seed holds other rows."""
    today = np.asarray(collect(settings()).features)
    for change in ({"e_seed": 1}, {"projector": {"seed": 1}}):
        other = np.asarray(collect(settings(**change)).features)
        assert not np.allclose(other, today)


@pytest.mark.parametrize(
    "change",
    [{"batch_size": 3}, {"num_workers": 1}, {"timestep_batch": 1}, {"activation_budget_mib": 1}],
)
def test_how_fast_rows_are_computed_never_changes_the_folder(collect, change: dict) -> None:
    first = collect(settings())
    assert store_folder(first.folder, settings(**change)) == first.folder
    assert collect(settings(**change)).folder == first.folder  # reused, not refused


def test_the_first_settings_made_keep_the_plain_folder_whatever_they_are(collect, tmp_path: Path) -> None:
    """Stores made before this rule (the tests' tiny settings, a K = 100 run) stay where they are; today's defaults
    on such a folder go beside it."""
    swept = collect(settings(num_timesteps=3))
    assert swept.folder == tmp_path / "features" / "das" / "train"
    default = collect(settings())
    assert default.folder.parent.name == "das" + settings_suffix(settings())


def test_the_folder_name_depends_on_the_settings_alone(collect, tmp_path: Path) -> None:
    """Two run folders whose plain stores hold the same settings name the same variant alike."""
    names = set()
    for root in (tmp_path / "a", tmp_path / "b"):
        collect(settings(), root=root)
        names.add(collect(settings(e_seed=2), root=root).folder.parent.name)
        assert store_suffix(root / "features", settings(e_seed=2)) == settings_suffix(settings(e_seed=2))
        assert store_suffix(root / "features", settings()) == ""
    assert len(names) == 1
    assert settings_suffix(settings(e_seed=2)) != settings_suffix(settings(e_seed=3))


def test_every_key_of_a_feature_set_follows_its_train_store(collect, tmp_path: Path) -> None:
    """Query stores of a variant go beside its train store, even before they exist."""
    collect(settings())
    variant = settings(num_timesteps=3)
    train = collect(variant)
    val = collect(variant, key="val")
    assert val.folder == train.folder.parent / "val"
    assert store_suffix(tmp_path / "features", variant) == settings_suffix(variant)


def test_draw_variants_take_the_home_first_and_go_beside_it_on_a_conflict(collect, tmp_path: Path) -> None:
    """Since issue 18 the defaults of DAS and TRAK draw antithetic pairs: on a fresh run folder such a store is the
    plain ``das`` (where ``methods=[das]`` finds its scores); other settings go beside it."""
    draws = {"draws_per_timestep": 2, "antithetic": True}
    home = collect(settings(**draws))
    assert home.folder.parent.name == "das"
    assert store_suffix(tmp_path / "features", settings(**draws)) == ""
    other = collect(settings(**draws, num_timesteps=3))
    assert other.folder.parent.name == "das" + settings_suffix(settings(**draws, num_timesteps=3))
    assert other.folder.parent != home.folder.parent


def test_a_draw_variant_made_in_its_old_home_is_still_found_there(collect, tmp_path: Path) -> None:
    """Before issue 18 other draws were stored in ``das-<hash of the draw settings>``: such a store is reused from
    there (nothing recomputed), beside a one-draw ``das``."""
    draws = settings(draws_per_timestep=2, antithetic=True)
    made = collect(draws)  # in the plain home of a fresh folder: moved to where it was made before issue 18
    expected = np.array(made.features)
    old_home = tmp_path / "features" / ("das" + draw_suffix(draws))
    made.folder.parent.rename(old_home)
    collect(settings())  # a one-draw store in the plain home
    assert store_suffix(tmp_path / "features", draws) == draw_suffix(draws)
    again = collect(draws)
    assert again.folder == old_home / "train"
    np.testing.assert_array_equal(np.asarray(again.features), expected)


def test_another_checkpoint_is_still_refused_in_the_same_folder(collect) -> None:
    """A retrained model makes the store stale, not a variant: the refusal names the checkpoint."""
    collect(settings())
    with pytest.raises(ManifestMismatchError, match="checkpoint"):
        collect(settings(), checkpoint="another-checkpoint")


def test_settings_suffix_ignores_the_name_and_the_speed_settings() -> None:
    chosen = settings(num_timesteps=3)
    renamed = FeatureSettings(**{**asdict(chosen), "name": "trak", "batch_size": 7, "timestep_batch": 2})
    assert settings_suffix(renamed) == settings_suffix(chosen)


# --- the attribute stage: the score folder follows the store ---------------------------------------------------


def test_attribute_scores_of_other_settings_beside_todays(das_root: Path, tmp_path: Path) -> None:
    """attribute.py with another K on a run holding today's DAS: features and scores in das-<hash>, today's score
    and feature files byte-identical, and the default settings still find the plain folders."""
    from das_lightning import cli

    root = tmp_path / "root"
    shutil.copytree(das_root, root)
    run = root / RUN
    plain_scores = {name: score_digest(run / "scores" / "das" / name) for name in ("val", "generated")}
    plain_train = digest(run / "features" / "das" / "train")
    overrides = [f"paths.root={root}", *TINY_ATTRIBUTE]
    other = [*overrides, "method.features.num_timesteps=3"]
    result = cli.run_attribute(compose("attribute", other))
    chosen = cli.method_settings(compose("attribute", other)).features
    suffix = settings_suffix(chosen)
    assert result.method == "das" + suffix
    assert (run / "features" / f"das{suffix}" / "train" / "features.npy").exists()
    for name in ("val", "generated"):
        assert (run / "scores" / f"das{suffix}" / name / "scores.npy").exists()
        assert score_digest(run / "scores" / "das" / name) == plain_scores[name]
    assert digest(run / "features" / "das" / "train") == plain_train
    again = cli.run_attribute(compose("attribute", overrides))
    assert again.method == "das"
    for name in ("val", "generated"):
        assert score_digest(run / "scores" / "das" / name) == plain_scores[name]
