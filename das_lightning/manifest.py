"""Manifests: the JSON record of what made an artifact, and the check that refuses to mix artifacts.

Every artifact folder (model, feature store, scores, LDS ground truth) carries ``manifest.json``. A stage that
opens an existing artifact compares the manifest with its own settings and stops, naming each differing key.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"


class ManifestMismatchError(RuntimeError):
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


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that a reader sees either the old or the new content, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> None:
    atomic_write_text(
        Path(folder) / MANIFEST_NAME, json.dumps(_normalise(dict(manifest)), indent=2, sort_keys=True)
    )


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RuntimeError(f"{path} is corrupt ({error}); delete the folder to start over.") from error


def manifest_differences(
    on_disk: Mapping[str, Any], requested: Mapping[str, Any], ignore: Iterable[str] = ()
) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ (a key missing on one side counts as ``None`` there)."""
    on_disk, requested = _normalise(dict(on_disk)), _normalise(dict(requested))
    skipped = set(ignore)
    keys = (set(on_disk) | set(requested)) - skipped
    return {
        key: (on_disk.get(key), requested.get(key))
        for key in sorted(keys)
        if on_disk.get(key) != requested.get(key)
    }


def check_or_write_manifest(folder: Path, requested: Mapping[str, Any], ignore: Iterable[str] = ()) -> None:
    """Write the manifest if the folder has none; otherwise raise if it disagrees with ``requested``."""
    on_disk = read_manifest(folder)
    if on_disk is None:
        write_manifest(folder, requested)
        return
    differences = manifest_differences(on_disk, requested, ignore)
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
