"""Readers for the official file formats (IDX for MNIST/Fashion-MNIST, CIFAR-10's binary records) and a
checksum-verified downloader. Nothing here unpickles: CIFAR-10 is read from its binary version only."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import tarfile
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from das_lightning.data.base import DatasetNotFoundError
from das_lightning.errors import ConfigError
from das_lightning.manifest import atomic_path

DOWNLOAD_TIMEOUT_S = 30

# IDX type codes (third byte of the magic number) -> numpy dtype; multi-byte types are big-endian.
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

CIFAR_RECORD_BYTES = 1 + 3 * 32 * 32  # one label byte, then the red, green and blue 32x32 planes


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed, recognised by a ``.gz`` suffix) into an array.

    Layout: two zero bytes, a type code, the number of dimensions, one big-endian int32 per dimension, data.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ConfigError(f"{path} is not an IDX file (magic number {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ConfigError(
            f"{path}: header says shape {shape} ({expected} bytes) but holds {len(data) - offset}"
        )
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def read_cifar_binary(paths: Sequence[str | Path]) -> tuple[np.ndarray, np.ndarray]:
    """Read CIFAR-10 binary batches: images uint8 (N, 3, 32, 32) and labels int64 (N,)."""
    records = []
    for path in paths:
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size % CIFAR_RECORD_BYTES:
            raise ConfigError(
                f"{path}: {raw.size} bytes is not a whole number of {CIFAR_RECORD_BYTES}-byte records"
            )
        records.append(raw.reshape(-1, CIFAR_RECORD_BYTES))
    table = np.concatenate(records)
    return table[:, 1:].reshape(-1, 3, 32, 32).copy(), table[:, 0].astype(np.int64)


@dataclass(frozen=True)
class RemoteFile:
    """A file published at one or more mirrors, with its official checksum."""

    name: str
    mirrors: tuple[str, ...]
    md5: str


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download_verified(remote: RemoteFile, folder: Path) -> Path:
    """Download ``remote`` into ``folder`` (trying each mirror) and check its MD5 before keeping it.

    Raises:
        OSError: every mirror failed or served a file whose checksum is wrong; the message lists why.
    """
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / remote.name
    failures = []
    for mirror in remote.mirrors:
        url = mirror.rstrip("/") + "/" + remote.name
        try:
            with atomic_path(target) as partial:  # renamed into place only when the checksum is right
                with (
                    urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response,
                    open(partial, "wb") as out,
                ):
                    shutil.copyfileobj(response, out)
                checksum = file_md5(partial)
                if checksum != remote.md5:
                    raise _WrongChecksum(f"MD5 {checksum}, expected {remote.md5}")
            return target
        except (OSError, _WrongChecksum) as error:
            failures.append(f"{url}: {error}")
    raise OSError("download failed: " + "; ".join(failures))


class _WrongChecksum(Exception):
    """A mirror served a file whose checksum is not the expected one (try the next mirror)."""


def extract_members(archive: Path, folder: Path, members: Sequence[str]) -> None:
    """Extract only the named regular files of a tar archive (no other path can be written)."""
    with tarfile.open(archive) as tar:
        for name in members:
            member = tar.getmember(name)
            if not member.isfile():
                raise OSError(f"{archive}: {name} is not a regular file")
            source = tar.extractfile(member)
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as partial, source, open(partial, "wb") as out:
                shutil.copyfileobj(source, out)


def missing_files_error(
    dataset: str, split: str, root: Path | None, expected: Sequence[str], downloadable: bool, reason: str = ""
) -> DatasetNotFoundError:
    """The one message a user sees when a dataset's files are absent: what, where, and how to fix it."""
    where = f"under {root}" if root is not None else "(no dataset.root was given)"
    hint = "pass dataset.root=/path/to/data" + (
        " (or dataset.download=true when online)"
        if downloadable
        else f" ({dataset} is not downloaded automatically)"
    )
    files = ", ".join(expected)
    detail = f" {reason}." if reason else ""
    return DatasetNotFoundError(
        f"dataset {dataset!r} ({split} split): expected {files} {where}.{detail} Fix: {hint}."
    )
