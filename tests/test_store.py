"""The feature store: resumable by row, refuses foreign settings, never counts a half-written row."""

from __future__ import annotations

import json
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
    # only the keys that differ, nested ones by their dotted name: not both whole settings dicts
    assert set(error.value.differences) == {"checkpoint", "projector.seed"}
    assert "projector.seed: on disk 0, requested 1" in str(error.value)
    assert "kind" not in str(error.value)
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
    with pytest.raises(CorruptStoreError, match="features.npy holds 100 bytes.*delete"):
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


def _finished_store(folder: Path, rows: int = 300, dim: int = 8) -> np.ndarray:
    store = FeatureStore.open(folder, rows, dim, MANIFEST)
    values = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    store.write(np.arange(rows), values)
    return values


def test_manifest_records_each_files_size_shape_and_dtype(tmp_path: Path) -> None:
    _finished_store(tmp_path / "s")
    layout = json.loads((tmp_path / "s" / "manifest.json").read_text())["layout"]
    for name, record in layout.items():
        array = np.load(tmp_path / "s" / name, mmap_mode="r")
        assert record["bytes"] == (tmp_path / "s" / name).stat().st_size
        assert record["shape"] == list(array.shape) and record["dtype"] == array.dtype.name


def test_finished_store_cut_to_1000_bytes_is_refused_and_never_grown(tmp_path: Path) -> None:
    # numpy's r+ memmap zero-extends a short file: the size must be checked before mapping
    _finished_store(tmp_path / "s")
    path = tmp_path / "s" / "features.npy"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CorruptStoreError, match=r"features.npy holds 1000 bytes.*delete .* rerun"):
        FeatureStore.open(tmp_path / "s", 300, 8, MANIFEST)
    with pytest.raises(CorruptStoreError, match="features.npy holds 1000 bytes"):
        FeatureStore.open_existing(tmp_path / "s")
    assert path.stat().st_size == 1000


def test_damaged_finished_rows_are_refused_by_their_checksums(tmp_path: Path) -> None:
    values = _finished_store(tmp_path / "s")
    path = tmp_path / "s" / "features.npy"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # one bit of the last row
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match=r"1 finished rows \(first: \[299\]\)"):
        FeatureStore.open(tmp_path / "s", 300, 8, MANIFEST)
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))
    np.testing.assert_array_equal(FeatureStore.open_existing(tmp_path / "s").features, values)


def test_a_row_marked_done_that_was_never_written_is_refused(tmp_path: Path) -> None:
    FeatureStore.open(tmp_path / "s", 3, 4, MANIFEST)
    done = np.load(tmp_path / "s" / "done.npy", mmap_mode="r+")
    done[1] = 1  # a flipped bit in the done map: the zero row has no valid checksum
    done.flush()
    del done
    with pytest.raises(CorruptStoreError, match=r"first: \[1\]"):
        FeatureStore.open(tmp_path / "s", 3, 4, MANIFEST)
