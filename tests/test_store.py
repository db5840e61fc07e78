"""The feature store: resumable by row, refuses foreign settings, never counts a half-written row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from das_lightning.attribution.store import CorruptStoreError, FeatureStore
from das_lightning.manifest import ManifestMismatchError

MANIFEST = {"checkpoint": "abc", "projector": {"kind": "dense", "seed": 0, "dim": 4}, "set_name": "x:train"}


def test_rows_land_by_index_and_pending_shrinks(tmp_path: Path) -> None:
    store = FeatureStore.open(tmp_path / "s", 5, 4, MANIFEST)
    assert store.pending_indices().tolist() == [0, 1, 2, 3, 4]
    rows = np.arange(8, dtype=np.float32).reshape(2, 4)
    store.write(np.array([3, 1]), rows)
    reopened = FeatureStore.open(tmp_path / "s", 5, 4, MANIFEST)
    assert reopened.pending_indices().tolist() == [0, 2, 4]
    np.testing.assert_array_equal(reopened.features[3], rows[0])
    np.testing.assert_array_equal(reopened.features[1], rows[1])
    assert not reopened.is_complete
    with pytest.raises(RuntimeError, match="3 of 5 rows missing"):
        reopened.require_complete()


def test_other_settings_are_refused_naming_each_key(tmp_path: Path) -> None:
    FeatureStore.open(tmp_path / "s", 5, 4, MANIFEST)
    changed = {**MANIFEST, "checkpoint": "def", "projector": {"kind": "dense", "seed": 1, "dim": 4}}
    with pytest.raises(ManifestMismatchError) as error:
        FeatureStore.open(tmp_path / "s", 5, 4, changed)
    assert set(error.value.differences) == {"checkpoint", "projector"}
    assert "checkpoint" in str(error.value) and "'seed': 1" in str(error.value)
    with pytest.raises(ManifestMismatchError, match="dim"):
        FeatureStore.open(tmp_path / "s", 5, 8, MANIFEST)


def test_rows_written_but_not_marked_done_are_recomputed(tmp_path: Path) -> None:
    store = FeatureStore.open(tmp_path / "s", 3, 4, MANIFEST)
    # a crash between writing the features and marking them done leaves the row pending
    store.features[2] = 7.0
    store.features.flush()
    assert FeatureStore.open(tmp_path / "s", 3, 4, MANIFEST).pending_indices().tolist() == [0, 1, 2]


def test_truncated_store_is_reported_as_corrupt(tmp_path: Path) -> None:
    FeatureStore.open(tmp_path / "s", 6, 4, MANIFEST)
    path = tmp_path / "s" / "features.npy"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptStoreError, match="delete the folder"):
        FeatureStore.open(tmp_path / "s", 6, 4, MANIFEST)


def test_nan_rows_are_refused_and_nothing_is_marked(tmp_path: Path) -> None:
    store = FeatureStore.open(tmp_path / "s", 3, 2, MANIFEST)
    with pytest.raises(FloatingPointError, match=r"\[1\]"):
        store.write(np.array([0, 1]), np.array([[1.0, 2.0], [np.nan, 0.0]], dtype=np.float32))
    assert store.pending_indices().tolist() == [0, 1, 2]


def test_read_only_open_checks_expected_keys(tmp_path: Path) -> None:
    FeatureStore.open(tmp_path / "s", 3, 2, MANIFEST, dtype="float16")
    store = FeatureStore.open_existing(tmp_path / "s", {"checkpoint": "abc"})
    assert store.features.dtype == np.float16
    with pytest.raises(ManifestMismatchError, match="checkpoint"):
        FeatureStore.open_existing(tmp_path / "s", {"checkpoint": "zzz"})
    with pytest.raises(FileNotFoundError, match="attribute.py"):
        FeatureStore.open_existing(tmp_path / "missing")
