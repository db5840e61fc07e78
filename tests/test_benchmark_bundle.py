"""The committed LDS bundle of the fashion2 benchmark (benchmarks/bundles/fashion2): the README's and docs'
tables are what it reproduces, and scores made outside the project are evaluated against it without training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

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


@pytest.fixture(scope="module")
def report(bundle):
    return reproduce_recorded(bundle)


def test_the_bundle_is_small_enough_to_commit() -> None:
    size = sum(path.stat().st_size for path in BUNDLE.rglob("*") if path.is_file())
    assert size < 8 * 2**20, f"the committed bundle grew to {size / 2**20:.1f} MiB"


def test_the_bundle_reproduces_the_committed_benchmark_table_exactly(report) -> None:
    """Every record and paired difference of benchmarks/results/lds_fashion2.json, recomputed from the bundle's
    predictions and ground truth alone (the bootstrap is seeded, so exactly)."""
    committed = json.loads(RESULTS.read_text())
    recomputed = {(r.method, r.query_set, r.lambda_selection): r for r in report.records}
    assert len(recomputed) == len(committed["records"])
    for record in committed["records"]:
        again = recomputed[(record["method"], record["query_set"], record["lambda_selection"])]
        for key in (
            "lds",
            "ci_low",
            "ci_high",
            "centred",
            "centred_ci_low",
            "centred_ci_high",
            "query_averaged",
        ):
            assert getattr(again, key) == pytest.approx(record[key], abs=1e-9), (record["method"], key)
        assert again.damping_dominated == record["damping_dominated"]
        assert again.lambda_ == record["lambda_scale"]
    differences = {(d.a, d.b, d.query_set): d for d in report.differences}
    assert len(differences) == len(committed["differences"])
    for difference in committed["differences"]:
        again = differences[(difference["a"], difference["b"], difference["query_set"])]
        for key in ("diff", "ci_low", "ci_high", "centred_diff", "centred_ci_low", "centred_ci_high"):
            assert getattr(again, key) == pytest.approx(difference[key], abs=1e-9)
    shared = [row.to_json() for row in report.shared]
    assert len(shared) == len(committed["meta"]["shared_factor"])
    for again, row in zip(shared, committed["meta"]["shared_factor"], strict=True):
        for key, value in row.items():
            assert again[key] == (pytest.approx(value, abs=1e-9) if isinstance(value, float) else value), key


def _spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([stats.spearmanr(a[:, q], b[:, q])[0] for q in range(a.shape[1])])


def test_centred_lds_and_baselines_agree_with_an_independent_computation(bundle, report) -> None:
    """The yardstick's centred LDS, query-averaged LDS, ceiling and factor share recomputed with scipy from the
    bundle's files alone (oracle records: every query and subset), as issue 26 measured them: e.g. generated
    queries 62% factor share and ceiling 75.1, DAS 51.3 plain / 23.8 centred / 54.6 query-averaged."""
    records = {(r.method, r.query_set, r.lambda_selection): r for r in report.records}
    shared = {(row.query_set, row.lambda_selection): row for row in report.shared}

    def z(values: np.ndarray) -> np.ndarray:
        return (values - values.mean(0)) / values.std(0)

    for query_set in bundle.query_sets:
        losses = np.load(BUNDLE / "ground_truth" / f"{query_set}.npy").mean(axis=0)  # subsets x queries
        standard = z(losses)
        singular = np.linalg.svd(standard, compute_uv=False)
        row = shared[(query_set, "oracle")]
        assert row.factor_share == pytest.approx(100 * singular[0] ** 2 / (singular**2).sum(), abs=1e-9)
        others = -(standard.sum(1, keepdims=True) - standard) / (standard.shape[1] - 1)
        assert row.ceiling == pytest.approx(100 * _spearman_columns(others, -losses).mean(), abs=1e-9)
        with np.load(BUNDLE / "predictions" / f"{query_set}.npz") as stored:
            for method in ("das", "dtrak", "ekfac", "pixel"):
                predicted = stored[method][1]  # rows: held-out c, oracle c
                record = records[(method, query_set, "oracle")]
                centred = z(predicted) - z(predicted).mean(1, keepdims=True)
                target = standard - standard.mean(1, keepdims=True)
                assert record.centred == pytest.approx(
                    100 * _spearman_columns(centred, -target).mean(), abs=1e-9
                )
                averaged = np.repeat(z(predicted).mean(1, keepdims=True), predicted.shape[1], axis=1)
                assert record.query_averaged == pytest.approx(
                    100 * _spearman_columns(averaged, -losses).mean(), abs=1e-9
                )
    generated = shared[("generated", "oracle")]
    assert generated.factor_share == pytest.approx(61.8, abs=0.05) and generated.ceiling == pytest.approx(
        75.1, abs=0.05
    )
    das = records[("das", "generated", "oracle")]
    assert (das.lds, das.centred, das.query_averaged) == pytest.approx((51.3, 23.8, 54.6), abs=0.05)


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


def test_the_fresh_evaluation_bundle_reproduces_its_committed_table() -> None:
    """benchmarks/bundles/fashion2_fresh (benchmarks/lds_fresh.py: data that chose nothing, disjoint ground-truth
    noise) recomputes every record and paired difference of benchmarks/results/lds_fashion2_fresh.json."""
    fresh = REPO / "benchmarks" / "bundles" / "fashion2_fresh"
    size = sum(path.stat().st_size for path in fresh.rglob("*") if path.is_file())
    assert size < 4 * 2**20
    bundle = load_bundle(fresh)
    assert bundle.settings.noise == "disjoint" and bundle.settings.seeds == [2, 3]
    committed = json.loads((REPO / "benchmarks" / "results" / "lds_fashion2_fresh.json").read_text())
    report = reproduce_recorded(bundle)
    recomputed = {(r.method, r.query_set, r.lambda_selection): r for r in report.records}
    assert len(recomputed) == len(committed["records"])
    for record in committed["records"]:
        again = recomputed[(record["method"], record["query_set"], record["lambda_selection"])]
        for key in ("lds", "ci_low", "ci_high", "centred", "centred_ci_low", "centred_ci_high"):
            assert getattr(again, key) == pytest.approx(record[key], abs=1e-9), (record["method"], key)
    differences = {(d.a, d.b, d.query_set): d for d in report.differences}
    for difference in committed["differences"]:
        again = differences[(difference["a"], difference["b"], difference["query_set"])]
        for key in ("diff", "ci_low", "ci_high", "centred_diff", "centred_ci_low", "centred_ci_high"):
            assert getattr(again, key) == pytest.approx(difference[key], abs=1e-9)
