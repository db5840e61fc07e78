"""A bundle an outsider can use with numpy alone (issue 26): the training images in row order with their checksum,
a README with the score format, and an example scorer that imports nothing from the package reproducing the
recorded pixel baseline's predictions, on the committed bundle and on a freshly exported one."""

from __future__ import annotations

import ast
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from das_lightning import cli
from das_lightning.errors import ConfigError, MissingArtifactError
from das_lightning.evaluation.bundle import (
    bundle_readme,
    bundle_train_set,
    complete_bundle,
    evaluate_scores,
    load_bundle,
)
from das_lightning.manifest import file_record, read_manifest, write_manifest

from conftest import REPO, TINY_LDS, compose, entry_env

BUNDLE = REPO / "benchmarks" / "bundles" / "fashion2"
SCORER = REPO / "examples" / "outside_scorer.py"


def _outside_scores(bundle: Path, tmp_path: Path) -> dict[str, np.ndarray]:
    """{query set: queries x train} written by the example scorer, run as a user would (its own process)."""
    output = tmp_path / "outside.npz"
    subprocess.run(
        [sys.executable, str(SCORER), str(bundle), str(output)],
        cwd=tmp_path,
        env=entry_env(),
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    with np.load(output, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def _check_pixel_predictions(bundle: Path, scores: dict[str, np.ndarray]) -> None:
    """masks @ scores^T, with numpy from bundle.json alone, equals the recorded ``pixel`` predictions (both rows:
    pixel has no c, so its held-out and oracle rows are one matrix)."""
    description = json.loads((bundle / "bundle.json").read_text())
    masks = np.zeros((len(description["subsets"]), description["train_set"]["num_images"]), dtype=bool)
    for subset in description["subsets"]:
        masks[subset["index"], subset["indices"]] = True
    assert set(scores) == set(description["query_sets"])
    for name, matrix in scores.items():
        assert matrix.shape == (description["query_sets"][name]["num_queries"], masks.shape[1])
        with np.load(bundle / "predictions" / f"{name}.npz", allow_pickle=False) as archive:
            recorded = archive["pixel"]  # (2, subsets, queries)
        ours = masks @ matrix.T  # subsets x queries
        for row in recorded:  # the recorded scores were float32: sums of hundreds of cosines agree to ~1e-5
            np.testing.assert_allclose(ours, row, rtol=0, atol=1e-4)


def test_the_example_scorer_imports_nothing_but_numpy_and_pil() -> None:
    tree = ast.parse(SCORER.read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "argparse", "hashlib", "json", "pathlib", "numpy", "PIL"}, imported


def test_the_example_scorer_reproduces_the_committed_pixel_predictions(tmp_path: Path) -> None:
    _check_pixel_predictions(BUNDLE, _outside_scores(BUNDLE, tmp_path))
    assert list(tmp_path.iterdir()) == [tmp_path / "outside.npz"]  # nothing else written where it ran


def test_the_committed_training_images_are_the_registry_rows_in_index_order() -> None:
    description = json.loads((BUNDLE / "bundle.json").read_text())
    identity = description["train_set"]
    pixels = np.load(BUNDLE / identity["images_file"], allow_pickle=False)
    assert pixels.dtype == np.uint8
    assert pixels.shape == (
        identity["num_images"],
        identity["channels"],
        identity["image_size"],
        identity["image_size"],
    )
    assert hashlib.blake2b(pixels.tobytes(), digest_size=16).hexdigest() == identity["images_blake2b"]
    bundle = load_bundle(BUNDLE)  # the manifest records the new files: the bundle still loads
    np.testing.assert_array_equal(bundle.train_images(), pixels)
    np.testing.assert_array_equal(bundle_train_set(bundle).images.numpy(), pixels)  # the registry's rows
    # made from bundle.json by the exporter's own function, not by hand
    assert (BUNDLE / "README.md").read_text() == bundle_readme(description)


def test_complete_bundle_adds_the_images_and_readme_an_older_export_lacks(tmp_path: Path) -> None:
    """The committed bundle got its images this way (no rerun of the benchmark): stripped back to its older export,
    it is rebuilt byte for byte from the registry, whose rows bundle_train_set checks against the recorded
    checksum."""
    older = tmp_path / "older"
    shutil.copytree(BUNDLE, older)
    description = json.loads((older / "bundle.json").read_text())
    for key in ("images_file", "images_axes"):
        del description["train_set"][key]
    (older / "bundle.json").write_text(json.dumps(description, indent=1))
    (older / "README.md").unlink()
    shutil.rmtree(older / "train")
    manifest = read_manifest(older)
    for name in ("README.md", "train/images.npy"):
        del manifest["files"][name]
    manifest["files"]["bundle.json"] = file_record(older / "bundle.json")  # as an older export recorded it
    write_manifest(older, manifest)
    with pytest.raises(MissingArtifactError, match="exported without its training images"):
        load_bundle(older).train_images()
    complete_bundle(older)
    for name in ("bundle.json", "manifest.json", "README.md", "train/images.npy"):
        assert (older / name).read_bytes() == (BUNDLE / name).read_bytes(), name


def test_one_npy_for_a_two_set_bundle_names_the_npz_to_write(tmp_path: Path) -> None:
    """The README's old ``scores=mine.npy`` on the committed two-set bundle: refused with the exact line to write,
    and that line, followed, is accepted."""
    path = tmp_path / "mine.npy"
    np.save(path, np.zeros((128, 500)))
    expected = f'np.savez("{tmp_path / "mine.npz"}", val=scores_val, generated=scores_generated)'
    with pytest.raises(ConfigError, match=re.escape(expected)) as refused:
        evaluate_scores(BUNDLE, path)
    assert "scores_val 128 x 500, scores_generated 128 x 500" in str(refused.value)
    assert f"scores={tmp_path / 'mine.npz'}" in str(refused.value)


@pytest.fixture(scope="module")
def exported(lds_run: Path, tmp_path_factory) -> Path:
    """A bundle exported now from the tiny LDS run (3 subsets, 48 training images of 8 x 8)."""
    root = tmp_path_factory.mktemp("outsider-run") / "run"
    shutil.copytree(lds_run, root)
    cli.run_lds(
        compose("evaluate_lds", [f"paths.root={root}", *TINY_LDS, f"export_bundle={root / 'bundle'}"])
    )
    return root / "bundle"


def test_a_new_export_carries_its_images_and_readme_and_the_example_scores_it(
    exported: Path, tmp_path: Path
) -> None:
    bundle = load_bundle(exported)
    pixels = bundle.train_images()
    assert pixels.shape == (48, 1, 8, 8) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, bundle_train_set(bundle).images.numpy())
    assert (exported / "README.md").read_text() == bundle_readme(bundle.description)
    assert (
        'np.savez("mine.npz", val=scores_val, generated=scores_generated)'
        in (exported / "README.md").read_text()
    )
    _check_pixel_predictions(exported, _outside_scores(exported, tmp_path))
