"""LDS bundles (issue 19): a tiny LDS run exported, its table recomputed from the bundle alone, scores from anywhere
evaluated against it, and damaged or mismatched bundles refused with one clear error."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from das_lightning import cli
from das_lightning.attribution.pipeline import load_scores
from das_lightning.data import build_dataset
from das_lightning.errors import ConfigError
from das_lightning.evaluation.bundle import (
    evaluate_scores,
    load_bundle,
    reproduce_recorded,
)
from das_lightning.manifest import CorruptArtifactError, ManifestMismatchError

from conftest import RUN, TINY_ATTRIBUTE, TINY_LDS, compose, run_entry

RESULTS = Path("fashion2") / "tiny" / "lds" / "full-seed0"


@pytest.fixture(scope="module")
def bundle_run(lds_run: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(run root, bundle folder): the tiny model, 3 subset models, DAS and pixel scores, the LDS and its bundle."""
    root = tmp_path_factory.mktemp("bundle-run") / "run"
    shutil.copytree(lds_run, root)
    bundle = root / "bundle"
    cli.run_lds(compose("evaluate_lds", [f"paths.root={root}", *TINY_LDS, f"export_bundle={bundle}"]))
    return root, bundle


def _copy(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(bundle, target)
    return target


def _grid(root: Path, method: str, query_set: str) -> tuple[np.ndarray, list[float] | None]:
    stacked, manifest = load_scores(root / RUN / "scores" / method / query_set)
    return np.array(stacked), manifest["lambda_scales"] or None


def test_bundle_is_self_contained_and_small(bundle_run: tuple[Path, Path]) -> None:
    _, folder = bundle_run
    bundle = load_bundle(folder)
    description = bundle.description
    assert bundle.masks.shape == (3, 48) and bundle.masks.sum(1).tolist() == [24, 24, 24]
    assert bundle.ground_truth["val"].shape == (1, 3, 6)  # seeds x subsets x queries
    assert bundle.query_images("generated").shape == (6, 1, 8, 8)
    assert description["query_sets"]["generated"]["source"]["generated_by"]["num_inference_steps"] == 4
    assert len(description["query_sets"]["val"]["source"]["indices"]) == 6
    assert description["protocol"]["timesteps"] == [0, 250, 500, 750]
    assert description["protocol"]["e_seeds"] == [0, 1] and description["protocol"]["alpha"] == 0.5
    assert all(len(subset["weights_sha256"]["0"]) == 64 for subset in description["subsets"])
    assert (folder / "model" / "unet" / "DONE").exists()
    names = {path.name for path in folder.rglob("*")}
    assert "last.ckpt" not in names and "lds-0" not in names  # no optimizer state, no subset weights
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    weights = (folder / "model" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert size - weights < 200_000  # everything besides the model's weights is small


def test_bundle_reproduces_the_runs_table(bundle_run: tuple[Path, Path]) -> None:
    root, folder = bundle_run
    reproduced = reproduce_recorded(folder)
    recorded = json.loads((root / RESULTS / "lds.json").read_text())
    assert [record.to_json() for record in reproduced.records] == recorded["records"]
    assert [difference.to_json() for difference in reproduced.differences] == recorded["differences"]
    assert reproduced.table + "\n" == (root / RESULTS / "lds.md").read_text()


def test_a_recorded_method_passed_back_as_your_own_scores_gets_its_records(
    bundle_run: tuple[Path, Path], tmp_path: Path
) -> None:
    root, folder = bundle_run
    (val, scales), (generated, _) = _grid(root, "das", "val"), _grid(root, "das", "generated")
    path = tmp_path / "das_again.npz"
    np.savez(path, val=val, generated=generated, lambdas=np.asarray(scales))
    report = cli.run_lds(
        compose("evaluate_lds", [f"paths.root={tmp_path / 'no-run'}", f"bundle={folder}", f"scores={path}"])
    )
    recorded = json.loads((root / RESULTS / "lds.json").read_text())
    das = [r for r in recorded["records"] if r["method"] == "das"]
    ours = [record.to_json() for record in report.records]
    assert len(ours) == len(das) == 4
    for mine, theirs in zip(ours, das, strict=True):
        theirs = {**theirs, "method": "das_again", "lambda": None}  # no unit given: c alone
        assert mine == theirs
    pixel = {(d["query_set"]): d for d in recorded["differences"]}
    for difference in report.differences:
        if difference.b == "pixel":
            assert difference.diff == pytest.approx(pixel[difference.query_set]["diff"], abs=1e-9)
            assert difference.ci_low == pytest.approx(pixel[difference.query_set]["ci_low"], abs=1e-9)
        else:  # against das itself: nothing between them
            assert difference.b == "das" and difference.diff == pytest.approx(0.0, abs=1e-9)
    assert "das_again" in report.table and "| das | pixel |" in report.table


def test_numpy_pixel_similarity_from_the_bundles_images(
    bundle_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """Scores made by a few lines of numpy, from the bundle's query PNGs and the training set it names."""
    root, folder = bundle_run
    bundle = load_bundle(folder)
    registry = bundle.description["train_set"]["registry"]
    train_set = build_dataset(
        registry["name"],
        "train",
        None,
        registry["image_size"],
        classes=registry.get("classes"),
        num_train=registry.get("num_train"),
    )
    train = train_set.images.numpy()
    digest = hashlib.blake2b(train.tobytes(), digest_size=16).hexdigest()
    assert digest == bundle.description["train_set"]["images_blake2b"]  # the same images, in the same order

    def cosine(queries: np.ndarray) -> np.ndarray:
        a = queries.reshape(len(queries), -1) / 127.5 - 1.0
        b = train.reshape(len(train), -1) / 127.5 - 1.0
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        return a @ b.T  # queries x train

    path = tmp_path / "numpy_pixel.npz"
    np.savez(path, **{name: cosine(bundle.query_images(name)) for name in bundle.query_sets})
    report = evaluate_scores(bundle, path, name="numpy_pixel")
    assert {(r.query_set, r.lambda_selection) for r in report.records} == {
        (q, s) for q in ("val", "generated") for s in ("heldout", "oracle")
    }
    assert {(d.a, d.b) for d in report.differences} == {("numpy_pixel", "das"), ("numpy_pixel", "pixel")}
    recorded = {(r.method, r.query_set, r.lambda_selection): r for r in bundle.records}
    for record in report.records:  # the project's pixel baseline is the same cosine
        assert record.lds == pytest.approx(recorded[("pixel", record.query_set, record.lambda_selection)].lds)


def test_a_damaged_missing_or_other_rule_bundle_is_one_clear_error(
    bundle_run: tuple[Path, Path], tmp_path: Path
) -> None:
    _, folder = bundle_run
    damaged = _copy(folder, tmp_path / "damaged")
    data = bytearray((damaged / "ground_truth" / "val.npy").read_bytes())
    data[-3] ^= 0x01  # one bit of one loss
    (damaged / "ground_truth" / "val.npy").write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match=r"ground_truth/val\.npy is damaged"):
        load_bundle(damaged)

    missing = _copy(folder, tmp_path / "missing")
    (missing / "queries" / "generated" / "0003.png").unlink()
    with pytest.raises(CorruptArtifactError, match=r"queries/generated/0003\.png is missing"):
        load_bundle(missing)

    other = _copy(folder, tmp_path / "other-rule")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["noise_rule"] = "noise-0123456789abcdef"  # made by code that draws other noise
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestMismatchError, match="noise_rule: on disk 'noise-0123456789abcdef'"):
        load_bundle(other)

    result = run_entry("evaluate_lds.py", f"bundle={missing}", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "0003.png is missing" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("error:") == 1


def test_a_wrong_shape_is_one_clear_error(bundle_run: tuple[Path, Path]) -> None:
    _, folder = bundle_run
    bundle = load_bundle(folder)
    with pytest.raises(
        ConfigError, match=r"'val' have shape \(5, 48\); the bundle expects queries x train = \(6, 48\)"
    ):
        evaluate_scores(bundle, {"val": np.zeros((5, 48))})
    with pytest.raises(ConfigError, match=r"at c = 1 have shape \(6, 47\)"):
        evaluate_scores(bundle, {"val": np.zeros((3, 6, 47))}, lambdas=[1.0, 2.0, 3.0])
    with pytest.raises(ConfigError, match="save one array per set"):
        evaluate_scores(bundle, np.zeros((6, 48)))
    with pytest.raises(ConfigError, match="the bundle has"):
        evaluate_scores(bundle, {"test": np.zeros((6, 48))})


def test_attribute_against_a_bundle_then_evaluate_its_scores(
    bundle_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """A method scored with nothing but the bundle: its model, the training set it names and its query images
    (under their own identities, so the same noise) give the run's own scores, and the run's records."""
    root, folder = bundle_run
    elsewhere = tmp_path / "elsewhere"
    result = cli.run_attribute(
        compose("attribute", [f"paths.root={elsewhere}", *TINY_ATTRIBUTE, f"bundle={folder}"])
    )
    for query_set, scores_folder in result.folders.items():
        assert elsewhere in scores_folder.parents
        ours, _ = load_scores(scores_folder)
        theirs, _ = load_scores(root / RUN / "scores" / "das" / query_set)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)
    report = evaluate_scores(folder, result.folders["val"].parent)
    recorded = {(r.method, r.query_set, r.lambda_selection): r for r in load_bundle(folder).records}
    for record in report.records:
        assert record.method == "das (yours)"
        assert record.lds == pytest.approx(recorded[("das", record.query_set, record.lambda_selection)].lds)
