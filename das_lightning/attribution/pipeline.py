"""The attribution stage: features (cached in stores) -> scores for every query against every training image
-> top-k lists and pictures. What differs between methods lives in their entries (attribution/methods/).

Outputs, under ``<run>/scores/<method>/<query set>/``:
    scores.npy     lambdas x queries x train (float32), one row per c of ``method.lambda_scales`` (lambda = c x unit,
                   see :mod:`das_lightning.lambdas`); methods without lambda have one row
    manifest.json  the feature manifests' keys, method settings, c grid, unit and lambdas, query list identity,
                   and the c chosen for pictures with its source
    topk.json      top proponents/opponents per query at the chosen c (the LDS's held-out selection if any)
    grid.png       each row a query and its top proponents (then opponents)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from das_lightning.attribution.context import AttributionInputs, ScoringContext
from das_lightning.attribution.ensemble import average_scores, check_method
from das_lightning.attribution.features import CollectionDevice
from das_lightning.attribution.methods import Method, build_method
from das_lightning.attribution.ranking import topk
from das_lightning.attribution.settings import MethodSettings
from das_lightning.data import ImageDataset, content_entry
from das_lightning.distributed import is_global_zero
from das_lightning.errors import ConfigError, MissingArtifactError, NumericalError
from das_lightning.file_queries import FileQueryDataset
from das_lightning.manifest import (
    FILES_KEY,
    atomic_save,
    atomic_write_text,
    file_record,
    hash_array,
    hash_file,
    read_manifest,
    verify_file,
    write_manifest,
)
from das_lightning.report import write_report
from das_lightning.selection import ChosenScale, choose_scale
from das_lightning.viz import active_run, attribution_grid, image_grid, log_images_to_wandb, log_table

log = logging.getLogger(__name__)

SCORES_FILE = "scores.npy"


@dataclass
class AttributionResult:
    method: str
    folders: dict[str, Path]
    chosen: dict[
        str, ChosenScale | None
    ]  # per query set: the c of the pictures and its source (None: no lambda)


def attribute(
    inputs: AttributionInputs,
    method: MethodSettings,
    device: CollectionDevice = CollectionDevice(),
    logger: Any = None,
    members: list[AttributionInputs] | None = None,
) -> AttributionResult:
    """Scores of ``method`` for each query set against the training set, with top-k lists and grids.

    ``members`` (an ensemble, see :mod:`das_lightning.attribution.ensemble`): each member scores with its own model,
    features and kernel, and the scores written under ``method.name`` are the members' mean at each c.

    Under DDP every rank runs this: feature collection is collective, so each rank takes part in every set's
    collection, and only global rank zero writes the score folders (the others return the same folder paths)."""
    entry = validate_method(method, ensemble=bool(members))
    entry.check_available()  # fail before anything is written
    contexts = [ScoringContext(member, method, device, logger) for member in members or [inputs]]
    folders: dict[str, Path] = {}
    chosen: dict[str, ChosenScale | None] = {}
    for query_set, queries in attributable_sets(entry, inputs.query_sets).items():
        per_member = [entry.scores(member, query_set) for member in contexts]
        result = (
            per_member[0]
            if not members
            else average_scores(per_member, [member.inputs for member in contexts])
        )
        scales = sorted(result.by_scale, key=lambda c: -1.0 if c is None else c)
        stacked = np.stack([result.by_scale[c] for c in scales]).astype(
            np.float32
        )  # lambdas x queries x train
        if not np.all(np.isfinite(stacked)):
            raise NumericalError(f"{method.name}: non-finite scores for {query_set}; check the features")
        chosen[query_set] = (
            choose_scale(inputs.lds_file, method.name, query_set, method.lambda_scale)
            if result.has_lambda
            else None
        )
        if chosen[query_set] is not None and chosen[query_set].scale not in result.by_scale:
            raise ConfigError(
                f"lambda scale c = {chosen[query_set].scale:g} ({chosen[query_set].source}) is not on the grid "
                f"method.lambda_scales; add it or set method.lambda_scale to a grid value"
            )
        lambda_info = result.lambda_record()
        folder = inputs.scores_dir / method.name / query_set
        folders[query_set] = folder
        if is_global_zero():
            _write_scores(folder, stacked, lambda_info, chosen[query_set], entry, inputs, queries)
            _log_pictures(folder, logger, method.name, query_set, queries, inputs.train_set)
    return AttributionResult(method.name, folders, chosen)


def attributable_sets(entry: Method, query_sets: dict[str, ImageDataset]) -> dict[str, ImageDataset]:
    """The query sets ``entry`` can attribute; the others are named and skipped (none left: an error)."""
    if entry.needs_query_sets is None:
        return query_sets
    kept = {name: queries for name, queries in query_sets.items() if name in entry.needs_query_sets}
    skipped = sorted(set(query_sets) - set(kept))
    if not kept:
        raise ConfigError(
            f"method {entry.settings.name!r} attributes only {', '.join(entry.needs_query_sets)} queries; "
            f"asked for {', '.join(sorted(query_sets))}: set queries.sets=[{','.join(entry.needs_query_sets)}]"
        )
    if skipped:
        log.warning(
            "%s attributes only %s queries: skipping %s",
            entry.settings.name,
            ", ".join(entry.needs_query_sets),
            ", ".join(skipped),
        )
    return kept


def validate_method(method: MethodSettings, ensemble: bool = False) -> Method:
    """Every check of a method's settings, before any work (the CLI calls it before loading the model); with
    ``ensemble``, also that the method's scores can be averaged over models. Returns the built entry."""
    entry = build_method(method)
    if ensemble:
        check_method(entry)
    return entry


def score_manifest(
    method: MethodSettings, inputs: AttributionInputs, queries: ImageDataset, lambda_info: dict[str, Any]
) -> dict[str, Any]:
    """What a score matrix was made from; evaluate_lds refuses scores for another train set or query list."""
    return {
        "method": method.scored_settings(),
        **lambda_info,
        "checkpoint": hash_file(inputs.model.weights_file),
        "train_set": inputs.train_set.set_name,
        "num_train": len(inputs.train_set),
        "query_set": queries.set_name,
        "num_queries": len(queries),
        "queries_hash": hash_array(queries.labels),
        **content_entry(queries),
    }


def scores_by_scale(stacked: np.ndarray, manifest: dict[str, Any]) -> dict[float | None, np.ndarray]:
    """{c: queries x train} of a score folder's rows ({None: scores} without lambda), as arrays in memory."""
    scales = manifest.get("lambda_scales")
    if not scales:
        return {None: np.array(stacked[0])}
    return {float(c): np.array(stacked[row]) for row, c in enumerate(scales)}


def scores_at(stacked: np.ndarray, manifest: dict[str, Any], scale: float | None) -> np.ndarray:
    """The queries x train scores of a score folder at lambda scale c (the only row when it has no lambda)."""
    scales = manifest.get("lambda_scales")
    if not scales:
        return np.asarray(stacked[0])
    if scale not in scales:
        raise ConfigError(f"lambda scale c = {scale} is not among the stored c values {scales}")
    return np.asarray(stacked[scales.index(scale)])


def _write_scores(
    folder: Path,
    stacked: np.ndarray,
    lambda_info: dict[str, Any],
    chosen: ChosenScale | None,
    entry: Method,
    inputs: AttributionInputs,
    queries: ImageDataset,
) -> None:
    method = entry.settings
    manifest = score_manifest(method, inputs, queries, lambda_info)
    picture = None if chosen is None else chosen.describe(lambda_info["lambda_unit"])
    folder.mkdir(parents=True, exist_ok=True)
    write_manifest(folder, {**manifest, "picture": picture, "complete": False})
    atomic_save(folder / SCORES_FILE, lambda tmp: np.save(tmp, stacked))
    top = topk(scores_at(stacked, manifest, None if chosen is None else chosen.scale), method.top_k)
    names = {"query_names": queries.file_names} if isinstance(queries, FileQueryDataset) else {}
    atomic_write_text(folder / "topk.json", json.dumps({"picture": picture, **names, **top}))
    headers = entry.headers()
    legend = _legend(method, picture, inputs)
    query_names = _query_names(queries)
    class_names = list(inputs.train_set.class_names)

    def train_caption(index: int) -> str:
        return f"#{index} {class_names[int(inputs.train_set.labels[index])]}"

    shown = min(method.num_grid_queries, len(queries))
    grid = attribution_grid(
        torch.stack([queries[i]["image"] for i in range(shown)]) if shown else torch.zeros(0),
        lambda idx: torch.stack([inputs.train_set[int(i)]["image"] for i in idx]),
        top["proponent_indices"][:shown],
        scores=top["proponent_scores"][:shown],
        opponent_indices=top["opponent_indices"][:shown],
        opponent_scores=top["opponent_scores"][:shown],
        header=headers,
        legend=legend,
        query_captions=query_names[:shown],
        train_caption=train_caption,
    )
    atomic_save(folder / "grid.png", grid.save)
    write_report(
        folder / "index.html",
        f"{method.name}: {queries.set_name}",
        legend,
        headers,
        lambda i: queries[i]["image"],
        query_names,
        lambda i: inputs.train_set[i]["image"],
        train_caption,
        top,
        shown=method.top_k,
    )
    files = {name: file_record(folder / name) for name in (SCORES_FILE, "topk.json")}
    write_manifest(folder, {**manifest, "picture": picture, "complete": True, FILES_KEY: files})


def _legend(method: MethodSettings, picture: dict[str, Any] | None, inputs: AttributionInputs) -> str:
    run = "/".join(inputs.scores_dir.parent.parts[-4:])  # <dataset>/<model>/<subset>/seed<r>
    if picture is None:
        return f"{method.name} | model {run}"
    source = "held-out LDS" if "held-out" in str(picture["source"]) else "default"
    return f"{method.name} | c={picture['lambda_scale']:g} ({source}), lambda={picture['lambda']:.3g} | model {run}"


def _query_names(queries: ImageDataset) -> list[str]:
    if isinstance(queries, FileQueryDataset):
        return list(queries.file_names)
    return [f"query {i}" for i in range(len(queries))]


def _log_pictures(
    folder: Path, logger: Any, method: str, query_set: str, queries: ImageDataset, train_set: ImageDataset
) -> None:
    """The grid, and a W&B table of one row per query: its image, then its top-5 proponents and opponents as
    image strips with their indices (first 100 queries). Nothing is logged, or drawn, without an active W&B run."""
    if active_run(logger) is None:
        return
    with Image.open(folder / "grid.png") as grid:
        log_images_to_wandb(
            logger,
            f"attribution/{method}/{query_set}",
            grid.copy(),
            caption="each row: query | top proponents | top opponents",
        )
    top = json.loads((folder / "topk.json").read_text())
    names = _query_names(queries)

    def strip(indices: list[int]) -> Image.Image:
        return image_grid(torch.stack([train_set[int(i)]["image"] for i in indices]), nrow=len(indices))

    rows = []
    for q, (p, o) in enumerate(
        zip(top["proponent_indices"][:100], top["opponent_indices"][:100], strict=True)
    ):
        query = image_grid(queries[q]["image"][None], nrow=1)
        rows.append([names[q], query, strip(p[:5]), json.dumps(p[:5]), strip(o[:5]), json.dumps(o[:5])])
    log_table(
        logger,
        f"attribution/{method}/{query_set}/topk",
        ["query", "image", "proponents", "proponent indices", "opponents", "opponent indices"],
        rows,
    )


def load_scores(folder: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """(lambdas x queries x train scores, manifest) of a finished score folder."""
    manifest = read_manifest(folder)
    if manifest is None or not manifest.get("complete"):
        raise MissingArtifactError(
            f"no finished scores at {folder}: run `python attribute.py method=...` first"
        )
    verify_file(
        folder / SCORES_FILE,
        (manifest.get(FILES_KEY) or {}).get(SCORES_FILE),
        "rerun `python attribute.py` with the same method to recompute the scores",
    )
    return np.load(folder / SCORES_FILE, mmap_mode="r"), manifest


__all__ = [
    "AttributionInputs",
    "AttributionResult",
    "MethodSettings",
    "attribute",
    "load_scores",
    "scores_at",
]
