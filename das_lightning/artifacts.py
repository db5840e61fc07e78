"""Readers of a run's artifacts, for every stage that reuses them: the sealed model folder, its TracIn snapshots
and its generated queries (with the sampler that made them). training.py writes these; everything else reads
them through here, checked against what was sealed or recorded."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from das_lightning.data import ImageDataset
from das_lightning.errors import ConfigError, MissingArtifactError
from das_lightning.manifest import (
    CorruptArtifactError,
    ManifestMismatchError,
    manifest_differences,
    read_manifest,
    verified_file,
    verify_file,
)
from das_lightning.models.adapters import MeasuredModel, ModelAdapter
from das_lightning.models.ddpm import load_trained_network
from das_lightning.models.sampling import SamplerSettings
from das_lightning.paths import RunPaths

log = logging.getLogger(__name__)

DONE_MARKER = "DONE"  # in the model folder: the step and the size and checksum of every file (its seal)
GENERATED_FILE = "generated.safetensors"


def training_snapshots(paths: RunPaths) -> list[tuple[Path, float]]:
    """(weights file, learning rate) of each TracIn snapshot the run kept, in step order."""
    return [
        (
            folder / "diffusion_pytorch_model.safetensors",
            float(json.loads((folder / "snapshot.json").read_text())["lr"]),
        )
        for folder in sorted(paths.snapshots_dir.glob("step*"))
    ]


def network_with_snapshot(network: torch.nn.Module, weights_file: Path) -> torch.nn.Module:
    """A copy of ``network`` with a snapshot's weights (all of them, or a LoRA run's adapters); every snapshot
    tensor must land on a parameter of the network."""
    clone = copy.deepcopy(network)
    result = clone.load_state_dict(load_file(str(weights_file)), strict=False)
    if result.unexpected_keys:
        raise ConfigError(
            f"snapshot {weights_file} does not fit the model: unexpected {result.unexpected_keys[:5]}"
        )
    return clone


def retrain_remedy(paths: RunPaths) -> str:
    return (
        f"delete {paths.unet_dir} and rerun `python train.py` with the same settings "
        f"(subset {paths.tag}, seed {paths.seed}) to retrain it"
    )


def require_finished(paths: RunPaths) -> None:
    """A clear error naming the folder when the run has no finished model, or one naming the file when a file of
    the finished model is missing, truncated or damaged (its size and checksum were sealed in ``DONE``)."""
    marker = paths.unet_dir / DONE_MARKER
    if not marker.exists():
        raise MissingArtifactError(
            f"no finished model at {paths.unet_dir}: train it first with "
            f"`python train.py` (same dataset/model/subset/seed settings)"
        )
    text = marker.read_text().strip()
    if (
        text.isdigit()
    ):  # sealed by an older version: only the step, no checksums (loading still checks the files)
        log.warning("%s records no checksums (an older version made it); its files are not verified", marker)
        return
    try:
        sealed = json.loads(text)["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CorruptArtifactError(f"{marker} is damaged ({error}): {retrain_remedy(paths)}") from error
    for name, record in sealed.items():
        verify_file(paths.unet_dir / name, record, retrain_remedy(paths))


def load_finished(paths: RunPaths, adapter: ModelAdapter) -> MeasuredModel:
    """The finished model of a run as ``adapter`` loads and feeds it (latents cached under the experiment's folder);
    a clear error naming the folder when the run has no finished model."""
    require_finished(paths)
    return adapter.load(paths.unet_dir, paths.latents_dir)


def load_unet(paths: RunPaths) -> torch.nn.Module:
    """The trained UNet of a run (safetensors); a clear error naming the folder when it is not there."""
    require_finished(paths)
    return load_trained_network(paths.unet_dir)


def regenerate_remedy(paths: RunPaths) -> str:
    return (
        f"delete {paths.queries_dir / GENERATED_FILE} and rerun `python train.py` with the same settings to "
        "regenerate the queries"
    )


def generated_manifest(paths: RunPaths) -> dict[str, Any]:
    """The manifest of a run's finished generated queries; a clear error when there are none."""
    target = paths.queries_dir / GENERATED_FILE
    manifest = read_manifest(paths.queries_dir)
    if not target.exists() or manifest is None:
        raise MissingArtifactError(
            f"no generated queries at {target}: run `python train.py` with generation on first"
        )
    return manifest


def load_generated_queries(paths: RunPaths) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(images in [-1, 1], class labels, class names) of the run's generated queries."""
    class_names = list(generated_manifest(paths)["class_names"])
    verified_file(paths.queries_dir, GENERATED_FILE, regenerate_remedy(paths))
    stored = load_file(str(paths.queries_dir / GENERATED_FILE))
    return stored["images"], stored["labels"], class_names


def stored_sampler(paths: RunPaths) -> SamplerSettings:
    """The sampler settings a run's generated queries were made with (from their manifest)."""
    manifest = generated_manifest(paths)
    return SamplerSettings(**{key: manifest[key] for key in SamplerSettings.__dataclass_fields__})


def require_trained_on(paths: RunPaths, train_set: ImageDataset) -> None:
    """Refuse to use a model with a training set other than the one it was trained on."""
    manifest = read_manifest(paths.run_dir) or {}
    differences = manifest_differences(
        {"dataset": manifest.get("dataset"), "num_train": manifest.get("num_train")},
        {"dataset": train_set.set_name, "num_train": len(train_set)},
    )
    if differences:
        raise ManifestMismatchError(paths.run_dir, differences)
