"""The feature store: one folder per feature set, resumable, shared by the ranks of a DDP run.

    <folder>/features.npy   N x k array (fp32 or fp16), memory-mapped; row i is dataset index i
    <folder>/done.npy       N bytes, 1 where row i is complete (a byte per row so ranks never share a word)
    <folder>/manifest.json  everything that produced the rows (checkpoint hash, output function, timesteps,
                            noise seed, projector kind/seed/k, parameter selection, data + index hash, version)

A row is marked done only after its features are written and flushed, so a half-written row never counts: a run
killed at any moment resumes at the missing rows and ends with the same array as an uninterrupted run.
"""

from __future__ import annotations

import fcntl
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from das_lightning.manifest import ManifestMismatchError, check_or_write_manifest, read_manifest

FEATURES_FILE = "features.npy"
DONE_FILE = "done.npy"
LOCK_FILE = ".lock"
DTYPES = {"float32": np.float32, "float16": np.float16}


class CorruptStoreError(RuntimeError):
    """The files of a store do not agree with its manifest (truncated, resized or foreign files)."""


@contextmanager
def _locked(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class FeatureStore:
    """Rows of projected features written by dataset index, with a done-map for resuming."""

    def __init__(self, folder: Path, features: np.memmap, done: np.memmap, manifest: dict[str, Any]):
        self.folder = Path(folder)
        self._features = features
        self._done = done
        self.manifest = manifest

    # -- opening ---------------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls, folder: Path, num_rows: int, dim: int, manifest: Mapping[str, Any], dtype: str = "float32"
    ) -> FeatureStore:
        """Create the store, or reopen it to resume; refuses a store made with other settings (naming the keys)."""
        if dtype not in DTYPES:
            raise ValueError(f"feature dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
        folder = Path(folder)
        full_manifest = {**manifest, "num_rows": int(num_rows), "dim": int(dim), "dtype": dtype}
        with _locked(folder):  # ranks of a DDP run open the same store at once
            check_or_write_manifest(folder, full_manifest)
            if not (folder / FEATURES_FILE).exists():
                features = np.lib.format.open_memmap(
                    folder / FEATURES_FILE, mode="w+", dtype=DTYPES[dtype], shape=(num_rows, dim)
                )
                features.flush()
                done = np.lib.format.open_memmap(
                    folder / DONE_FILE, mode="w+", dtype=np.uint8, shape=(num_rows,)
                )
                done.flush()
                del features, done
        return cls._map(folder, full_manifest, mode="r+")

    @classmethod
    def open_existing(cls, folder: Path, expected: Mapping[str, Any] | None = None) -> FeatureStore:
        """Open a store read-only (for scoring); with ``expected``, refuse one whose manifest differs."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        if manifest is None:
            raise FileNotFoundError(
                f"no feature store at {folder} (no manifest.json): run `python attribute.py` first"
            )
        if expected is not None:
            from das_lightning.manifest import manifest_differences

            differences = manifest_differences({k: manifest.get(k) for k in expected}, dict(expected))
            if differences:
                raise ManifestMismatchError(folder, differences)
        return cls._map(folder, manifest, mode="r")

    @classmethod
    def _map(cls, folder: Path, manifest: dict[str, Any], mode: str) -> FeatureStore:
        shape = (int(manifest["num_rows"]), int(manifest["dim"]))
        try:
            features = np.load(folder / FEATURES_FILE, mmap_mode=mode)
            done = np.load(folder / DONE_FILE, mmap_mode=mode)
        except (OSError, ValueError) as error:
            raise CorruptStoreError(
                f"feature store {folder} is corrupt or half-created ({error}); delete the folder to start over"
            ) from error
        if (
            features.shape != shape
            or done.shape != (shape[0],)
            or features.dtype != DTYPES[manifest["dtype"]]
        ):
            raise CorruptStoreError(
                f"feature store {folder}: files hold {features.shape} {features.dtype} / done {done.shape}, "
                f"manifest says {shape} {manifest['dtype']}; delete the folder to start over"
            )
        return cls(folder, features, done, manifest)

    # -- state -----------------------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return self._features.shape[0]

    @property
    def dim(self) -> int:
        return self._features.shape[1]

    @property
    def features(self) -> np.ndarray:
        """The N x k memory map (read rows in blocks; never assume it fits in memory)."""
        return self._features

    def done_mask(self) -> np.ndarray:
        return np.asarray(self._done, dtype=bool).copy()

    def pending_indices(self) -> np.ndarray:
        return np.flatnonzero(np.asarray(self._done) == 0).astype(np.int64)

    @property
    def is_complete(self) -> bool:
        return bool(np.all(np.asarray(self._done) == 1))

    def require_complete(self) -> FeatureStore:
        missing = self.pending_indices()
        if missing.size:
            raise RuntimeError(
                f"feature store {self.folder} is incomplete: {missing.size} of {self.num_rows} rows missing "
                f"(first: {missing[:5].tolist()}); rerun `python attribute.py` to resume"
            )
        return self

    # -- writing ---------------------------------------------------------------------------------------------
    def write(self, indices: np.ndarray, rows: np.ndarray) -> None:
        """Write ``rows[j]`` at row ``indices[j]``, then mark those rows done (in that order, flushed between)."""
        indices = np.asarray(indices, dtype=np.int64)
        rows = np.asarray(rows)
        if rows.shape != (indices.size, self.dim):
            raise ValueError(f"rows of shape {rows.shape} do not fit indices {indices.size} x dim {self.dim}")
        if not np.all(np.isfinite(rows)):
            bad = indices[~np.all(np.isfinite(rows), axis=1)]
            raise FloatingPointError(
                f"non-finite features for dataset indices {bad[:10].tolist()}: the model or the gradients "
                "produced NaN/inf; nothing was written for this batch"
            )
        self._features[indices] = rows.astype(self._features.dtype)
        self._features.flush()
        self._done[indices] = 1
        self._done.flush()
