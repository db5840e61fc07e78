"""Ensembles (attribute.py ensemble.seeds / ensemble.checkpoints): members' scores averaged at each c, each member
with its own model and features, the primary model's queries for all; refusals name what to run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from das_lightning import cli
from das_lightning.attribution.pipeline import load_scores
from das_lightning.errors import ConfigError, MissingArtifactError

from conftest import TINY_ATTRIBUTE, TINY_TRAIN, compose, copy_model

RUN_OF = Path("fashion2") / "tiny" / "full"


@pytest.fixture(scope="module")
def ensemble_root(trained_root: Path, tmp_path_factory) -> Path:
    """Full models of seeds 0 (the session's), 1, and 2 (with snapshots every 6 of its 12 steps)."""
    root = copy_model(trained_root, tmp_path_factory.mktemp("ensemble"))
    cli.run_train(compose("train", [f"paths.root={root}", *TINY_TRAIN, "seed=1"]))
    cli.run_train(
        compose("train", [f"paths.root={root}", *TINY_TRAIN, "seed=2", "train.snapshot_every_n_steps=6"])
    )
    return root


def _attribute(root: Path, *overrides: str):
    return cli.run_attribute(compose("attribute", [f"paths.root={root}", *TINY_ATTRIBUTE, *overrides]))


def _scores(root: Path, name: str, query_set: str, seed: int = 0) -> tuple[np.ndarray, dict]:
    scores, manifest = load_scores(root / RUN_OF / f"seed{seed}" / "scores" / name / query_set)
    return np.asarray(scores, dtype=np.float64), manifest


def test_a_seed_ensemble_averages_its_members_scores_at_every_c(ensemble_root: Path) -> None:
    _attribute(ensemble_root)  # plain DAS of seed 0
    _attribute(ensemble_root, "ensemble.seeds=[0]")
    _attribute(ensemble_root, "ensemble.seeds=[1]")
    result = _attribute(ensemble_root, "ensemble.seeds=[0,1]")
    assert result.method == "das_seeds0-1"
    for query_set in ("val", "generated"):
        plain, _ = _scores(ensemble_root, "das", query_set)
        alone0, _ = _scores(ensemble_root, "das_seeds0", query_set)
        alone1, manifest1 = _scores(ensemble_root, "das_seeds1", query_set)
        both, manifest = _scores(ensemble_root, "das_seeds0-1", query_set)
        np.testing.assert_array_equal(
            alone0, plain
        )  # a one-member ensemble of the primary is the method itself
        assert not np.allclose(alone1, alone0, rtol=0.05)  # another seed is another model
        np.testing.assert_allclose(both, (alone0 + alone1) / 2, rtol=1e-5, atol=1e-7 * np.abs(both).max())
        # the manifest names each member by the checksum of its weights, with its own lambda unit
        members = manifest["ensemble"]
        assert [m["member"] for m in members] == ["seed0", "seed1"]
        assert members[0]["checkpoint"] != members[1]["checkpoint"]
        assert all(m["lambda_unit"] > 0 for m in members)
        # each member's own unit (not the first member's for all): seed 1's is its one-member ensemble's unit
        assert members[1]["lambda_unit"] == manifest1["lambda_unit"] != members[0]["lambda_unit"]


def test_members_featurise_the_primary_models_generated_queries(ensemble_root: Path) -> None:
    _attribute(ensemble_root, "ensemble.seeds=[0,1]")
    primary = json.loads(
        (ensemble_root / RUN_OF / "seed0" / "features" / "das" / "generated" / "manifest.json").read_text()
    )
    member_store = ensemble_root / RUN_OF / "seed1" / "features" / "das" / "generated-of-full-seed0"
    member = json.loads((member_store / "manifest.json").read_text())
    # the same images under the same identity (so the same rule noise), featurised by the other model
    assert member["content_id"] == primary["content_id"] and member["set_name"] == primary["set_name"]
    assert member["checkpoint"] != primary["checkpoint"]
    primary_rows = np.load(
        ensemble_root / RUN_OF / "seed0" / "features" / "das" / "generated" / "features.npy"
    )
    assert not np.allclose(np.load(member_store / "features.npy"), primary_rows, rtol=0.05)


def test_a_checkpoint_ensemble_scores_each_snapshot_with_its_own_weights(ensemble_root: Path) -> None:
    _attribute(ensemble_root, "seed=2")
    _attribute(ensemble_root, "seed=2", "ensemble.checkpoints=[12]")
    _attribute(ensemble_root, "seed=2", "ensemble.checkpoints=[6]")
    result = _attribute(ensemble_root, "seed=2", "ensemble.checkpoints=[6,12]")
    assert result.method == "das_steps6-12"
    for query_set in ("val", "generated"):
        final, _ = _scores(ensemble_root, "das", query_set, seed=2)
        last, _ = _scores(ensemble_root, "das_steps12", query_set, seed=2)
        early, _ = _scores(ensemble_root, "das_steps6", query_set, seed=2)
        both, manifest = _scores(ensemble_root, "das_steps6-12", query_set, seed=2)
        # the step-12 snapshot is the finished model's weights: the same scores up to float32 rounding
        np.testing.assert_allclose(last, final, rtol=1e-4, atol=1e-6 * np.abs(final).max())
        assert not np.allclose(early, last, rtol=0.05)
        np.testing.assert_allclose(both, (early + last) / 2, rtol=1e-5, atol=1e-7 * np.abs(both).max())
        assert [m["member"] for m in manifest["ensemble"]] == ["step6", "step12"]


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["ensemble.seeds=[0,7]"], MissingArtifactError, "python train.py seed=7"),
        (["seed=2", "ensemble.checkpoints=[5]"], MissingArtifactError, "snapshot_every_n_steps"),
        (["ensemble.seeds=[0,1]", "ensemble.checkpoints=[6]"], ConfigError, "give one"),
        (["ensemble.seeds=[0,0]"], ConfigError, "members repeat"),
        (["method=pixel", "ensemble.seeds=[0,1]"], ConfigError, "does not depend on the model"),
        (["method=tracin", "ensemble.seeds=[0,1]"], ConfigError, "already combines"),
    ],
)
def test_an_ensemble_that_cannot_be_made_is_refused_before_scores_are_written(
    ensemble_root: Path, overrides: list[str], error: type, message: str
) -> None:
    scores_dir = ensemble_root / RUN_OF / "seed0" / "scores"
    before = sorted(path.name for path in scores_dir.iterdir()) if scores_dir.exists() else []
    settings = list(TINY_ATTRIBUTE)
    if "method=pixel" in overrides:
        settings = [o for o in settings if not o.startswith("method.features")]
    with pytest.raises(error, match=message):
        cli.run_attribute(compose("attribute", [f"paths.root={ensemble_root}", *settings, *overrides]))
    after = sorted(path.name for path in scores_dir.iterdir()) if scores_dir.exists() else []
    assert after == before


@pytest.mark.slow
def test_a_two_process_ddp_ensemble_equals_one_process(ensemble_root: Path, tmp_path: Path) -> None:
    """Under DDP each member's features are collected by both ranks like any store; one rank writes the mean."""
    from conftest import run_entry

    _attribute(ensemble_root, "ensemble.seeds=[0,1]")
    for seed in (0, 1):  # the trained models only: every feature of the DDP run is collected afresh
        source, target = ensemble_root / RUN_OF / f"seed{seed}", tmp_path / RUN_OF / f"seed{seed}"
        for part in ("unet", "queries"):
            shutil.copytree(source / part, target / part)
        for name in ("manifest.json", "subset.json", "config.json"):
            shutil.copy(source / name, target / name)
    result = run_entry(
        "attribute.py",
        f"paths.root={tmp_path}",
        *TINY_ATTRIBUTE,
        "ensemble.seeds=[0,1]",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        cwd=tmp_path,
    )
    assert result.stdout.count("method das_seeds0-1:") == 1
    for query_set in ("val", "generated"):
        single, _ = _scores(ensemble_root, "das_seeds0-1", query_set)
        both, manifest = _scores(tmp_path, "das_seeds0-1", query_set)
        np.testing.assert_allclose(both, single, rtol=1e-3, atol=1e-3 * np.abs(single).max())
        assert [m["member"] for m in manifest["ensemble"]] == ["seed0", "seed1"]
