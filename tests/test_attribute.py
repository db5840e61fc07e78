"""attribute.py end to end on a tiny trained model: stores, scores, resumption, DDP, refusals."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from das_lightning import cli
from das_lightning.attribution.pipeline import load_scores
from das_lightning.manifest import ManifestMismatchError
from das_lightning.models.adapters import ModelAdapter
from das_lightning.models.sampling import SamplerSettings
from das_lightning.paths import RunPaths
from das_lightning.training import GenerationSettings, generate_queries

from conftest import REPO, RUN, TINY_ATTRIBUTE, compose, copy_model, entry_env, run_entry


def _tiny(method: str | None = None) -> list[str]:
    """The tiny attribution settings; similarity baselines have no gradient features to shrink."""
    if method in ("pixel", "clip"):
        return [o for o in TINY_ATTRIBUTE if not o.startswith("method.features")]
    return list(TINY_ATTRIBUTE)


def _attribute(root: Path, *overrides: str):
    method = next((o.split("=", 1)[1] for o in overrides if o.startswith("method=")), None)
    return cli.run_attribute(compose("attribute", [f"paths.root={root}", *_tiny(method), *overrides]))


def test_das_writes_complete_stores_scores_and_grids(das_root: Path) -> None:
    features = das_root / RUN / "features" / "das"
    for name, rows in (("train", 48), ("val", 6), ("generated", 6)):
        manifest = json.loads((features / name / "manifest.json").read_text())
        assert manifest["num_rows"] == rows and manifest["dim"] == 32
        assert np.load(features / name / "done.npy").all()
        assert np.abs(np.load(features / name / "features.npy")).sum(axis=1).min() > 0
    for query_set in ("val", "generated"):
        scores, manifest = load_scores(das_root / RUN / "scores" / "das" / query_set)
        assert scores.shape == (len(manifest["lambda_scales"]), 6, 48) and np.isfinite(scores).all()
        assert (scores >= 0).all()  # DAS squares
        top = json.loads((das_root / RUN / "scores" / "das" / query_set / "topk.json").read_text())
        assert len(top["proponent_indices"]) == 6 and len(top["proponent_indices"][0]) == 8
        assert (das_root / RUN / "scores" / "das" / query_set / "grid.png").stat().st_size > 0
        # the HTML report: each query with its 8 proponents and 8 opponents, images embedded
        page = (das_root / RUN / "scores" / "das" / query_set / "index.html").read_text()
        assert page.count('<img src="data:image/png;base64,') == 6 * (1 + 8 + 8)


def test_features_do_not_depend_on_batch_size(das_root: Path, tmp_path: Path) -> None:
    root = copy_model(das_root, tmp_path)
    _attribute(root, "method.features.batch_size=5")
    for name in ("train", "val"):
        np.testing.assert_allclose(
            np.load(root / RUN / "features" / "das" / name / "features.npy"),
            np.load(das_root / RUN / "features" / "das" / name / "features.npy"),
            rtol=1e-4,
            atol=1e-5,
        )


def test_changed_projector_seed_gets_its_own_store_and_scores_beside_todays(
    das_root: Path, tmp_path: Path
) -> None:
    """Issue 18: stores of other feature settings coexist (features.store_folder) instead of being refused."""
    root = tmp_path / "root"
    shutil.copytree(das_root, root)
    plain = (root / RUN / "features" / "das" / "train" / "features.npy").read_bytes()
    result = run_entry("attribute.py", f"paths.root={root}", *TINY_ATTRIBUTE, "projector.seed=1", cwd=root)
    variant = re.search(r"method (das-[0-9a-f]{10}):", result.stdout)
    assert variant is not None, result.stdout
    assert (root / RUN / "scores" / variant[1] / "val" / "scores.npy").exists()
    manifest = json.loads((root / RUN / "features" / variant[1] / "train" / "manifest.json").read_text())
    assert manifest["features"]["projector_seed"] == 1
    assert (root / RUN / "features" / "das" / "train" / "features.npy").read_bytes() == plain


def test_two_process_ddp_features_equal_one_process(das_root: Path, tmp_path: Path) -> None:
    root = copy_model(das_root, tmp_path)
    result = run_entry(
        "attribute.py",
        f"paths.root={root}",
        *TINY_ATTRIBUTE,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "queries.sets=[val]",
        cwd=root,
    )
    for name in ("train", "val"):
        np.testing.assert_allclose(
            np.load(root / RUN / "features" / "das" / name / "features.npy"),
            np.load(das_root / RUN / "features" / "das" / name / "features.npy"),
            rtol=1e-4,
            atol=1e-5,
        )
    # both ranks score, one writes: the scores are the single-process ones and the summary is printed once
    scores = root / RUN / "scores" / "das" / "val"
    single = np.load(das_root / RUN / "scores" / "das" / "val" / "scores.npy")
    np.testing.assert_allclose(
        np.load(scores / "scores.npy"), single, rtol=1e-3, atol=1e-3 * float(np.abs(single).max())
    )
    assert json.loads((scores / "manifest.json").read_text())["complete"] is True
    assert not list(scores.glob("*.tmp"))
    assert result.stdout.count("method das:") == 1


def test_killed_run_resumes_to_the_same_features(das_root: Path, tmp_path: Path) -> None:
    root = copy_model(das_root, tmp_path)
    command = [
        sys.executable,
        str(REPO / "attribute.py"),
        f"paths.root={root}",
        *TINY_ATTRIBUTE,
        "method.features.batch_size=2",
        "queries.sets=[val]",
    ]
    done_file = root / RUN / "features" / "das" / "train" / "done.npy"
    process = subprocess.Popen(
        command, cwd=root, env=entry_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if done_file.exists() and 4 <= int(np.load(done_file).sum()) < 40:
                break
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    finished_before_resume = int(np.load(done_file).sum())
    assert 4 <= finished_before_resume < 48, finished_before_resume
    run_entry("attribute.py", *command[2:], cwd=root)
    np.testing.assert_allclose(
        np.load(root / RUN / "features" / "das" / "train" / "features.npy"),
        np.load(das_root / RUN / "features" / "das" / "train" / "features.npy"),
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "method", ["dtrak", "trak", "relatif", "renorm", "grad_cos", "pixel", "das_plain", "journey_trak"]
)
def test_every_method_writes_finite_scores(das_root: Path, method: str) -> None:
    result = _attribute(das_root, f"method={method}")
    # journeys exist for generated images only: journey_trak says so and attributes those, not an error
    assert set(result.folders) == ({"generated"} if method == "journey_trak" else {"val", "generated"})
    for query_set, folder in result.folders.items():
        scores, manifest = load_scores(folder)
        assert np.isfinite(scores).all() and scores.shape[1:] == (6, 48)
        assert manifest["train_set"] == "fashion2:train:n48"
        assert np.ptp(scores) > 0, f"{method} gives constant scores on {query_set}"


def test_tracin_uses_the_training_snapshots(tmp_path: Path) -> None:
    from conftest import TINY_TRAIN

    run_entry(
        "train.py", f"paths.root={tmp_path}", *TINY_TRAIN, "train.snapshot_every_n_steps=4", cwd=tmp_path
    )
    snapshots = sorted((tmp_path / RUN / "snapshots").iterdir())
    assert [s.name for s in snapshots] == ["step0000004", "step0000008", "step0000012"]
    result = _attribute(tmp_path, "method=tracin", "queries.sets=[val]")
    scores, _ = load_scores(result.folders["val"])
    assert np.isfinite(scores).all() and np.ptp(scores) > 0


def test_clip_without_local_weights_fails_clearly_and_writes_nothing(das_root: Path) -> None:
    result = run_entry(
        "attribute.py",
        f"paths.root={das_root}",
        *_tiny("clip"),
        "method=clip",
        "method.clip_model=no-such-org/no-such-clip",
        cwd=das_root,
        check=False,
    )
    assert result.returncode == 2
    assert "huggingface-cli download" in result.stderr and "Traceback" not in result.stderr
    assert not (das_root / RUN / "scores" / "clip").exists()


def test_candidate_screening_scores_only_the_nearest_images(das_root: Path) -> None:
    result = _attribute(
        das_root,
        "method=dtrak",
        "method.name=dtrak_screened",
        "method.screen_by=pixel",
        "method.screen_top=5",
        "queries.sets=[val]",
    )
    screened, _ = load_scores(result.folders["val"])
    full, _ = load_scores(_attribute(das_root, "method=dtrak", "queries.sets=[val]").folders["val"])
    nonzero = screened != 0
    assert (nonzero.sum(axis=-1) <= 5).all() and nonzero.any()
    np.testing.assert_allclose(
        screened[nonzero], full[nonzero], rtol=1e-5
    )  # kept candidates keep their scores


def test_features_of_replaced_generated_queries_are_refused(das_root: Path, tmp_path: Path) -> None:
    # generated queries regenerated with other settings keep their set name; their file hash tells them apart
    root = copy_model(das_root, tmp_path)
    shutil.copytree(das_root / RUN / "features", root / RUN / "features")
    shutil.rmtree(root / RUN / "queries")
    paths = RunPaths(root, "fashion2", "tiny", "full", 0)
    other = GenerationSettings(num_images=6, sampler=SamplerSettings(num_inference_steps=2, seed=5))
    generate_queries(paths, other, ModelAdapter(), ["generated"])
    with pytest.raises(ManifestMismatchError, match="content_id"):
        _attribute(root)


@pytest.mark.parametrize("method", ["das_exact", "das_magnitude"])
def test_residual_variants_run_end_to_end(das_root: Path, tmp_path: Path, method: str) -> None:
    root = copy_model(das_root, tmp_path)
    shutil.copytree(das_root / RUN / "features", root / RUN / "features")
    _attribute(root, f"method={method}", "queries.sets=[val]")
    scores, manifest = load_scores(root / RUN / "scores" / method / "val")
    das, das_manifest = load_scores(das_root / RUN / "scores" / "das" / "val")
    assert manifest["method"]["residual"] == method.removeprefix("das_")
    assert manifest["lambda_unit"] == pytest.approx(das_manifest["lambda_unit"])  # same features, same unit
    assert np.isfinite(scores).all() and (scores >= 0).all()
    assert not np.allclose(scores, das)  # another residual, other scores
    psi = root / RUN / "features" / "das-psi" / "train"
    assert psi.exists() == (method == "das_exact")
    if method == "das_exact":
        described = json.loads((psi / "manifest.json").read_text())["features"]
        assert described["output_function"] == "loss" and not described["normalize_per_timestep"]


def test_bad_method_settings_are_refused_before_any_feature(das_root: Path, tmp_path: Path) -> None:
    root = copy_model(das_root, tmp_path)
    for override, message in (
        ("method.residual=sideways", "method.residual"),
        ("method.screen_by=nope", "method.screen_by"),
        ("method.lambda_scale=-1", "method.lambda_scale"),
    ):
        with pytest.raises(ValueError, match=message):
            _attribute(root, override)
    assert not (root / RUN / "features").exists()
