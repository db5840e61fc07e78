"""Ensembles: one method's scores averaged over several models of the same training set.

Two kinds, as TRAK, D-TRAK and the DAS authors use them:

- ``ensemble.seeds=[0,1,2]``: the full models trained with ``train.py seed=r`` (independent initialisation, batch
  order and noise);
- ``ensemble.checkpoints=[250,500]``: training snapshots of this run (``train.snapshot_every_n_steps``), which cost
  no extra training.

Each member has its own features, kernel, lambda unit and (DAS) residuals, all computed with its own weights; the
query sets are the primary model's (``seed``): its generated images, featurised by every member. What is averaged
is each member's score matrix at the same lambda scale c: c is relative to each member's own feature scale
(lambda = c x trace(K)/N, see :mod:`das_lightning.lambdas`), so a given c regularises every member alike, and the
mean of the members' scores is an estimate of the same quantity with less of the variance that comes from one
model's random initialisation and training noise (TRAK's model ensemble averages the same way before its
out-to-loss weighting). The LDS predicts from sums of scores, so averaging scores averages the members' predictions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from das_lightning.artifacts import (
    DONE_MARKER,
    load_finished,
    network_with_snapshot,
    retrain_remedy,
    training_snapshots,
)
from das_lightning.attribution.context import AttributionInputs
from das_lightning.attribution.methods.base import Method, MethodScores
from das_lightning.errors import ConfigError, MissingArtifactError
from das_lightning.manifest import hash_file
from das_lightning.models.adapters import ModelAdapter
from das_lightning.paths import RunPaths


@dataclass
class EnsembleSettings:
    """``ensemble.*`` of attribute.yaml: which models' scores are averaged (none: the one model of ``seed``)."""

    seeds: list[int] | None = None  # full models trained with train.py seed=r
    checkpoints: list[int] | None = None  # training steps of this run's snapshots
    name: str | None = None  # the score folder's (and the LDS table's) name; None: derived from the members

    def __post_init__(self) -> None:
        self.seeds = None if self.seeds is None else [int(seed) for seed in self.seeds]
        self.checkpoints = None if self.checkpoints is None else [int(step) for step in self.checkpoints]

    @property
    def active(self) -> bool:
        return bool(self.seeds) or bool(self.checkpoints)

    def validate(self) -> None:
        if self.seeds and self.checkpoints:
            raise ConfigError("ensemble.seeds and ensemble.checkpoints are two kinds of ensemble: give one")
        members = self.seeds or self.checkpoints or []
        if len(set(members)) != len(members):
            raise ConfigError(f"ensemble members repeat: {members}")
        if any(step < 1 for step in self.checkpoints or []):
            raise ConfigError(f"ensemble.checkpoints are training steps (>= 1), got {self.checkpoints}")
        if any(seed < 0 for seed in self.seeds or []):
            raise ConfigError(f"ensemble.seeds must be non-negative, got {self.seeds}")
        if self.name is not None and (not self.name or "/" in self.name):
            raise ConfigError(f"ensemble.name must be a folder name, got {self.name!r}")

    def scores_name(self, method_name: str) -> str:
        """Where the ensemble's scores go: ``<method>_seeds0-1-2`` or ``<method>_steps250-500`` by default."""
        if self.name:
            return self.name
        if self.seeds:
            return f"{method_name}_seeds{'-'.join(map(str, self.seeds))}"
        return f"{method_name}_steps{'-'.join(map(str, self.checkpoints or []))}"


def check_method(entry: Method) -> None:
    """Refuse methods whose scores an ensemble cannot average meaningfully."""
    method_name = entry.settings.name
    if not entry.needs_features:
        raise ConfigError(
            f"method {method_name!r} does not depend on the model (no gradient features): an ensemble of it is "
            "the method itself; drop ensemble.*"
        )
    if entry.needs_snapshots or entry.needs_journey:
        raise ConfigError(
            f"method {method_name!r} already combines several states of one model (snapshots or denoising steps); "
            "ensembles are for the feature-based kernel and similarity methods"
        )


def ensemble_members(
    primary: AttributionInputs, paths: RunPaths, settings: EnsembleSettings, adapter: ModelAdapter
) -> list[AttributionInputs]:
    """The members' inputs: each its own model and feature folder, all with the primary run's query sets and
    score folder. A missing member is named with the command that makes it."""
    queries_of = f"{paths.tag}-seed{paths.seed}"  # generated queries are the primary model's
    members = []
    for seed in settings.seeds or []:
        member_paths = paths.sibling(paths.tag, seed)
        if not (member_paths.unet_dir / DONE_MARKER).exists():
            raise MissingArtifactError(
                f"ensemble member seed {seed} has no finished model at {member_paths.unet_dir}: train it with "
                f"`python train.py seed={seed}` and the same dataset/model/train settings as seed {paths.seed}"
            )
        model = primary.model if seed == paths.seed else load_finished(member_paths, adapter)
        members.append(
            replace(
                primary,
                model=model,
                features_dir=member_paths.features_dir,
                snapshots=[],
                journey={},
                member=f"seed{seed}",
                queries_of=None if seed == paths.seed else queries_of,
            )
        )
    if settings.checkpoints:
        snapshots = {_step_of(weights): weights for weights, _ in training_snapshots(paths)}
        for step in settings.checkpoints:
            if step not in snapshots:
                kept = sorted(snapshots) or "none"
                raise MissingArtifactError(
                    f"ensemble member step {step}: {paths.snapshots_dir} keeps no snapshot of that step "
                    f"(kept: {kept}); train with train.snapshot_every_n_steps=N so that N divides {step}: "
                    f"{retrain_remedy(paths)}"
                )
            weights = snapshots[step]
            network = network_with_snapshot(primary.model.network, weights)
            members.append(
                replace(
                    primary,
                    model=replace(primary.model, network=network, weights_file=weights),
                    features_dir=primary.features_dir / "snapshots" / weights.parent.name,
                    snapshots=[],
                    journey={},
                    member=f"step{step}",
                    queries_of=queries_of,
                )
            )
    return members


def average_scores(per_member: list[MethodScores], members: list[AttributionInputs]) -> MethodScores:
    """The members' scores averaged at each c (the same grid for all), with each member's record and own unit.

    The ensemble's own unit and spectrum are the first member's (the primary model), kept for the manifest's
    lambda column; each member's unit is in ``members``."""
    keys = set(per_member[0].by_scale)
    for scores in per_member[1:]:
        if set(scores.by_scale) != keys:
            raise ValueError("ensemble members scored different lambda grids")
    result = {}
    for key in per_member[0].by_scale:
        total = np.zeros(per_member[0].by_scale[key].shape, dtype=np.float64)
        for scores in per_member:
            total += scores.by_scale[key]
        result[key] = total / len(per_member)
    records = [
        {**member_record(member), "lambda_unit": scores.lambda_unit}
        for member, scores in zip(members, per_member, strict=True)
    ]
    return MethodScores(result, per_member[0].lambda_unit, per_member[0].spectrum, records)


def member_record(member: AttributionInputs) -> dict[str, str]:
    """What the score manifest records of a member: its name and the checksum of its weights."""
    return {"member": str(member.member), "checkpoint": hash_file(Path(member.model.weights_file))}


def _step_of(weights: Path) -> int:
    return int(weights.parent.name.removeprefix("step"))
