"""The attribution stage: features (cached in stores) -> scores for every query against every training image
-> top-k lists and pictures. One function per concern; method differences live in a small table, not in branches.

Outputs, under ``<run>/scores/<method>/<query set>/``:
    scores.npy     lambdas x queries x train (float32); methods without lambda have one row of lambdas ([0.0])
    manifest.json  the feature manifests' keys, method settings, lambdas, query list identity
    topk.json      top proponents/opponents per query at the picture lambda
    grid.png       each row a query and its top proponents (then opponents)
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from das_lightning.attribution import scores as scoring
from das_lightning.attribution.features import CollectionDevice, FeatureSettings, collect_features
from das_lightning.attribution.store import FeatureStore
from das_lightning.data import ImageDataset, ModelSpaceDataset, content_entry
from das_lightning.distributed import is_global_zero
from das_lightning.manifest import (
    atomic_write_text,
    hash_array,
    hash_file,
    read_manifest,
    write_manifest,
)
from das_lightning.models.adapters import MeasuredModel, dataset_extra
from das_lightning.viz import attribution_grid, log_images_to_wandb, log_table

log = logging.getLogger(__name__)

SCORES_FILE = "scores.npy"


@dataclass
class MethodSettings:
    """One attribution method (conf/method/*.yaml)."""

    name: str = "das"
    kind: str = "das"  # scorer: das trak dtrak relatif renorm grad_cos pixel clip tracin journey_trak
    features: FeatureSettings | None = field(default_factory=FeatureSettings)
    lambdas: list[float] = field(default_factory=scoring.default_lambda_grid)
    picture_lambda: float | None = None  # None: the grid value nearest the mean squared train-feature norm
    leverage: bool = True  # DAS: 1 / (1 - h_ii)
    square: bool = True  # DAS: squared change of the output
    residual: bool = True  # DAS: r_i weighting
    residual_timesteps: int = 50  # DAS residual: per-timestep losses on a uniform grid of this many timesteps
    similarity: str = "cosine"  # pixel / clip / grad_cos: dot or cosine
    clip_model: str = "openai/clip-vit-base-patch32"
    journey_steps: int = 10  # journey_trak: denoising steps attributed (evenly spaced along the trajectory)
    screen_by: str | None = None  # candidate screening by a cheap similarity: pixel | clip | None
    screen_top: int = 1000
    top_k: int = 8
    num_grid_queries: int = 8
    block_size: int = 1024


@dataclass
class AttributionInputs:
    """A trained model and the images to attribute, as the attribute stage sees them.

    The sets stay images (for pictures and pixel baselines); the network sees ``model.model_space(set)`` (latents of
    a latent model) and ``model.extra_inputs(batch)`` (conditioning), see :mod:`das_lightning.models.adapters`.
    """

    model: MeasuredModel
    train_set: ImageDataset
    query_sets: dict[str, ImageDataset]
    features_dir: Path
    scores_dir: Path
    snapshots: list[tuple[Path, float]] = field(default_factory=list)  # (weights file, lr) for TracIn
    journey: dict[str, list[tuple[int, torch.Tensor]]] = field(default_factory=dict)  # set -> [(t, x0_hat)]


def _images(dataset: ImageDataset) -> torch.Tensor:
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


def _feature_store(
    inputs: AttributionInputs,
    settings: FeatureSettings,
    dataset: ImageDataset,
    key: str,
    device: CollectionDevice,
    logger: Any,
    unet: torch.nn.Module | None = None,
    checkpoint_file: Path | None = None,
) -> FeatureStore:
    checkpoint = Path(checkpoint_file or inputs.model.weights_file)
    store = collect_features(
        unet or inputs.model.network,
        inputs.model.alphas_cumprod,
        inputs.model.model_space(dataset),
        hash_file(checkpoint),
        inputs.features_dir / settings.name / key,
        settings,
        device,
        logger,
        extra_inputs=inputs.model.extra_inputs,
    )
    return store.require_complete()


def _picture_lambda(method: MethodSettings, train_features: np.ndarray | None) -> float:
    if not method.lambdas:
        return 0.0
    if method.picture_lambda is not None:
        return float(method.picture_lambda)
    squared = float(
        np.mean(
            [
                np.sum(np.asarray(row, dtype=np.float64) ** 2)
                for row in train_features[: min(len(train_features), 2048)]
            ]
        )
    )
    return float(min(method.lambdas, key=lambda lam: abs(np.log(lam) - np.log(max(squared, 1e-12)))))


def das_residuals(
    inputs: AttributionInputs, method: MethodSettings, e_seed: int, device: torch.device | None = None
) -> np.ndarray:
    """r_i from each training image's per-timestep loss under the shared noise rule (METHOD.md §2)."""
    from das_lightning.evaluation.ground_truth import query_losses

    model = inputs.model
    train_set = model.model_space(inputs.train_set)
    images = _images(train_set)
    indices = list(range(len(train_set)))
    extra = dataset_extra(model.extra_inputs, train_set)
    step = max(1, 1000 // method.residual_timesteps)
    home = next(model.network.parameters()).device
    device = device or home
    model.network.to(device)
    per_timestep = [
        query_losses(
            model.network,
            model.alphas_cumprod,
            images,
            indices,
            train_set.set_name,
            [t],
            [e_seed],
            batch_size=512,
            device=device,
            extra=extra,
        )
        for t in range(0, 1000, step)
    ]
    model.network.to(home)
    return scoring.residual_weights(torch.stack(per_timestep, dim=1))


def clip_embeddings(dataset: ImageDataset, model_name: str) -> np.ndarray:
    """CLIP image embeddings from a model in the local Hugging Face cache (never downloaded here)."""
    return clip_image_embeddings(_images(dataset), model_name)


def clip_image_embeddings(images: torch.Tensor, model_name: str) -> np.ndarray:
    """CLIP embeddings of images (B, C, H, W) in [-1, 1]; grey images are repeated over three channels."""
    model, processor = load_local_clip(model_name)
    pixels = ((images + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    if pixels.shape[1] == 1:
        pixels = pixels.repeat(1, 3, 1, 1)
    embeddings = []
    with torch.no_grad():
        for start in range(0, len(pixels), 64):
            batch = [image.permute(1, 2, 0).numpy() for image in pixels[start : start + 64]]
            pixel_values = processor(images=batch, return_tensors="pt")["pixel_values"]
            embeddings.append(model.get_image_features(pixel_values=pixel_values).float())
    return torch.cat(embeddings).numpy()


def load_local_clip(model_name: str):
    """(CLIPModel, CLIPProcessor) from the local cache, or one clear error saying how to get them."""
    try:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(model_name, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(model_name, local_files_only=True)
    except (OSError, ImportError, ValueError) as error:
        raise FileNotFoundError(
            f"method=clip needs the CLIP model {model_name!r} in the local Hugging Face cache and it is not there "
            f"({type(error).__name__}). When online, fetch it once with `huggingface-cli download {model_name}` "
            "(and `pip install transformers`), or set method.clip_model=/path/to/a/local/clip/folder."
        ) from error
    return model.eval(), processor


def _flat_pixels(dataset: ImageDataset) -> np.ndarray:
    return _images(dataset).flatten(1).numpy()


# -- the method table -------------------------------------------------------------------------------------------
# Each entry computes {lambda: scores (queries x train)} for one query set. Kernel methods share one solver per
# feature set, so the O(k^3) factorisation is done once for every query set and lambda.

ScoreFunction = Callable[["_Context", str], dict[float, np.ndarray]]


@dataclass
class _Context:
    inputs: AttributionInputs
    method: MethodSettings
    device: CollectionDevice
    logger: Any
    cache: dict[str, Any] = field(default_factory=dict)

    def train_store(self) -> FeatureStore:
        if "train" not in self.cache:
            self.cache["train"] = _feature_store(
                self.inputs, self.method.features, self.inputs.train_set, "train", self.device, self.logger
            )
        return self.cache["train"]

    def query_store(self, query_set: str) -> FeatureStore:
        return _feature_store(
            self.inputs,
            self.method.features,
            self.inputs.query_sets[query_set],
            query_set,
            self.device,
            self.logger,
        )

    def solver(self, normalized: bool = False) -> scoring.KernelSolver:
        key = "solver-normalized" if normalized else "solver"
        if key not in self.cache:
            train = self.train_store().features
            self.cache[key] = scoring.KernelSolver.from_features(
                scoring.normalized_rows(train) if normalized else train, self.method.block_size
            )
        return self.cache[key]


def _mask(context: _Context, query_set: str) -> np.ndarray | None:
    method = context.method
    if method.screen_by is None:
        return None
    if method.screen_by == "pixel":
        cheap = scoring.cosine_scores(
            _flat_pixels(context.inputs.query_sets[query_set]), _flat_pixels(context.inputs.train_set)
        )
    elif method.screen_by == "clip":
        cheap = scoring.cosine_scores(
            clip_embeddings(context.inputs.query_sets[query_set], method.clip_model),
            clip_embeddings(context.inputs.train_set, method.clip_model),
        )
    else:
        raise ValueError(f"method.screen_by must be pixel, clip or null, not {method.screen_by!r}")
    return scoring.screen_candidates(cheap, method.screen_top)


def _kernel_scores(context: _Context, query_set: str) -> dict[float, np.ndarray]:
    method = context.method
    options: dict[str, Any] = {}
    if method.kind == "das":
        options = {"leverage": method.leverage, "square": method.square}
        if method.residual:
            if "residuals" not in context.cache:
                context.cache["residuals"] = das_residuals(
                    context.inputs, method, method.features.e_seed, context.device.torch_device()
                )
            options["residuals"] = context.cache["residuals"]
    train = context.train_store().features
    queries = context.query_store(query_set).features
    return scoring.scores_for_lambdas(
        method.kind,
        queries,
        train,
        method.lambdas,
        solver=context.solver(method.kind == "renorm"),
        mask=_mask(context, query_set),
        block_size=method.block_size,
        **options,
    )


def _similarity(method: MethodSettings) -> Callable[..., np.ndarray]:
    table = {"dot": scoring.dot_scores, "cosine": scoring.cosine_scores}
    if method.similarity not in table:
        raise ValueError(f"method.similarity must be dot or cosine, not {method.similarity!r}")
    return table[method.similarity]


def _grad_similarity_scores(context: _Context, query_set: str) -> dict[float, np.ndarray]:
    scorer = _similarity(context.method)
    train = context.train_store().features
    queries = context.query_store(query_set).features
    return {0.0: scorer(queries, train, mask=_mask(context, query_set), block_size=context.method.block_size)}


def _pixel_scores(context: _Context, query_set: str) -> dict[float, np.ndarray]:
    scorer = _similarity(context.method)
    return {
        0.0: scorer(
            _flat_pixels(context.inputs.query_sets[query_set]), _flat_pixels(context.inputs.train_set)
        )
    }


def _clip_scores(context: _Context, query_set: str) -> dict[float, np.ndarray]:
    scorer = _similarity(context.method)
    name = context.method.clip_model
    if "clip-train" not in context.cache:
        context.cache["clip-train"] = clip_embeddings(context.inputs.train_set, name)
    return {
        0.0: scorer(clip_embeddings(context.inputs.query_sets[query_set], name), context.cache["clip-train"])
    }


def _tracin_scores(context: _Context, query_set: str) -> dict[float, np.ndarray]:
    inputs, method = context.inputs, context.method
    if not inputs.snapshots:
        raise FileNotFoundError(
            "method=tracin needs weights saved during training: retrain with train.snapshot_every_n_steps=N (>0)"
        )
    terms = []
    for weights_file, lr in inputs.snapshots:
        unet = _copy_with_weights(inputs.model.network, load_file(str(weights_file)))
        settings = FeatureSettings(
            **{**asdict(method.features), "name": f"{method.features.name}-{weights_file.parent.name}"}
        )
        train = _feature_store(
            inputs, settings, inputs.train_set, "train", context.device, context.logger, unet, weights_file
        )
        queries = _feature_store(
            inputs,
            settings,
            inputs.query_sets[query_set],
            query_set,
            context.device,
            context.logger,
            unet,
            weights_file,
        )
        terms.append((lr, queries.features, train.features))
    return {0.0: scoring.tracin_scores(terms, block_size=method.block_size)}


def _copy_with_weights(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``unet`` with a snapshot's weights (all of them, or a LoRA run's adapters); every snapshot
    tensor must land on a parameter of the UNet."""
    clone = copy.deepcopy(unet)
    result = clone.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"snapshot weights do not fit the model: unexpected {result.unexpected_keys[:5]}")
    return clone


def _journey_scores(context: _Context, query_set: str) -> dict[float, np.ndarray]:
    inputs, method = context.inputs, context.method
    if query_set not in inputs.journey:
        raise ValueError(
            f"journey_trak attributes generated queries along their trajectory; {query_set!r} has none"
        )
    steps = []
    for timestep, predicted_clean in inputs.journey[query_set]:
        settings = FeatureSettings(
            **{
                **asdict(method.features),
                "timestep_strategy": "explicit",
                "timesteps": [int(timestep)],
                "name": f"{method.features.name}",
            }
        )
        dataset = inputs.query_sets[query_set]
        # already in the network's space (pixels, or latents of a latent model): no encoding on the way in
        state = ModelSpaceDataset(
            f"{dataset.set_name}:journey-t{timestep}", predicted_clean, dataset.labels, dataset.class_names
        )
        state.content_id = dataset.content_id  # replayed from exactly these generated images
        steps.append(
            _feature_store(
                inputs, settings, state, f"{query_set}-journey-t{timestep}", context.device, context.logger
            ).features
        )
    train = context.train_store().features
    return scoring.scores_for_lambdas(
        "journey_trak",
        np.stack([np.asarray(s) for s in steps]),
        train,
        method.lambdas,
        solver=context.solver(),
        block_size=method.block_size,
    )


METHOD_KINDS: dict[str, ScoreFunction] = {
    **{kind: _kernel_scores for kind in ("das", "trak", "dtrak", "relatif", "renorm")},
    "grad_cos": _grad_similarity_scores,
    "pixel": _pixel_scores,
    "clip": _clip_scores,
    "tracin": _tracin_scores,
    "journey_trak": _journey_scores,
}
NEEDS_FEATURES = {"das", "trak", "dtrak", "relatif", "renorm", "grad_cos", "tracin", "journey_trak"}


@dataclass
class AttributionResult:
    method: str
    folders: dict[str, Path]
    picture_lambda: float


def attribute(
    inputs: AttributionInputs,
    method: MethodSettings,
    device: CollectionDevice = CollectionDevice(),
    logger: Any = None,
) -> AttributionResult:
    """Scores of ``method`` for each query set against the training set, with top-k lists and grids.

    Under DDP every rank runs this: feature collection is collective, so each rank takes part in every set's
    collection, and only global rank zero writes the score folders (the others return the same folder paths)."""
    if method.kind not in METHOD_KINDS:
        raise ValueError(f"unknown method kind {method.kind!r}; choose one of {sorted(METHOD_KINDS)}")
    if method.kind in NEEDS_FEATURES and method.features is None:
        raise ValueError(f"method {method.name!r} ({method.kind}) needs a features section")
    if method.kind == "clip" or method.screen_by == "clip":
        load_local_clip(method.clip_model)  # fail before anything is written
    context = _Context(inputs, method, device, logger)
    folders: dict[str, Path] = {}
    picture_lambda = 0.0
    for query_set, queries in inputs.query_sets.items():
        by_lambda = METHOD_KINDS[method.kind](context, query_set)
        lambdas = sorted(by_lambda)
        stacked = np.stack([by_lambda[lam] for lam in lambdas]).astype(
            np.float32
        )  # lambdas x queries x train
        if not np.all(np.isfinite(stacked)):
            raise FloatingPointError(f"{method.name}: non-finite scores for {query_set}; check the features")
        train_features = context.cache["train"].features if "train" in context.cache else None
        picture_lambda = _picture_lambda(method, train_features) if len(lambdas) > 1 else lambdas[0]
        folder = inputs.scores_dir / method.name / query_set
        folders[query_set] = folder
        if is_global_zero():
            _write_scores(folder, stacked, lambdas, picture_lambda, method, inputs, queries)
            _log_pictures(folder, logger, method.name, query_set)
    return AttributionResult(method.name, folders, picture_lambda)


def score_manifest(
    method: MethodSettings, inputs: AttributionInputs, queries: ImageDataset, lambdas: list[float]
) -> dict[str, Any]:
    """What a score matrix was made from; evaluate_lds refuses scores for another train set or query list."""
    settings = asdict(method)
    for key in ("picture_lambda", "top_k", "num_grid_queries", "block_size"):
        settings.pop(key)
    return {
        "method": settings,
        "lambdas": lambdas,
        "checkpoint": hash_file(inputs.model.weights_file),
        "train_set": inputs.train_set.set_name,
        "num_train": len(inputs.train_set),
        "query_set": queries.set_name,
        "num_queries": len(queries),
        "queries_hash": hash_array(queries.labels),
        **content_entry(queries),
    }


def _write_scores(
    folder: Path,
    stacked: np.ndarray,
    lambdas: list[float],
    picture_lambda: float,
    method: MethodSettings,
    inputs: AttributionInputs,
    queries: ImageDataset,
) -> None:
    manifest = score_manifest(method, inputs, queries, lambdas)
    folder.mkdir(parents=True, exist_ok=True)
    write_manifest(folder, {**manifest, "complete": False})
    tmp = folder / f"{SCORES_FILE}.tmp"
    with open(tmp, "wb") as handle:
        np.save(handle, stacked)
    tmp.replace(folder / SCORES_FILE)
    chosen = stacked[lambdas.index(picture_lambda)] if picture_lambda in lambdas else stacked[0]
    top = scoring.topk(chosen, method.top_k)
    atomic_write_text(folder / "topk.json", json.dumps({"lambda": picture_lambda, **top}))
    shown = min(method.num_grid_queries, len(queries))
    grid = attribution_grid(
        torch.stack([queries[i]["image"] for i in range(shown)]) if shown else torch.zeros(0),
        lambda idx: torch.stack([inputs.train_set[int(i)]["image"] for i in idx]),
        top["proponent_indices"][:shown],
        opponent_indices=top["opponent_indices"][:shown],
    )
    grid.save(folder / "grid.png")
    write_manifest(folder, {**manifest, "complete": True})


def _log_pictures(folder: Path, logger: Any, method: str, query_set: str) -> None:
    with Image.open(folder / "grid.png") as grid:
        log_images_to_wandb(
            logger,
            f"attribution/{method}/{query_set}",
            grid.copy(),
            caption="each row: query | top proponents | top opponents",
        )
    top = json.loads((folder / "topk.json").read_text())
    rows = [
        [q, json.dumps(p[:5]), json.dumps(o[:5])]
        for q, (p, o) in enumerate(zip(top["proponent_indices"], top["opponent_indices"], strict=True))
    ]
    log_table(
        logger, f"attribution/{method}/{query_set}/topk", ["query", "proponents", "opponents"], rows[:100]
    )


def load_scores(folder: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """(lambdas x queries x train scores, manifest) of a finished score folder."""
    manifest = read_manifest(folder)
    if manifest is None or not manifest.get("complete"):
        raise FileNotFoundError(f"no finished scores at {folder}: run `python attribute.py method=...` first")
    return np.load(folder / SCORES_FILE, mmap_mode="r"), manifest
