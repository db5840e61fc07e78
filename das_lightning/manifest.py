"""Manifests: the JSON record of what made an artifact, and the check that refuses to mix artifacts.

Every artifact folder (model, feature store, scores, LDS ground truth) carries ``manifest.json``. A stage that
opens an existing artifact compares the manifest with its own settings and stops, naming each differing key.

Integrity: every file a later stage reuses is written through :func:`atomic_path` (a temporary name in the same
folder, then ``os.replace``: a kill leaves the old file or the new one, never half of one), and its byte size and
BLAKE2b checksum are recorded under ``"files"`` in the folder's manifest *before* it is renamed into place, so a
file in place always has a record. :func:`verified_file` checks a file against its record before reuse and raises
:class:`CorruptArtifactError` (one line naming the file and what to delete or rerun) when they disagree.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from das_lightning.errors import UserError

MANIFEST_NAME = "manifest.json"
FILES_KEY = (
    "files"  # integrity records {file name: {"bytes", "blake2b"}}: written after the settings, not compared
)


class CorruptArtifactError(UserError, RuntimeError):
    """A file a stage would reuse disagrees with what was recorded when it was made (truncated, damaged, missing)."""


class ManifestMismatchError(UserError, RuntimeError):
    """An existing artifact was made with settings other than the ones asked for now."""

    def __init__(self, path: Path, differences: dict[str, tuple[Any, Any]]):
        self.path = Path(path)
        self.differences = differences
        lines = [f"  {key}: on disk {old!r}, requested {new!r}" for key, (old, new) in differences.items()]
        super().__init__(
            f"{path} was made with different settings; refusing to mix artifacts.\n"
            + "\n".join(lines)
            + "\nDelete the folder or choose another output path to start over."
        )


def _normalise(value: Any) -> Any:
    """JSON round-trip so that tuples/lists and int/float keys compare as they will be stored."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def no_room(path: Path) -> tuple[int, str] | None:
    """(errno, reason) when a write to ``path`` has run out of room: the process's file-size limit
    (``RLIMIT_FSIZE``) reached, or less than 1 MiB left on its disk; None otherwise."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and path.exists() and path.stat().st_size >= limit:
        return errno.EFBIG, f"File too large: the file-size limit of {limit} bytes was reached"
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return None
    if free < 1 << 20:
        return errno.ENOSPC, f"No space left on device: {free} bytes free"
    return None


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix, so PIL and matplotlib infer the format) to write to; on
    success it is flushed to disk and renamed over ``path``, on failure removed. A reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, path)
    except Exception as error:
        reason = no_room(tmp)
        tmp.unlink(missing_ok=True)
        if reason is not None:  # writers report a short write in their own words (numpy, safetensors, PIL)
            raise OSError(reason[0], reason[1], str(path)) from error
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        _fsync_path(path.parent)  # the rename itself survives a power cut
    except OSError:  # some file systems cannot fsync a folder
        pass


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """A staging folder beside ``path`` to fill (e.g. ``save_pretrained``); on success its files are flushed and
    it replaces ``path`` by one rename, on failure it is removed: no reader sees a half-written folder."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        for item in staging.rglob("*"):
            if item.is_file():
                _fsync_path(item)
        if path.exists():  # replaced wholesale (os.replace cannot rename over a folder that has files)
            shutil.rmtree(path)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that a reader sees either the old or the new content, never half of it."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that a reader sees either the old or the new content, never half of it."""
    atomic_write_bytes(path, text.encode())


def atomic_save(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` (any writer that takes a path: ``save_file``, ``Image.save``, ``np.save``), then rename."""
    with atomic_path(path) as tmp:
        write(tmp)


# -- integrity records ----------------------------------------------------------------------------------------
def file_record(path: Path, chunk_bytes: int = 1 << 22) -> dict[str, Any]:
    """What a file must look like when reused: its size and BLAKE2b checksum."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return {"bytes": Path(path).stat().st_size, "blake2b": digest.hexdigest()}


def verify_size(
    path: Path, expected_bytes: int, remedy: str, error: type[CorruptArtifactError] = CorruptArtifactError
) -> None:
    """Raise ``error`` naming ``path`` and ``remedy`` when it is missing or not ``expected_bytes`` long (checked
    before a file is mapped: an r+ memmap of a short file would zero-extend it to full size)."""
    path = Path(path)
    if not path.exists():
        raise error(f"{path} is missing: {remedy}")
    size = path.stat().st_size
    if size != expected_bytes:
        raise error(
            f"{path} is damaged ({path.name} holds {size} bytes where {expected_bytes} were written: truncated or "
            f"overwritten): {remedy}"
        )


def verify_file(path: Path, record: Mapping[str, Any] | None, remedy: str) -> None:
    """Raise :class:`CorruptArtifactError` naming ``path`` and ``remedy`` unless it matches ``record``."""
    path = Path(path)
    if record is None:
        raise CorruptArtifactError(
            f"{path} has no size/checksum record (made by an older version?): {remedy}"
        )
    verify_size(path, record["bytes"], remedy)
    if file_record(path)["blake2b"] != record["blake2b"]:
        raise CorruptArtifactError(f"{path} is damaged: its checksum differs from the one recorded: {remedy}")


def commit_file(folder: Path, name: str, write: Callable[[Path], Any]) -> None:
    """Write ``folder/name`` through a temporary file and record its size and checksum in the folder's manifest,
    record first, so that a file in place always has its record."""
    with atomic_path(Path(folder) / name) as tmp:
        write(tmp)
        record_files(folder, {name: file_record(tmp)})


def record_files(folder: Path, records: Mapping[str, Mapping[str, Any]]) -> None:
    manifest = read_manifest(folder) or {}
    write_manifest(folder, {**manifest, FILES_KEY: {**manifest.get(FILES_KEY, {}), **records}})


def verified_file(folder: Path, name: str, remedy: str) -> Path | None:
    """``folder/name`` when it is there and matches its record; None when it is not there (to be made);
    :class:`CorruptArtifactError` when it is there and damaged, or has no record."""
    path = Path(folder) / name
    if not path.exists():
        return None
    record = ((read_manifest(folder) or {}).get(FILES_KEY) or {}).get(name)
    verify_file(path, record, remedy)
    return path


def read_json(path: Path, remedy: str) -> Any:
    """A JSON file; one clear error naming it when it cannot be parsed (truncated, overwritten)."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptArtifactError(f"{path} is damaged ({error}): {remedy}") from error


def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> None:
    atomic_write_text(
        Path(folder) / MANIFEST_NAME, json.dumps(_normalise(dict(manifest)), indent=2, sort_keys=True)
    )


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        return None
    manifest = read_json(path, f"delete {Path(folder)} and rerun the stage that made it")
    if not isinstance(manifest, dict):
        raise CorruptArtifactError(f"{path} is damaged (not a JSON object): delete {Path(folder)}")
    return manifest


def manifest_differences(
    on_disk: Mapping[str, Any], requested: Mapping[str, Any], ignore: Iterable[str] = ()
) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ (a key missing on one side counts as ``None`` there). Nested settings are
    compared key by key and named with dots (``settings.projector.seed``), so a refusal names only what differs."""
    on_disk, requested = _normalise(dict(on_disk)), _normalise(dict(requested))
    return _differences(on_disk, requested, set(ignore), "")


def _differences(
    on_disk: Mapping[str, Any], requested: Mapping[str, Any], skipped: set[str], prefix: str
) -> dict[str, tuple[Any, Any]]:
    found: dict[str, tuple[Any, Any]] = {}
    for key in sorted((set(on_disk) | set(requested)) - skipped):
        old, new = on_disk.get(key), requested.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            found.update(_differences(old, new, set(), f"{prefix}{key}."))
        else:
            found[f"{prefix}{key}"] = (old, new)
    return found


def check_or_write_manifest(folder: Path, requested: Mapping[str, Any], ignore: Iterable[str] = ()) -> None:
    """Write the manifest if the folder has none; otherwise raise if it disagrees with ``requested`` (the
    integrity records under ``"files"`` are not settings and are never compared)."""
    on_disk = read_manifest(folder)
    if on_disk is None:
        write_manifest(folder, requested)
        return
    differences = manifest_differences(on_disk, requested, {*ignore, FILES_KEY})
    if differences:
        raise ManifestMismatchError(Path(folder), differences)


def hash_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (hex), to pin a checkpoint in a manifest."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def hash_array(values: Iterable[int]) -> str:
    """Short SHA-256 of an index list, to pin a dataset subset or query list in a manifest."""
    digest = hashlib.sha256(",".join(str(int(v)) for v in values).encode())
    return digest.hexdigest()[:16]
