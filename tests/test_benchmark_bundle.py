"""The committed LDS bundle of the fashion2 benchmark (benchmarks/bundles/fashion2): the README's and docs'
tables are what it reproduces, and scores made outside the project are evaluated against it without training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from das_lightning.evaluation.bundle import (
    bundle_train_set,
    evaluate_scores,
    load_bundle,
    reproduce_recorded,
)

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "benchmarks" / "bundles" / "fashion2"
RESULTS = REPO / "benchmarks" / "results" / "lds_fashion2.json"


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(BUNDLE)


def test_the_bundle_is_small_enough_to_commit() -> None:
    size = sum(path.stat().st_size for path in BUNDLE.rglob("*") if path.is_file())
    assert size < 8 * 2**20, f"the committed bundle grew to {size / 2**20:.1f} MiB"


def test_the_bundle_reproduces_the_committed_benchmark_table_exactly(bundle) -> None:
    """Every record and paired difference of benchmarks/results/lds_fashion2.json, recomputed from the bundle's
    predictions and ground truth alone (the bootstrap is seeded, so exactly)."""
    committed = json.loads(RESULTS.read_text())
    report = reproduce_recorded(bundle)
    recomputed = {(r.method, r.query_set, r.lambda_selection): r for r in report.records}
    assert len(recomputed) == len(committed["records"])
    for record in committed["records"]:
        again = recomputed[(record["method"], record["query_set"], record["lambda_selection"])]
        for key in ("lds", "ci_low", "ci_high"):
            assert getattr(again, key) == pytest.approx(record[key], abs=1e-9), (record["method"], key)
        assert again.lambda_ == record["lambda_scale"]
    differences = {(d.a, d.b, d.query_set): d for d in report.differences}
    assert len(differences) == len(committed["differences"])
    for difference in committed["differences"]:
        again = differences[(difference["a"], difference["b"], difference["query_set"])]
        for key in ("diff", "ci_low", "ci_high"):
            assert getattr(again, key) == pytest.approx(difference[key], abs=1e-9)


def test_numpy_pixel_cosine_against_the_bundle_matches_the_recorded_baseline(bundle, tmp_path: Path) -> None:
    """Pixel cosine computed by a few lines of numpy from the bundle's query PNGs and the training set it names
    (embedded in the package: nothing is downloaded) gets the LDS the project's own pixel baseline recorded."""
    train = bundle_train_set(bundle).images.numpy().astype(np.float64)
    b = train.reshape(len(train), -1) / 127.5 - 1.0
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    scores = {}
    for name in bundle.query_sets:
        a = bundle.query_images(name).astype(np.float64)
        a = a.reshape(len(a), -1) / 127.5 - 1.0
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        scores[name] = a @ b.T
    path = tmp_path / "numpy_pixel.npz"
    np.savez(path, **scores)
    report = evaluate_scores(bundle, path, name="numpy_pixel")
    recorded = {(r.method, r.query_set, r.lambda_selection): r for r in bundle.records}
    assert report.records
    for record in report.records:
        assert record.lds == pytest.approx(
            recorded[("pixel", record.query_set, record.lambda_selection)].lds, abs=1e-9
        )
