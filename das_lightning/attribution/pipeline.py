"""The attribution stage: features (cached in stores) -> scores for every query against every training image
-> top-k lists and pictures. One function per concern; method differences live in a small table, not in branches.

Outputs, under ``<run>/scores/<method>/<query set>/``:
    scores.npy     lambdas x queries x train (float32), one row per c of ``method.lambda_scales`` (lambda = c x unit,
                   see :mod:`das_lightning.lambdas`); methods without lambda have one row
    manifest.json  the feature manifests' keys, method settings, c grid, unit and lambdas, query list identity,
                   and the c chosen for pictures with its source
    topk.json      top proponents/opponents per query at the chosen c (the LDS's held-out selection if any)
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
from das_lightning.file_queries import FileQueryDataset
from das_lightning.lambdas import DEFAULT_LAMBDA_SCALE, ChosenScale, choose_scale, default_scale_grid
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
from das_lightning.models.adapters import MeasuredModel, dataset_extra
from das_lightning.report import write_report
from das_lightning.viz import attribution_grid, log_images_to_wandb, log_table

log = logging.getLogger(__name__)

SCORES_FILE = "scores.npy"


@dataclass
class MethodSettings:
    """One attribution method (conf/method/*.yaml)."""

    name: str = "das"
    kind: str = "das"  # scorer: das trak dtrak relatif renorm grad_cos pixel clip tracin journey_trak
    features: FeatureSettings | None = field(default_factory=FeatureSettings)
    # kernel methods: lambda = c * trace(K) / N for every c of the grid (das_lightning/lambdas.py); [] = no lambda
    lambda_scales: list[float] | None = field(default_factory=default_scale_grid)  # None: the default grid
    lambda_scale: float = DEFAULT_LAMBDA_SCALE  # c for pictures and top-k until an LDS has selected one
    leverage: bool = True  # DAS: 1 / (1 - h_ii)
    square: bool = True  # DAS: squared change of the output
    residual: str = "normalized"  # DAS: none | normalized (authors' r_i) | magnitude | exact (see RESIDUALS)
    residual_timesteps: int = 50  # DAS residual: per-timestep losses on a uniform grid of this many timesteps
    similarity: str = "cosine"  # pixel / clip / grad_cos: dot or cosine
    clip_model: str = "openai/clip-vit-base-patch32"
    journey_steps: int = 10  # journey_trak: denoising steps attributed (evenly spaced along the trajectory)
    screen_by: str | None = None  # candidate screening by a cheap similarity: pixel | clip | None
    screen_top: int = 1000
    top_k: int = 8
    num_grid_queries: int = 8
    block_size: int = 1024

    def __post_init__(self) -> None:
        if isinstance(self.residual, bool):  # residual: true/false in older configs
            self.residual = "normalized" if self.residual else "none"
        if self.lambda_scales is None:
            self.lambda_scales = default_scale_grid()

    def validate(self) -> None:
        """Refuse bad settings before any feature is computed."""
        if self.residual not in RESIDUALS:
            raise ValueError(f"method.residual must be one of {sorted(RESIDUALS)}, not {self.residual!r}")
        if self.kind == "das" and self.residual == "exact" and not self.leverage:
            raise ValueError(
                "method.residual=exact is the exact leave-one-out: it needs method.leverage=true"
            )
        if any(float(c) <= 0 for c in self.lambda_scales):
            raise ValueError(
                f"method.lambda_scales must be positive multiples of the unit, got {self.lambda_scales}"
            )
        if self.lambda_scale <= 0:
            raise ValueError(f"method.lambda_scale must be positive, got {self.lambda_scale}")
        if self.screen_by not in {None, "pixel", "clip"}:
            raise ValueError(f"method.screen_by must be pixel, clip or null, not {self.screen_by!r}")
        if self.similarity not in {"dot", "cosine"}:
            raise ValueError(f"method.similarity must be dot or cosine, not {self.similarity!r}")


# DAS residual variants (METHOD.md §2 and the README's LDS section)
RESIDUALS = {
    "none": "r_i = 1",
    "normalized": "the authors' r_i: sqrt of the per-timestep loss, unit-normalised over t, averaged over t",
    "magnitude": "r_i = sqrt(mean_t L_t(x_i)) relative to its mean over the training images",
    "exact": "Sherman-Morrison with psi_i, the projected gradient of x_i's own training loss",
}


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
    lds_file: Path | None = None  # lds.json of this model: its held-out lambda selection feeds the pictures


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


def das_residual_losses(
    inputs: AttributionInputs, method: MethodSettings, e_seed: int, device: torch.device | None = None
) -> torch.Tensor:
    """Each training image's per-timestep loss (N x T) under the shared noise rule, on a uniform grid of
    ``method.residual_timesteps`` timesteps: what the normalized and magnitude residuals are made of."""
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
    return torch.stack(per_timestep, dim=1)


RESIDUAL_WEIGHTS = {"normalized": scoring.residual_weights, "magnitude": scoring.magnitude_residuals}


def psi_settings(features: FeatureSettings) -> FeatureSettings:
    """The features of each train sample's own loss (residual=exact): TRAK's loss gradient with the same
    timesteps, noise rule and projector as ``features``, without per-timestep normalisation (a true gradient)."""
    return FeatureSettings(
        **{
            **asdict(features),
            "name": f"{features.name}-psi",
            "output_function": "loss",
            "normalize_per_timestep": False,
        }
    )


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

ScoreFunction = Callable[["_Context", str], dict[float | None, np.ndarray]]


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
        dataset = self.inputs.query_sets[query_set]
        # file queries: one store per content, so a changed file is featurised afresh, never matched to old rows
        key = f"{query_set}-{dataset.content_id}" if isinstance(dataset, FileQueryDataset) else query_set
        return _feature_store(self.inputs, self.method.features, dataset, key, self.device, self.logger)

    def train_psi(self) -> FeatureStore:
        if "psi" not in self.cache:
            self.cache["psi"] = _feature_store(
                self.inputs,
                psi_settings(self.method.features),
                self.inputs.train_set,
                "train",
                self.device,
                self.logger,
            )
        return self.cache["psi"]

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


def _by_scale(
    context: _Context, solver: scoring.KernelSolver, score: Callable[[list[float]], dict[float, np.ndarray]]
) -> dict[float, np.ndarray]:
    """{c: scores} from a kernel scorer called with the absolute lambdas c * unit of the grid."""
    unit = solver.lambda_unit
    context.cache["lambda_unit"] = unit
    context.cache["spectrum"] = solver.relative_spectrum()
    scales = [float(c) for c in context.method.lambda_scales]
    by_lambda = score([c * unit for c in scales])
    return {c: by_lambda[c * unit] for c in scales}


def _kernel_scores(context: _Context, query_set: str) -> dict[float, np.ndarray]:
    method = context.method
    options: dict[str, Any] = {}
    if method.kind == "das":
        options = {"leverage": method.leverage, "square": method.square}
        if method.residual == "exact":
            options["train_psi"] = _Negated(context.train_psi().features)  # psi_i = minus the loss gradient
        elif method.residual != "none":
            if "residual_losses" not in context.cache:
                context.cache["residual_losses"] = das_residual_losses(
                    context.inputs, method, method.features.e_seed, context.device.torch_device()
                )
            options["residuals"] = RESIDUAL_WEIGHTS[method.residual](context.cache["residual_losses"])
    train = context.train_store().features
    queries = context.query_store(query_set).features
    solver = context.solver(method.kind == "renorm")
    return _by_scale(
        context,
        solver,
        lambda lambdas: scoring.scores_for_lambdas(
            method.kind,
            queries,
            train,
            lambdas,
            solver=solver,
            mask=_mask(context, query_set),
            block_size=method.block_size,
            **options,
        ),
    )


class _Negated:
    """A row view of features with every row negated (psi_i is minus the gradient of x_i's own loss)."""

    def __init__(self, features: Any):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return -np.asarray(self.features[rows], dtype=np.float64)


def _similarity(method: MethodSettings) -> Callable[..., np.ndarray]:
    table = {"dot": scoring.dot_scores, "cosine": scoring.cosine_scores}
    if method.similarity not in table:
        raise ValueError(f"method.similarity must be dot or cosine, not {method.similarity!r}")
    return table[method.similarity]


def _grad_similarity_scores(context: _Context, query_set: str) -> dict[float, np.ndarray]:
    scorer = _similarity(context.method)
    train = context.train_store().features
    queries = context.query_store(query_set).features
    return {
        None: scorer(queries, train, mask=_mask(context, query_set), block_size=context.method.block_size)
    }


def _pixel_scores(context: _Context, query_set: str) -> dict[float, np.ndarray]:
    scorer = _similarity(context.method)
    return {
        None: scorer(
            _flat_pixels(context.inputs.query_sets[query_set]), _flat_pixels(context.inputs.train_set)
        )
    }


def _clip_scores(context: _Context, query_set: str) -> dict[float, np.ndarray]:
    scorer = _similarity(context.method)
    name = context.method.clip_model
    if "clip-train" not in context.cache:
        context.cache["clip-train"] = clip_embeddings(context.inputs.train_set, name)
    return {
        None: scorer(clip_embeddings(context.inputs.query_sets[query_set], name), context.cache["clip-train"])
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
    return {None: scoring.tracin_scores(terms, block_size=method.block_size)}


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
    solver = context.solver()
    return _by_scale(
        context,
        solver,
        lambda lambdas: scoring.scores_for_lambdas(
            "journey_trak",
            np.stack([np.asarray(s) for s in steps]),
            train,
            lambdas,
            solver=solver,
            block_size=method.block_size,
        ),
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
    chosen: dict[
        str, ChosenScale | None
    ]  # per query set: the c of the pictures and its source (None: no lambda)


def attribute(
    inputs: AttributionInputs,
    method: MethodSettings,
    device: CollectionDevice = CollectionDevice(),
    logger: Any = None,
) -> AttributionResult:
    """Scores of ``method`` for each query set against the training set, with top-k lists and grids.

    Under DDP every rank runs this: feature collection is collective, so each rank takes part in every set's
    collection, and only global rank zero writes the score folders (the others return the same folder paths)."""
    validate_method(method)
    if method.kind == "clip" or method.screen_by == "clip":
        load_local_clip(method.clip_model)  # fail before anything is written
    context = _Context(inputs, method, device, logger)
    folders: dict[str, Path] = {}
    chosen: dict[str, ChosenScale | None] = {}
    for query_set, queries in inputs.query_sets.items():
        by_scale = METHOD_KINDS[method.kind](context, query_set)
        scales = sorted(by_scale, key=lambda c: -1.0 if c is None else c)
        stacked = np.stack([by_scale[c] for c in scales]).astype(np.float32)  # lambdas x queries x train
        if not np.all(np.isfinite(stacked)):
            raise FloatingPointError(f"{method.name}: non-finite scores for {query_set}; check the features")
        has_lambda = scales != [None]
        chosen[query_set] = (
            choose_scale(inputs.lds_file, method.name, query_set, method.lambda_scale) if has_lambda else None
        )
        if chosen[query_set] is not None and chosen[query_set].scale not in by_scale:
            raise ValueError(
                f"lambda scale c = {chosen[query_set].scale:g} ({chosen[query_set].source}) is not on the grid "
                f"method.lambda_scales; add it or set method.lambda_scale to a grid value"
            )
        lambda_info = (
            {
                "lambda_scales": scales,
                "lambda_unit": context.cache["lambda_unit"],
                "lambdas": [c * context.cache["lambda_unit"] for c in scales],
                "spectrum_relative": list(context.cache["spectrum"]),
            }
            if has_lambda
            else {"lambda_scales": None, "lambda_unit": None, "lambdas": None}
        )
        folder = inputs.scores_dir / method.name / query_set
        folders[query_set] = folder
        if is_global_zero():
            _write_scores(folder, stacked, lambda_info, chosen[query_set], method, inputs, queries)
            _log_pictures(folder, logger, method.name, query_set)
    return AttributionResult(method.name, folders, chosen)


def validate_method(method: MethodSettings) -> None:
    """Every check of a method's settings, before any work (the CLI calls it before loading the model)."""
    if method.kind not in METHOD_KINDS:
        raise ValueError(f"unknown method kind {method.kind!r}; choose one of {sorted(METHOD_KINDS)}")
    if method.kind in NEEDS_FEATURES and method.features is None:
        raise ValueError(f"method {method.name!r} ({method.kind}) needs a features section")
    method.validate()


def score_manifest(
    method: MethodSettings, inputs: AttributionInputs, queries: ImageDataset, lambda_info: dict[str, Any]
) -> dict[str, Any]:
    """What a score matrix was made from; evaluate_lds refuses scores for another train set or query list."""
    settings = asdict(method)
    for key in ("lambda_scale", "top_k", "num_grid_queries", "block_size"):
        settings.pop(key)
    return {
        "method": settings,
        **lambda_info,
        "checkpoint": hash_file(inputs.model.weights_file),
        "train_set": inputs.train_set.set_name,
        "num_train": len(inputs.train_set),
        "query_set": queries.set_name,
        "num_queries": len(queries),
        "queries_hash": hash_array(queries.labels),
        **content_entry(queries),
    }


def scores_at(stacked: np.ndarray, manifest: dict[str, Any], scale: float | None) -> np.ndarray:
    """The queries x train scores of a score folder at lambda scale c (the only row when it has no lambda)."""
    scales = manifest.get("lambda_scales")
    if not scales:
        return np.asarray(stacked[0])
    if scale not in scales:
        raise ValueError(f"lambda scale c = {scale} is not among the stored c values {scales}")
    return np.asarray(stacked[scales.index(scale)])


def _write_scores(
    folder: Path,
    stacked: np.ndarray,
    lambda_info: dict[str, Any],
    chosen: ChosenScale | None,
    method: MethodSettings,
    inputs: AttributionInputs,
    queries: ImageDataset,
) -> None:
    manifest = score_manifest(method, inputs, queries, lambda_info)
    picture = None if chosen is None else chosen.describe(lambda_info["lambda_unit"])
    folder.mkdir(parents=True, exist_ok=True)
    write_manifest(folder, {**manifest, "picture": picture, "complete": False})
    atomic_save(folder / SCORES_FILE, lambda tmp: np.save(tmp, stacked))
    top = scoring.topk(scores_at(stacked, manifest, None if chosen is None else chosen.scale), method.top_k)
    names = {"query_names": queries.file_names} if isinstance(queries, FileQueryDataset) else {}
    atomic_write_text(folder / "topk.json", json.dumps({"picture": picture, **names, **top}))
    headers = _headers(method)
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


def _headers(method: MethodSettings) -> tuple[str, str, str]:
    """Column titles: a squared score ranks by the size of a change, not its sign."""
    if method.kind == "das" and method.square:
        return ("query", "largest change", "smallest change")
    return ("query", "proponents", "opponents")


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
    verify_file(
        folder / SCORES_FILE,
        (manifest.get(FILES_KEY) or {}).get(SCORES_FILE),
        "rerun `python attribute.py` with the same method to recompute the scores",
    )
    return np.load(folder / SCORES_FILE, mmap_mode="r"), manifest
