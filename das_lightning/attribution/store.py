"""The feature store: one folder per feature set and settings, resumable, shared by the ranks of a DDP run.

Which folder holds the store of given settings (``<name>`` or ``<name>-<hash>`` beside it, so stores of different
settings coexist) is decided in one place, ``features.store_folder``; here a folder holds one store and refuses rows
made otherwise.

    <folder>/features.npy     N x k array (fp32 or fp16), memory-mapped; row i is dataset index i
    <folder>/row_digests.npy  N x 16 bytes: BLAKE2b of each finished row's bytes
    <folder>/done.npy         N bytes, 1 where row i is complete (a byte per row so ranks never share a word)
    <folder>/manifest.json    everything that produced the rows (checkpoint hash, output function, timesteps,
                              noise seed, the noise draws when not one per timestep, projector kind/seed/k,
                              parameter selection, data + index hash, version) and the byte size, shape and dtype
                              of each file ("layout")

A row is marked done only after its features and its checksum are written and flushed, so a half-written row never
counts: a run killed at any moment resumes at the missing rows and ends with the same array as an uninterrupted run.
Every open checks each file's size against the manifest before mapping it (numpy's ``r+`` memmap would silently
zero-extend a truncated file) and every row marked done against its checksum (a damaged row is refused, never used).
The manifest is written last when a store is created: a folder without one holds no store, only leftovers of an
interrupted creation, which are overwritten.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from das_lightning.errors import ConfigError, MissingArtifactError, NumericalError, UserError
from das_lightning.manifest import (
    CorruptArtifactError,
    ManifestMismatchError,
    manifest_differences,
    read_manifest,
    verify_size,
    write_manifest,
)

FEATURES_FILE = "features.npy"
DONE_FILE = "done.npy"
DIGESTS_FILE = "row_digests.npy"
LOCK_FILE = ".lock"
WRITER_LOCK_FILE = ".writer.lock"
DTYPES = {"float32": np.float32, "float16": np.float16}
DIGEST_BYTES = 16
VERIFY_BLOCK_ROWS = 4096


class CorruptStoreError(CorruptArtifactError):
    """The files of a store do not agree with its manifest (truncated, resized, damaged or foreign files)."""


class StoreBusyError(UserError, RuntimeError):
    """Another process is writing the same store."""


def _remedy(folder: Path) -> str:
    return f"delete {folder} and rerun `python attribute.py` to recompute these features"


def row_digests(rows: np.ndarray) -> np.ndarray:
    """BLAKE2b (16 bytes) of each row's bytes: (n, k) -> (n, 16) uint8."""
    rows = np.ascontiguousarray(rows)
    digests = b"".join(hashlib.blake2b(row.tobytes(), digest_size=DIGEST_BYTES).digest() for row in rows)
    return np.frombuffer(digests, dtype=np.uint8).reshape(len(rows), DIGEST_BYTES)


def npy_bytes(shape: tuple[int, ...], dtype: Any) -> int:
    """The size of a ``.npy`` file of this shape and dtype as ``open_memmap`` writes it (header + data)."""
    header = io.BytesIO()
    descriptor = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
        "fortran_order": False,
        "shape": tuple(shape),
    }
    np.lib.format.write_array_header_1_0(header, descriptor)
    return len(header.getvalue()) + int(np.prod(shape)) * np.dtype(dtype).itemsize


def _file_shapes(num_rows: int, dim: int, dtype: str) -> dict[str, tuple[tuple[int, ...], Any]]:
    return {
        FEATURES_FILE: ((num_rows, dim), DTYPES[dtype]),
        DIGESTS_FILE: ((num_rows, DIGEST_BYTES), np.uint8),
        DONE_FILE: ((num_rows,), np.uint8),
    }


def store_layout(num_rows: int, dim: int, dtype: str) -> dict[str, dict[str, Any]]:
    """Shape, dtype and byte size of each file of a store (recorded in its manifest, checked at every open)."""
    return {
        name: {"shape": list(shape), "dtype": np.dtype(kind).name, "bytes": npy_bytes(shape, kind)}
        for name, (shape, kind) in _file_shapes(num_rows, dim, dtype).items()
    }


@contextmanager
def _locked(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _launched_as_rank_zero() -> bool:
    """False in the ranks > 0 of a DDP launch (they share the store with rank zero, which holds the writer lock)."""
    return all(int(os.environ.get(key) or 0) == 0 for key in ("RANK", "LOCAL_RANK", "NODE_RANK"))


@contextmanager
def exclusive_writer(folder: Path) -> Iterator[None]:
    """Hold the store's writer lock (one run writes a store at a time; its own DDP ranks share rank zero's lock).

    A second run on the same store stops at once with :class:`StoreBusyError` instead of writing rows beside the
    first. The lock is an ``flock``: the kernel drops it when its holder dies, so a killed run leaves none behind."""
    folder = Path(folder)
    if not _launched_as_rank_zero():
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / WRITER_LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise StoreBusyError(
                f"feature store {folder} is being written by {holder}; wait for that run to finish (or stop it), "
                "then rerun"
            ) from None
        try:
            handle.truncate(0)
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class FeatureStore:
    """Rows of projected features written by dataset index, with a done-map for resuming."""

    def __init__(
        self,
        folder: Path,
        features: np.memmap,
        done: np.memmap,
        manifest: dict[str, Any],
        digests: np.memmap | None = None,
    ):
        self.folder = Path(folder)
        self._features = features
        self._done = done
        self._digests = digests
        self.manifest = manifest

    # -- opening ---------------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls, folder: Path, num_rows: int, dim: int, manifest: Mapping[str, Any], dtype: str = "float32"
    ) -> FeatureStore:
        """Create the store, or reopen it to resume; refuses a store made with other settings (naming the keys)
        and a store whose files are truncated or whose finished rows are damaged (naming the file)."""
        if dtype not in DTYPES:
            raise ConfigError(f"feature dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
        folder = Path(folder)
        full_manifest = {
            **manifest,
            "num_rows": int(num_rows),
            "dim": int(dim),
            "dtype": dtype,
            "layout": store_layout(int(num_rows), int(dim), dtype),
        }
        with _locked(folder):  # ranks of a DDP run open the same store at once
            on_disk = read_manifest(folder)
            if on_disk is None:
                _create_files(folder, int(num_rows), int(dim), dtype)
                write_manifest(folder, full_manifest)  # the manifest commits the store
            else:
                differences = manifest_differences(on_disk, full_manifest)
                if differences:
                    raise ManifestMismatchError(folder, differences)
        return cls._map(folder, full_manifest, mode="r+").verify()

    @classmethod
    def open_existing(cls, folder: Path, expected: Mapping[str, Any] | None = None) -> FeatureStore:
        """Open a store read-only (for scoring); with ``expected``, refuse one whose manifest differs."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        if manifest is None:
            raise MissingArtifactError(
                f"no feature store at {folder} (no manifest.json): run `python attribute.py` first"
            )
        if expected is not None:
            differences = manifest_differences({k: manifest.get(k) for k in expected}, dict(expected))
            if differences:
                raise ManifestMismatchError(folder, differences)
        return cls._map(folder, manifest, mode="r").verify()

    @classmethod
    def _map(cls, folder: Path, manifest: dict[str, Any], mode: str) -> FeatureStore:
        layout = manifest.get("layout")
        if layout is None:
            raise CorruptStoreError(
                f"feature store {folder} has no file layout in its manifest (made by an older version): "
                f"{_remedy(folder)}"
            )
        arrays = {}
        for name, expected in layout.items():
            path = folder / name
            verify_size(path, expected["bytes"], _remedy(folder), CorruptStoreError)
            try:
                array = np.load(path, mmap_mode=mode)
            except (OSError, ValueError) as error:
                raise CorruptStoreError(
                    f"feature store {folder}: {name} is damaged ({error}): {_remedy(folder)}"
                ) from error
            if list(array.shape) != expected["shape"] or array.dtype.name != expected["dtype"]:
                raise CorruptStoreError(
                    f"feature store {folder}: {name} holds {array.shape} {array.dtype}, the manifest says "
                    f"{tuple(expected['shape'])} {expected['dtype']}: {_remedy(folder)}"
                )
            arrays[name] = array
        return cls(folder, arrays[FEATURES_FILE], arrays[DONE_FILE], manifest, arrays[DIGESTS_FILE])

    def verify(self) -> FeatureStore:
        """Check every row marked done against its checksum (and that it is finite); rows not done are left for
        the collection to (re)compute. Reads the whole array once (about a second per GB)."""
        done = np.asarray(self._done)
        invalid = np.flatnonzero(done > 1)
        if invalid.size:
            raise CorruptStoreError(
                f"feature store {self.folder}: {DONE_FILE} is damaged (values other than 0/1 at rows "
                f"{invalid[:5].tolist()}): {_remedy(self.folder)}"
            )
        damaged: list[int] = []
        for start in range(0, self.num_rows, VERIFY_BLOCK_ROWS):
            finished = np.flatnonzero(done[start : start + VERIFY_BLOCK_ROWS] == 1)
            if not finished.size:
                continue
            rows = np.asarray(self._features[start : start + VERIFY_BLOCK_ROWS])[finished]
            stored = np.asarray(self._digests[start : start + VERIFY_BLOCK_ROWS])[finished]
            wrong = np.any(row_digests(rows) != stored, axis=1) | ~np.all(np.isfinite(rows), axis=1)
            damaged += (start + finished[wrong]).tolist()
        if damaged:
            raise CorruptStoreError(
                f"feature store {self.folder}: {len(damaged)} finished rows (first: {damaged[:5]}) do not match "
                f"their checksums in {DIGESTS_FILE}, so {FEATURES_FILE} is damaged: {_remedy(self.folder)}"
            )
        return self

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
        """Write ``rows[j]`` at row ``indices[j]`` and its checksum, then mark those rows done (in that order,
        flushed between)."""
        indices = np.asarray(indices, dtype=np.int64)
        rows = np.asarray(rows)
        if rows.shape != (indices.size, self.dim):
            raise ConfigError(
                f"rows of shape {rows.shape} do not fit indices {indices.size} x dim {self.dim}"
            )
        if not np.all(np.isfinite(rows)):
            bad = indices[~np.all(np.isfinite(rows), axis=1)]
            raise NumericalError(
                f"non-finite features for dataset indices {bad[:10].tolist()}: the model or the gradients "
                "produced NaN/inf; nothing was written for this batch"
            )
        stored = rows.astype(self._features.dtype)
        self._features[indices] = stored
        self._features.flush()
        self._digests[indices] = row_digests(stored)  # from the bytes as stored (fp16 rows: after rounding)
        self._digests.flush()
        self._done[indices] = 1
        self._done.flush()


def _create_files(folder: Path, num_rows: int, dim: int, dtype: str) -> None:
    """The empty files of a new store (only when the folder has no manifest: no store is there yet)."""
    for name, (shape, kind) in _file_shapes(num_rows, dim, dtype).items():
        array = np.lib.format.open_memmap(folder / name, mode="w+", dtype=kind, shape=shape)
        array.flush()
        del array
        # reserve the blocks now: on a full disk this fails here with ENOSPC, where a write into a sparse
        # memory map later would kill the process with SIGBUS
        fd = os.open(folder / name, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
        finally:
            os.close(fd)
