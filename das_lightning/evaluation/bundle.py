"""LDS bundles (issue 19): everything an LDS needs besides the method, in one folder, and scores from anywhere
evaluated against it without a model, a training run or a ground-truth measurement.

A bundle folder::

    manifest.json            kind, format, the noise rule's and seed rule's versions, size + checksum of every file
    bundle.json              the model's checksum and run, the training set's identity (registry options, classes,
                             N, labels and an image checksum in index order), the query sets (validation indices,
                             sampler settings of generated images), every subset's index list and weight checksums,
                             the protocol (alpha, M, seeds, timesteps, e_seeds, the ground truth's noise stream
                             ``noise``, coupled when absent; held-out split), the recorded methods
    model/unet/              copy of the sealed full model folder (weights, config, DONE with its own checksums)
    model/run_manifest.json  the full run's manifest and config (its recipe)
    model/run_config.json
    train/images.npy         the training images, uint8 train x channels x height x width, row i = training index i
                             (column i of the masks and of every score matrix); their checksum is images_blake2b
    queries/<set>/0000.png   every query image, as the project sees it (uint8, lossless)
    ground_truth/<set>.npy   seeds x subsets x queries: each subset model's loss on each query (float64, as cached)
    predictions/<set>.npz    per recorded method, (2, subsets, queries): g = masks @ scores^T at its held-out and
                             oracle c
    lds.json                 the recorded LDS records and paired differences (lds.json's own format)
    README.md                for a reader outside the project: the files, the score format, shape, sign, query
                             order and pixel convention (:func:`bundle_readme`)

Why predictions and not score matrices for the recorded methods: the LDS sees a score matrix only through
g_k(q) = sum_{i in S_k} tau(q, i) (lds.py), so g (subsets x queries) is all a paired difference or a recomputed
record needs, at M x Q numbers instead of Q x N (64 x 64 against 64 x 12000 for fashion2). Float64, as computed.

Why float64 ground truth: the caches hold float64 losses, and the LDS is a rank statistic; a float32 copy can swap
two subset models whose losses agree to seven digits, and the bundle's table would no longer be the run's. The
array is R x M x Q (e.g. 3 x 64 x 128 x 8 bytes = 197 KB). The caches keep each model's loss averaged over the
timestep grid and e_seeds, so that is what the bundle holds; per-timestep losses are not cached anywhere.

Why the training images are in the bundle (500 x 16 x 16 uint8 = 128 KB for fashion2): rebuilding them takes the
registry's stratified sampling and area resize, so a reader with numpy alone could not line up a score's columns
with the masks' without them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from das_lightning.artifacts import generated_manifest, require_finished
from das_lightning.attribution.context import AttributionInputs
from das_lightning.attribution.features import CollectionDevice
from das_lightning.attribution.methods import build_method
from das_lightning.attribution.pipeline import load_scores, scores_by_scale
from das_lightning.attribution.settings import MethodSettings
from das_lightning.data import (
    ImageDataset,
    TensorImageDataset,
    build_dataset,
    dataset_identity,
)
from das_lightning.diffusion import LEGACY_GROUND_TRUTH_NOISE, noise_seed, rule_noise
from das_lightning.errors import ConfigError, MissingArtifactError, NumericalError
from das_lightning.evaluation.intervals import check_subset_count
from das_lightning.evaluation.lambda_selection import (
    heldout_halves,
    seed_subset_rows,
    subset_rows,
)
from das_lightning.evaluation.lds import Lambda, predictions
from das_lightning.evaluation.lds_report import (
    LDSRecord,
    PairedDifference,
    SharedFactorRecord,
    evaluate_method,
    markdown_table,
    paired_difference,
    shared_factor_records,
)
from das_lightning.evaluation.pipeline import (
    LDSReport,
    LDSSettings,
    method_scores,
    model_losses,
    subset_models,
)
from das_lightning.evaluation.snr_lds import DEFAULT_SNR_RULE
from das_lightning.manifest import (
    FILES_KEY,
    MANIFEST_NAME,
    CorruptArtifactError,
    ManifestMismatchError,
    atomic_folder,
    atomic_save,
    atomic_write_text,
    file_record,
    hash_file,
    manifest_differences,
    read_json,
    read_manifest,
    write_manifest,
)
from das_lightning.models.adapters import ModelAdapter
from das_lightning.paths import RunPaths
from das_lightning.queries import validation_indices
from das_lightning.selection import write_lds_json
from das_lightning.training import SEED_RULE

BUNDLE_KIND = "lds_bundle"
BUNDLE_FORMAT = 1
BUNDLE_FILE = "bundle.json"
LDS_FILE = "lds.json"
UNET_FOLDER = "model/unet"
TRAIN_IMAGES_FILE = "train/images.npy"
README_FILE = "README.md"
TRAIN_IMAGES_AXES = (
    "train x channels x height x width, uint8 0-255; the models saw pixels / 127.5 - 1, in [-1, 1]"
)
SELECTIONS = ("heldout", "oracle")  # rows of each predictions array
LAMBDAS_KEY = "lambdas"  # in a scores .npz: the c of each row of every lambdas x queries x train array


def noise_rule_version() -> str:
    """The noise rule's version, read off the code: a checksum of noise it draws for fixed keys. The ground truth
    was measured with this noise, so a bundle made under another rule no longer matches features computed here."""
    probe = rule_noise("lds-bundle-probe", [0, 7], [0, 999], 1, (4,))
    digest = hashlib.blake2b(probe.numpy().tobytes(), digest_size=8)
    digest.update(str(noise_seed("lds-bundle-probe", 3, 500, 2)).encode())
    return f"noise-{digest.hexdigest()}"


def bundle_rules() -> dict[str, Any]:
    """What a bundle must agree with to be loaded here (recorded in its manifest)."""
    return {
        "kind": BUNDLE_KIND,
        "format": BUNDLE_FORMAT,
        "noise_rule": noise_rule_version(),
        "seed_rule": SEED_RULE,
    }


# ----------------------------------------------------------------------------------------------------- export


def export_bundle(
    target: Path,
    paths: RunPaths,
    train_set: ImageDataset,
    query_sets: Mapping[str, ImageDataset],
    settings: LDSSettings,
    report: LDSReport,
    dataset_options: Mapping[str, Any],
    test_set: ImageDataset | None = None,
    device: CollectionDevice = CollectionDevice(),
    adapter: ModelAdapter | None = None,
) -> Path:
    """Write the bundle of a finished LDS run (``report``, from :func:`evaluate` with the same inputs) to ``target``.

    ``dataset_options``: the registry name and options that rebuild the training set (``dataset.*``);
    ``test_set``: the split the ``val`` queries were drawn from, to record their indices. The ground truth is read
    from the LDS caches (measured only if one is missing). ``target`` is replaced whole, and only if it is a bundle.
    """
    adapter = adapter or ModelAdapter()
    target = Path(target)
    if target.exists() and any(target.iterdir()) and (read_manifest(target) or {}).get("kind") != BUNDLE_KIND:
        raise ConfigError(f"export_bundle={target} is a folder that holds something else; choose a new path")
    require_finished(paths)
    settings.validate()
    masks, runs = subset_models(paths, settings, len(train_set))
    methods = list(dict.fromkeys(record.method for record in report.records))
    weights = adapter.weights_file(paths.unet_dir)
    description: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "model": {
            "folder": UNET_FOLDER,
            "checkpoint": hash_file(weights),  # as score manifests name it
            "weights_file": weights.name,
            "adapter": type(adapter).__name__,
            "run": {"dataset": paths.dataset, "model": paths.model, "tag": paths.tag, "seed": paths.seed},
        },
        "train_set": _train_identity(train_set, dataset_options),
        "subsets": [],
        "protocol": {**dataclasses.asdict(settings), "timesteps": settings.timesteps, "heldout_split": {}},
        "query_sets": {},
        "ground_truth": {},
        "recorded": {
            "methods": methods,
            "pairs": [list(pair) for pair in dict.fromkeys((d.a, d.b) for d in report.differences)],
            "selected": {},
        },
    }
    for k, seeds in enumerate(runs):
        description["subsets"].append(
            {
                "index": k,
                "indices": np.flatnonzero(masks[k]).tolist(),
                # weights are not copied: their checksums pin which models the ground truth came from
                "weights_sha256": {
                    str(run.seed): hash_file(adapter.weights_file(run.unet_dir)) for run in seeds
                },
            }
        )
    with atomic_folder(target) as staging:
        shutil.copytree(paths.unet_dir, staging / UNET_FOLDER)
        # rows in index order: the masks' columns, the score matrices' columns
        _save_npy(staging / TRAIN_IMAGES_FILE, _uint8_images(train_set))
        for name in ("manifest.json", "config.json"):
            if (paths.run_dir / name).exists():
                shutil.copy(paths.run_dir / name, staging / "model" / f"run_{name}")
        for name, queries in query_sets.items():
            description["query_sets"][name] = _write_queries(staging, name, queries, paths, test_set)
            # seeds x subsets x queries, each model's cached loss (averaged over the timestep grid and e_seeds)
            per_seed = np.stack(
                [
                    np.stack([model_losses(run, queries, settings, device, adapter).numpy() for run in seeds])
                    for seeds in runs
                ],
                axis=1,
            ).astype(np.float64)
            _save_npy(staging / "ground_truth" / f"{name}.npy", per_seed)
            description["ground_truth"][name] = {
                "file": f"ground_truth/{name}.npy",
                "axes": "seeds x subsets x queries",
                "seeds": list(settings.seeds),
                "averaged_over": "the protocol's timesteps and e_seeds",
            }
            halves = heldout_halves(len(queries), len(runs), settings.heldout, settings.bootstrap_seed)
            description["protocol"]["heldout_split"][name] = _halves_json(halves)
            selected, arrays = _recorded_predictions(report, paths, name, queries, train_set, methods, masks)
            description["recorded"]["selected"][name] = selected
            (staging / "predictions").mkdir(exist_ok=True)
            np.savez(staging / "predictions" / f"{name}.npz", **arrays)
        write_lds_json(
            staging / LDS_FILE,
            [record.to_json() for record in report.records],
            [difference.to_json() for difference in report.differences],
            {"num_subsets": settings.num_subsets, "seeds": settings.seeds, "train_set": train_set.set_name},
        )
        (staging / BUNDLE_FILE).write_text(json.dumps(description, indent=1))
        (staging / README_FILE).write_text(bundle_readme(description))
        files = {
            path.relative_to(staging).as_posix(): file_record(path)
            for path in sorted(staging.rglob("*"))
            if path.is_file() and path != staging / MANIFEST_NAME
        }
        write_manifest(staging, {**bundle_rules(), FILES_KEY: files})
    return target


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array, allow_pickle=False)


def _uint8_images(dataset: ImageDataset) -> np.ndarray:
    """The images as uint8, images x channels x height x width, in index order."""
    if isinstance(dataset, TensorImageDataset):
        return dataset.images.contiguous().numpy()
    return np.stack([dataset.image_uint8(index).numpy() for index in range(len(dataset))])


def pixels_checksum(pixels: np.ndarray) -> str:
    """BLAKE2b (16 bytes) of a uint8 images x channels x height x width array's bytes: :func:`_images_checksum`
    of the dataset the array holds, so a reader checks ``train/images.npy`` with hashlib and numpy alone."""
    return hashlib.blake2b(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes(), digest_size=16).hexdigest()


def _images_checksum(dataset: ImageDataset) -> str:
    """BLAKE2b of the images' uint8 bytes in index order: the training set's order, not just its contents."""
    digest = hashlib.blake2b(digest_size=16)
    if isinstance(dataset, TensorImageDataset):
        digest.update(dataset.images.contiguous().numpy().tobytes())
    else:
        for index in range(len(dataset)):
            digest.update(dataset.image_uint8(index).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _train_identity(train_set: ImageDataset, dataset_options: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "registry": {key: value for key, value in dataset_options.items() if key not in ("root", "download")},
        **dataset_identity(train_set),
        "class_names": list(train_set.class_names),
        "channels": train_set.channels,
        "image_size": train_set.image_size,
        "labels": train_set.labels.tolist(),
        "images_blake2b": _images_checksum(train_set),
        "images_file": TRAIN_IMAGES_FILE,
        "images_axes": TRAIN_IMAGES_AXES,
    }


def savez_line(query_sets: Mapping[str, int], num_train: int, file: str = "mine.npz") -> str:
    """The exact ``np.savez`` call that writes scores for a bundle's query sets ({name: number of queries})."""
    arrays = ", ".join(f"{name}=scores_{name}" for name in query_sets)
    shapes = ", ".join(f"scores_{name} {count} x {num_train}" for name, count in query_sets.items())
    return f'np.savez("{file}", {arrays})  # {shapes}: queries x train'


def bundle_readme(description: Mapping[str, Any]) -> str:
    """The bundle's README.md, from its bundle.json: what a reader with numpy (and PIL for the query PNGs) needs to
    score a method against it: the files, the score format, shape, sign, query order and pixel convention."""
    train = description["train_set"]
    run = description["model"]["run"]
    sets = {name: entry["num_queries"] for name, entry in description["query_sets"].items()}
    num_train, channels, size = train["num_images"], train["channels"], train["image_size"]
    num_subsets, seeds = len(description["subsets"]), description["protocol"]["seeds"]
    noise = description["protocol"].get("noise", LEGACY_GROUND_TRUTH_NOISE)
    first = next(iter(sets))
    set_lines = "\n".join(
        f"  - `{name}`: {count} queries ({description['query_sets'][name]['set_name']}):\n"
        f"    ground truth ({len(seeds)}, {num_subsets}, {count}), scores {count} x {num_train}"
        for name, count in sets.items()
    )
    return f"""# LDS bundle: {run["dataset"]} / {run["model"]}, {num_train} training images, {num_subsets} subsets

Everything a Linear Datamodeling Score (LDS) needs besides the attribution method. numpy reads all of it (PIL the
query PNGs); `examples/outside_scorer.py` in das-lightning is a complete scorer that imports nothing else.
`manifest.json` holds the size and BLAKE2b checksum of every file.

## Files

- `{train["images_file"]}`: the training images, uint8, shape (train, channels, height, width) =
  ({num_train}, {channels}, {size}, {size}), row i = training image i. Their checksum is
  `hashlib.blake2b(np.load("{train["images_file"]}").tobytes(), digest_size=16).hexdigest()` ==
  `bundle.json["train_set"]["images_blake2b"]` = `{train["images_blake2b"]}`. Labels:
  `bundle.json["train_set"]["labels"]` (indices into `["class_names"]` = {json.dumps(train["class_names"])}).
- `queries/<set>/NNNN.png`: query q of a set is `bundle.json["query_sets"][set]["images"][q]`, uint8, grayscale
  (height x width) for 1 channel, RGB (height x width x 3) for 3. The query sets:
{set_lines}
- `bundle.json["subsets"][k]["indices"]`: the training images kept in subset k, i.e. the masks
  `masks[k, i] = i in indices`, shape (subsets, train) = ({num_subsets}, {num_train}).
- `ground_truth/<set>.npy`: float64 (seeds, subsets, queries): the loss of subset k's model (training seed r,
  seeds {seeds}) on query q, averaged over the protocol's timesteps and e_seeds (`bundle.json["protocol"]`). The
  LDS uses the mean over the seeds. Its noise: `bundle.json["protocol"]["noise"]` ({noise}; `coupled`: the
  features' own draw 0, as before that key existed; `disjoint`: a stream no feature setting reproduces).
- `predictions/<set>.npz`: per recorded method, float64 (2, subsets, queries): g = masks @ scores.T at the c its
  held-out half selected (row 0) and at the oracle c (row 1); `bundle.json["recorded"]["selected"]` names them.
- `lds.json`: the recorded LDS records and paired differences, each plain and centred (`centred`: the LDS once
  the subset ranking shared by all queries is removed: per query z-score losses and predictions over the subsets,
  then subtract the per-subset mean over the queries), with the query-averaged prediction's LDS and, per query set
  in `meta.shared_factor`, that ranking's share of the variance and the other-queries ceiling; `model/`: the
  sealed full model and its recipe.

## Pixels

On disk every image is uint8, 0-255. The diffusion model saw `pixels / 127.5 - 1`, in [-1, 1], and the recorded
`pixel` method is the cosine of those [-1, 1] pixels (each image flattened to {channels * size * size} numbers). The cosine of
[0, 1] pixels is another method with another LDS.

## Your scores

`scores[q, i]`: one row per query (in the order above), one column per training image (the rows of
`{train["images_file"]}`), finite floats. Sign: a larger score says training image i helps query q more; the LDS of
query q is the Spearman correlation over subsets k of `g_k(q) = sum of scores[q, i] over i kept in subset k` with
minus the loss `L_k(q)`, averaged over queries. Write one array per query set (a set left out is not evaluated):

    {savez_line(sets, num_train)}

With a regularisation strength to choose, give lambdas x queries x train arrays and their c values
(`np.savez(..., {first}=scores_by_c, lambdas=np.array([c1, c2, ...]))`): the held-out half of the queries chooses c,
as for the recorded methods.{"" if len(sets) > 1 else " A .npy of the one array works too."} Then, in das-lightning:

    python evaluate_lds.py bundle=THIS_FOLDER scores=mine.npz

prints the LDS with held-out and oracle c, bootstrap intervals and paired differences against the recorded methods.
"""


def _validation_indices(queries: ImageDataset, test_set: ImageDataset | None) -> list[int] | None:
    """The test-split indices of the ``val`` queries, drawn as queries.validation_queries draws them; checked
    image by image, so a change of that rule gives no index list rather than a wrong one."""
    if test_set is None:
        return None
    # a fresh draw of validation images is named "...:q<count>:d<draw>" (queries.validation_queries)
    suffix = queries.set_name.rsplit(":", 1)[-1]
    draw = int(suffix[1:]) if suffix.startswith("d") and suffix[1:].isdigit() else 0
    indices = validation_indices(test_set, len(queries), draw)
    same = all(
        torch.equal(test_set.image_uint8(int(i)), queries.image_uint8(row)) for row, i in enumerate(indices)
    )
    return indices.tolist() if same else None


def _write_queries(
    staging: Path, name: str, queries: ImageDataset, paths: RunPaths, test_set: ImageDataset | None
) -> dict[str, Any]:
    """Every query image as a PNG, with the set's identity (the noise rule's key) and where it came from."""
    images = []
    for row in range(len(queries)):
        relative = f"queries/{name}/{row:04d}.png"
        pixels = queries.image_uint8(row).numpy()
        picture = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        picture.save(staging / relative)
        images.append(relative)
    sources = {
        "val": lambda: {
            "split": None if test_set is None else test_set.set_name,
            "indices": _validation_indices(queries, test_set),
        },
        "generated": lambda: {"generated_by": generated_manifest(paths)},  # sampler settings and model hash
        "files": lambda: {"file_names": list(getattr(queries, "file_names", []))},
    }
    return {
        **dataset_identity(queries),
        "num_queries": len(queries),
        "labels": queries.labels.tolist(),
        "class_names": list(queries.class_names),
        "images": images,
        "source": sources.get(name, dict)(),
    }


def _halves_json(halves: Any) -> dict[str, list[int] | None]:
    return {
        field.name: None if getattr(halves, field.name) is None else getattr(halves, field.name).tolist()
        for field in dataclasses.fields(halves)
    }


def _recorded_predictions(
    report: LDSReport,
    paths: RunPaths,
    name: str,
    queries: ImageDataset,
    train_set: ImageDataset,
    methods: Sequence[str],
    masks: np.ndarray,
) -> tuple[dict[str, dict[str, Lambda]], dict[str, np.ndarray]]:
    """({method: {"heldout": c, "oracle": c}}, {method: (2, M, Q) predictions at those c}) for one query set."""
    selected: dict[str, dict[str, Lambda]] = {}
    arrays: dict[str, np.ndarray] = {}
    for method in methods:
        by_lambda, _, _ = method_scores(paths.scores_dir, method, name, queries, train_set)
        chosen = {
            record.lambda_selection: record.lambda_
            for record in report.records
            if record.method == method and record.query_set == name
        }
        selected[method] = {selection: chosen[selection] for selection in SELECTIONS}
        # M x Q each: the LDS sees a score matrix only through these sums
        arrays[method] = np.stack(
            [predictions(by_lambda[chosen[selection]], masks).numpy() for selection in SELECTIONS]
        )
    return selected, arrays


# ------------------------------------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Bundle:
    """A verified bundle, in memory. Shapes: masks subsets x train; ground truth per query set seeds x subsets x
    queries; predictions per query set and recorded method (2, subsets, queries), rows :data:`SELECTIONS`."""

    path: Path
    description: dict[str, Any]
    masks: np.ndarray
    ground_truth: dict[str, np.ndarray]
    predictions: dict[str, dict[str, np.ndarray]]
    records: list[LDSRecord]
    differences: list[PairedDifference]

    @property
    def settings(self) -> LDSSettings:
        # a bundle exported before lds.noise existed measured its ground truth coupled (the features' draw 0); one
        # exported before lds.snr_rule existed is read with today's default rule (it records no SNR-LDS rows)
        protocol = {
            "noise": LEGACY_GROUND_TRUTH_NOISE,
            "snr_rule": DEFAULT_SNR_RULE,
            "selection": "plain",  # c was chosen on the plain LDS before lds.selection existed
            **self.description["protocol"],
        }
        return LDSSettings(**{f.name: protocol[f.name] for f in dataclasses.fields(LDSSettings)})

    @property
    def query_sets(self) -> list[str]:
        return list(self.description["query_sets"])

    @property
    def num_train(self) -> int:
        return int(self.masks.shape[1])

    def num_queries(self, query_set: str) -> int:
        return int(self.description["query_sets"][query_set]["num_queries"])

    def losses(self, query_set: str) -> np.ndarray:
        """subsets x queries: the LDS's ground truth, the mean over the training seeds as the LDS stage takes it."""
        return self.ground_truth[query_set].mean(0)

    def query_images(self, query_set: str) -> np.ndarray:
        """The query images as uint8, queries x channels x height x width."""
        pictures = []
        for relative in self.description["query_sets"][query_set]["images"]:
            with Image.open(self.path / relative) as picture:
                pixels = np.asarray(picture)
            pictures.append(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))
        return np.stack(pictures)

    def train_images(self) -> np.ndarray:
        """The training images as uint8, train x channels x height x width, row i = training index i (column i
        of the masks and of every score matrix), checked against the recorded checksum."""
        identity = self.description["train_set"]
        if "images_file" not in identity:
            raise MissingArtifactError(
                f"LDS bundle {self.path} was exported without its training images: add them (rebuilt from the "
                f"registry, checked against its checksum) with complete_bundle({str(self.path)!r})"
            )
        pixels = np.load(self.path / identity["images_file"], allow_pickle=False)
        if pixels_checksum(pixels) != identity["images_blake2b"]:
            raise CorruptArtifactError(
                f"LDS bundle {self.path}: {identity['images_file']} is not the training set its bundle.json names "
                "(images_blake2b differs): copy the bundle again from its source"
            )
        return pixels

    def halves(self, query_set: str) -> Any:
        return heldout_halves(
            self.num_queries(query_set), len(self.masks), self.settings.heldout, self.settings.bootstrap_seed
        )


def load_bundle(path: str | Path) -> Bundle:
    """Read a bundle, refusing it with one error when its rules differ from this code's
    (:class:`ManifestMismatchError`) or when a file is missing or damaged (:class:`CorruptArtifactError`, naming
    every such file)."""
    path = Path(path)
    manifest = read_manifest(path) if path.is_dir() else None
    if manifest is None:
        raise MissingArtifactError(
            f"no LDS bundle at {path} (no {MANIFEST_NAME}): write one with "
            "`python evaluate_lds.py export_bundle=PATH` after an LDS run"
        )
    differences = manifest_differences({key: manifest.get(key) for key in bundle_rules()}, bundle_rules())
    if differences:
        raise ManifestMismatchError(path, differences)
    records = manifest.get(FILES_KEY) or {}
    # the files every bundle has must have a record, or an edited manifest could hide a changed file
    problems = [
        f"{name} has no checksum in {MANIFEST_NAME}"
        for name in (BUNDLE_FILE, LDS_FILE)
        if name not in records
    ]
    for relative, record in sorted(records.items()):
        file = path / relative
        if not file.is_file():
            problems.append(f"{relative} is missing")
        elif file_record(file) != record:
            problems.append(f"{relative} is damaged (its size or checksum differs from the manifest's)")
    if problems:
        raise CorruptArtifactError(
            f"LDS bundle {path} is damaged: {'; '.join(problems)}. Copy the bundle again from its source"
        )
    remedy = "copy the bundle again from its source"
    description = read_json(path / BUNDLE_FILE, remedy)
    unrecorded = [
        relative
        for relative in [
            *(entry["file"] for entry in description["ground_truth"].values()),
            *(f"predictions/{name}.npz" for name in description["query_sets"]),
            *([description["train_set"]["images_file"]] if "images_file" in description["train_set"] else []),
        ]
        if relative not in records
    ]
    if unrecorded:
        raise CorruptArtifactError(f"LDS bundle {path}: {', '.join(unrecorded)} have no checksum: {remedy}")
    masks = np.zeros((len(description["subsets"]), len(description["train_set"]["labels"])), dtype=bool)
    for subset in description["subsets"]:
        masks[subset["index"], subset["indices"]] = True
    ground_truth = {
        name: np.load(path / entry["file"], allow_pickle=False)
        for name, entry in description["ground_truth"].items()
    }
    recorded = {}
    for name in description["query_sets"]:
        with np.load(path / "predictions" / f"{name}.npz", allow_pickle=False) as archive:
            recorded[name] = {method: archive[method] for method in archive.files}
    document = read_json(path / LDS_FILE, remedy)
    bundle = Bundle(
        path,
        description,
        masks,
        ground_truth,
        recorded,
        [_record_from_json(record) for record in document["records"]],
        [_difference_from_json(difference) for difference in document["differences"]],
    )
    for (
        name
    ) in bundle.query_sets:  # the held-out split is recomputed by this code: it must be the recorded one
        stored = description["protocol"]["heldout_split"][name]
        if _halves_json(bundle.halves(name)) != stored:
            raise ManifestMismatchError(
                path, {f"protocol.heldout_split.{name}": (stored, _halves_json(bundle.halves(name)))}
            )
    return bundle


def complete_bundle(path: str | Path, data_root: str | Path | None = None, download: bool = False) -> Path:
    """Add what a bundle exported before they were part of one lacks: the training images (rebuilt from the
    registry by :func:`bundle_train_set`, so refused unless their checksum is the recorded ``images_blake2b``) and
    the README. bundle.json only gains keys; the manifest gains the new files' records."""
    bundle = load_bundle(path)
    if "images_file" in bundle.description["train_set"] and (bundle.path / README_FILE).is_file():
        return bundle.path
    pixels = _uint8_images(bundle_train_set(bundle, data_root, download))
    description = bundle.description
    description["train_set"].update(images_file=TRAIN_IMAGES_FILE, images_axes=TRAIN_IMAGES_AXES)
    (bundle.path / TRAIN_IMAGES_FILE).parent.mkdir(parents=True, exist_ok=True)
    atomic_save(bundle.path / TRAIN_IMAGES_FILE, lambda tmp: _save_npy(tmp, pixels))
    atomic_write_text(bundle.path / BUNDLE_FILE, json.dumps(description, indent=1))
    atomic_write_text(bundle.path / README_FILE, bundle_readme(description))
    manifest = read_manifest(bundle.path) or {}
    for relative in (BUNDLE_FILE, README_FILE, TRAIN_IMAGES_FILE):
        manifest[FILES_KEY][relative] = file_record(bundle.path / relative)
    write_manifest(bundle.path, manifest)
    load_bundle(bundle.path).train_images()  # it loads, and its images are the recorded ones
    return bundle.path


def _from_json(kind: type, document: Mapping[str, Any], renamed: Mapping[str, str] = {}) -> Any:
    """A record or difference from its ``to_json`` form: keys renamed back, NaN (written as null) restored, lists
    back to the tuples the dataclass holds, derived keys (``resolved``) dropped."""
    values = {renamed.get(key, key): value for key, value in document.items()}
    fields = {field.name: field for field in dataclasses.fields(kind)}
    for key, field in fields.items():
        value = values.get(key)
        if isinstance(value, list):
            values[key] = tuple(float("nan") if item is None else item for item in value)
        elif value is None and field.type in ("float", float):
            values[key] = float("nan")
    return kind(**{key: value for key, value in values.items() if key in fields})


def _record_from_json(record: Mapping[str, Any]) -> LDSRecord:
    return _from_json(LDSRecord, record, {"lambda_scale": "lambda_", "lambda": "lambda_absolute"})


def _difference_from_json(difference: Mapping[str, Any]) -> PairedDifference:
    return _from_json(PairedDifference, difference)


# ------------------------------------------------------------------------------------ attribute against it


def bundle_train_set(bundle: Bundle, root: str | Path | None = None, download: bool = False) -> ImageDataset:
    """The training set the bundle names, rebuilt from the registry (``root``: where its files are on this
    machine), refused unless it is the same images in the same order."""
    identity = bundle.description["train_set"]
    options = identity["registry"]
    train_set = build_dataset(
        options["name"],
        "train",
        root,
        int(options["image_size"]),
        classes=options.get("classes"),
        num_train=options.get("num_train"),
        download=download,
    )
    rebuilt = {**dataset_identity(train_set), "images_blake2b": _images_checksum(train_set)}
    differences = manifest_differences({key: identity.get(key) for key in rebuilt}, rebuilt)
    if differences:
        raise ManifestMismatchError(bundle.path / BUNDLE_FILE, differences)
    return train_set


def bundle_query_sets(bundle: Bundle) -> dict[str, ImageDataset]:
    """The bundle's query sets from its PNG files, under their original identities (``set_name``, ``content_id``),
    so the noise rule gives each query the noise its ground truth was measured with."""
    query_sets: dict[str, ImageDataset] = {}
    for name, entry in bundle.description["query_sets"].items():
        dataset = TensorImageDataset(
            entry["set_name"],
            torch.from_numpy(bundle.query_images(name)),
            np.asarray(entry["labels"], dtype=np.int64),
            entry["class_names"],
            bundle.description["train_set"]["image_size"],
        )
        dataset.content_id = entry.get("content_id")
        query_sets[name] = dataset
    return query_sets


def bundle_run_paths(bundle: Bundle, root: str | Path) -> RunPaths:
    """Where attribution against a bundle writes its features and scores: a model folder of its own under
    ``root``, named by the model's checksum, so it never mixes with a run trained here."""
    run = bundle.description["model"]["run"]
    checkpoint = bundle.description["model"]["checkpoint"][:12]
    return RunPaths(
        Path(root), run["dataset"], f"{run['model']}-bundle-{checkpoint}", run["tag"], run["seed"]
    )


def bundle_attribution_inputs(
    bundle: Bundle, paths: RunPaths, train_set: ImageDataset, needs_snapshots: bool, needs_journey: bool
) -> AttributionInputs:
    """The attribute stage's inputs from a bundle: its full model, the training set it names and its queries.
    Methods that need what a bundle does not carry (TracIn's snapshots, Journey-TRAK's trajectories) are refused."""
    if needs_snapshots or needs_journey:
        raise ConfigError(
            "this method needs training snapshots or sampling trajectories, which a bundle does not carry; "
            "attribute it in the run that made the bundle"
        )
    adapter_name = bundle.description["model"]["adapter"]
    if adapter_name != ModelAdapter.__name__:
        raise ConfigError(
            f"the bundle's model is loaded by {adapter_name}; bundles attribute pixel DDPMs only"
        )
    model = ModelAdapter().load(bundle.path / UNET_FOLDER, paths.latents_dir)  # checked by load_bundle
    return AttributionInputs(
        model=model,
        train_set=train_set,
        query_sets=bundle_query_sets(bundle),
        features_dir=paths.features_dir,
        scores_dir=paths.scores_dir,
        lds_file=bundle.path
        / LDS_FILE,  # pictures at the c the bundle's LDS selected, when it has the method
    )


def bundle_attribution(
    bundle_path: Path,
    root: Path,
    method: MethodSettings,
    data_root: str | Path | None = None,
    download: bool = False,
) -> tuple[RunPaths, AttributionInputs]:
    """(where the scores go, the attribute stage's inputs) for ``method`` against the bundle at ``bundle_path``."""
    bundle = load_bundle(bundle_path)
    entry = build_method(method)
    paths = bundle_run_paths(bundle, root)
    train_set = bundle_train_set(bundle, data_root, download)
    return paths, bundle_attribution_inputs(
        bundle, paths, train_set, entry.needs_snapshots, entry.needs_journey
    )


# ------------------------------------------------------------------------------------------- your own scores


@dataclass
class BundleReport:
    """The LDS of scores evaluated against a bundle: their records and paired differences against the recorded
    methods, and the table of the recorded methods with them."""

    records: list[LDSRecord]
    differences: list[PairedDifference]
    table: str
    shared: list[SharedFactorRecord] = dataclasses.field(default_factory=list)


ScoresInput = str | Path | np.ndarray | Mapping[str, Any]


def read_scores_file(path: str | Path) -> dict[str, Any]:
    """Scores saved by numpy: ``.npy`` (one query set: queries x train, or lambdas x queries x train) or ``.npz``
    (one array per query set name; ``<set>/<c>`` for one array per c; an optional ``lambdas`` array gives the c of
    each row of every 3-d array). Returns {set or "": array or {c: array}, ...} for :func:`evaluate_scores`."""
    path = Path(path)
    if not path.is_file():
        raise MissingArtifactError(f"scores={path}: no such file")
    if path.suffix == ".npy":
        return {"": np.load(path, allow_pickle=False)}
    if path.suffix != ".npz":
        raise ConfigError(f"scores={path}: save a .npy (one query set) or an .npz (one array per query set)")
    scores: dict[str, Any] = {}
    with np.load(path, allow_pickle=False) as archive:
        for key in archive.files:
            name, _, scale = key.partition("/")
            if scale:
                try:
                    scores.setdefault(name, {})[float(scale)] = archive[key]
                except ValueError as error:
                    raise ConfigError(f"scores={path}: key {key!r} is not <query set>/<c>") from error
            else:
                scores[name] = archive[key]
    return scores


def project_scores(bundle: Bundle, folder: Path) -> dict[str, dict[Lambda, np.ndarray]]:
    """{query set: {c: queries x train}} from a score folder of this project (one sub-folder per query set),
    refused when its scores were made with another model or for other queries than the bundle's."""
    scores: dict[str, dict[Lambda, np.ndarray]] = {}
    for name in bundle.query_sets:
        if not (folder / name).is_dir():
            continue
        stacked, manifest = load_scores(folder / name)
        entry = bundle.description["query_sets"][name]
        expected = {
            "checkpoint": bundle.description["model"]["checkpoint"],
            "query_set": entry["set_name"],
            "num_queries": entry["num_queries"],
            "num_train": bundle.num_train,
            "content_id": entry.get("content_id"),
        }
        differences = manifest_differences({key: manifest.get(key) for key in expected}, expected)
        if differences:
            raise ManifestMismatchError(folder / name, differences)
        scores[name] = scores_by_scale(stacked, manifest)
    if not scores:
        raise MissingArtifactError(
            f"scores={folder}: no sub-folder for any of the query sets {bundle.query_sets}"
        )
    return scores


def evaluate_scores(
    bundle: Bundle | str | Path,
    scores: ScoresInput,
    name: str | None = None,
    lambdas: Sequence[float] | None = None,
) -> BundleReport:
    """The LDS of a score matrix from anywhere, against a bundle, reported as the LDS stage reports a method:
    held-out and oracle selection when several matrices are given, bootstrap CIs, and paired differences (at each
    method's held-out c) against every method recorded in the bundle.

    ``scores``: a file (see :func:`read_scores_file`), a score folder of this project (``<run>/scores/<method>``,
    e.g. from ``attribute.py bundle=PATH``), one array (a bundle with one query set), or a mapping of query set
    name to a queries x train array, a lambdas x queries x train array (c values from ``lambdas``, else the row
    numbers) or a mapping {c: queries x train}. Query sets left out are not evaluated. ``name``: the method's name
    in the table (default: the file's or folder's name, marked "(yours)" if the bundle records one of that name).
    """
    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    recorded = bundle.description["recorded"]["methods"]
    if name is None:
        name = Path(scores).stem if isinstance(scores, str | Path) else "yours"
        name = f"{name} (yours)" if name in recorded else name
    elif name in recorded:
        raise ConfigError(
            f"the bundle already records a method named {name!r}; give your scores another name"
        )
    by_set = _scores_by_set(bundle, scores, lambdas)
    settings = bundle.settings
    check_subset_count(len(bundle.masks))  # warns, as the LDS stage does, below the count a Spearman needs
    records: list[LDSRecord] = []
    differences: list[PairedDifference] = []
    shared: list[SharedFactorRecord] = []
    for query_set, by_lambda in by_set.items():
        losses = bundle.losses(query_set)  # subsets x queries
        halves = bundle.halves(query_set)
        shared += shared_factor_records(
            query_set,
            bundle.ground_truth[query_set],
            halves,
            settings.num_resamples,
            settings.bootstrap_seed,
        )
        heldout, oracle = evaluate_method(
            by_lambda,
            bundle.masks,
            losses,
            name,
            query_set,
            settings.num_resamples,
            settings.bootstrap_seed,
            heldout=settings.heldout,
            losses_by_seed=bundle.ground_truth[query_set],
            num_train=bundle.num_train,
            selection=settings.selection,
        )
        records += [heldout, oracle]
        chosen = by_lambda[heldout.lambda_]  # the c the held-out half selected
        ours = predictions(chosen, bundle.masks).numpy()  # M x Q, as the recorded methods' are stored
        for method, stored in bundle.predictions[query_set].items():
            differences.append(
                _paired_on_predictions(name, ours, method, stored[0], bundle, halves, query_set)
            )
    table = markdown_table(
        [*bundle.records, *records],
        [*bundle.differences, *differences],
        shared,
    )
    return BundleReport(records, differences, table, shared)


def reproduce_recorded(bundle: Bundle | str | Path) -> BundleReport:
    """The recorded methods' records and paired differences recomputed from the bundle alone (stored predictions
    and ground truth): the run's LDS table, with no model and no score folder."""
    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    settings = bundle.settings
    identity = np.eye(len(bundle.masks))  # predictions stand in for scores: g = I @ g
    stored_records = {(r.method, r.query_set, r.lambda_selection): r for r in bundle.records}
    records: list[LDSRecord] = []
    differences: list[PairedDifference] = []
    shared: list[SharedFactorRecord] = []
    for query_set in bundle.query_sets:
        losses = bundle.losses(query_set)
        selected = bundle.description["recorded"]["selected"][query_set]
        shared += shared_factor_records(
            query_set,
            bundle.ground_truth[query_set],
            bundle.halves(query_set),
            settings.num_resamples,
            settings.bootstrap_seed,
        )
        for method, stored in bundle.predictions[query_set].items():
            # the held-out c was best on the selection half over the whole grid and the oracle c on everything,
            # so choosing between these two alone chooses them again
            by_lambda = {selected[method][s]: stored[row].T for row, s in enumerate(SELECTIONS)}
            for record in evaluate_method(
                by_lambda,
                identity,
                losses,
                method,
                query_set,
                settings.num_resamples,
                settings.bootstrap_seed,
                heldout=settings.heldout,
                losses_by_seed=bundle.ground_truth[query_set],
                num_train=bundle.num_train,
                selection=settings.selection,
            ):
                original = stored_records[(method, query_set, record.lambda_selection)]
                # the unit, the grid's edges and the members are the score folder's, recorded with the records
                records.append(
                    dataclasses.replace(
                        record,
                        lambda_absolute=original.lambda_absolute,
                        edge=original.edge,
                        members=original.members,
                    )
                )
        halves = bundle.halves(query_set)
        for a, b in bundle.description["recorded"]["pairs"]:
            if a in bundle.predictions[query_set] and b in bundle.predictions[query_set]:
                differences.append(
                    _paired_on_predictions(
                        a,
                        bundle.predictions[query_set][a][0],
                        b,
                        bundle.predictions[query_set][b][0],
                        bundle,
                        halves,
                        query_set,
                    )
                )
    return BundleReport(records, differences, markdown_table(records, differences, shared), shared)


def _paired_on_predictions(
    a: str,
    predicted_a: np.ndarray,
    b: str,
    predicted_b: np.ndarray,
    bundle: Bundle,
    halves: Any,
    query_set: str,
) -> PairedDifference:
    """:func:`paired_difference` at the held-out c of both methods, from predictions (M x Q each): the identity
    as masks makes g = I @ g, so the bootstrap sees exactly these sums, on the report half as the LDS stage."""
    settings = bundle.settings
    losses, by_seed = bundle.losses(query_set), bundle.ground_truth[query_set]
    identity = np.eye(len(losses))
    report_masks, report_losses = subset_rows(identity, losses, halves.report_subsets)
    report_by_seed = seed_subset_rows(by_seed, halves.report_subsets)
    return paired_difference(
        a,
        predicted_a.T,  # queries x subsets: each query's prediction for every subset
        b,
        predicted_b.T,
        report_masks,
        report_losses,
        query_set,
        settings.num_resamples,
        settings.bootstrap_seed,
        query_indices=halves.report_queries,
        losses_by_seed=report_by_seed,
    )


def _scores_by_set(
    bundle: Bundle, scores: ScoresInput, lambdas: Sequence[float] | None
) -> dict[str, dict[Lambda, np.ndarray]]:
    """{query set: {c: queries x train}}, every shape checked against the bundle (one error naming the expected)."""
    source = Path(scores) if isinstance(scores, str | Path) else None  # named in the errors
    if isinstance(scores, str | Path):
        scores = project_scores(bundle, Path(scores)) if Path(scores).is_dir() else read_scores_file(scores)
    if isinstance(scores, np.ndarray | torch.Tensor):
        scores = {"": scores}
    scores = dict(scores)
    if LAMBDAS_KEY in scores:
        lambdas = [float(c) for c in np.asarray(scores.pop(LAMBDAS_KEY)).ravel()]
    if "" in scores:  # one unnamed array: the bundle's only query set
        if len(bundle.query_sets) != 1 or len(scores) != 1:
            # one matrix cannot say which set it scores (every set may have the same shape): name them in an .npz
            file = Path("mine.npz") if source is None else source.with_suffix(".npz")
            sets = {name: bundle.num_queries(name) for name in bundle.query_sets}
            raise ConfigError(
                f"{'one array' if source is None else f'{source.name} holds one array'}, and the bundle has "
                f"query sets {bundle.query_sets}: save one "
                f"array per set (a set left out is not evaluated) with {savez_line(sets, bundle.num_train, str(file))}"
                f", then pass scores={file}"
            )
        scores = {bundle.query_sets[0]: scores.pop("")}
    unknown = sorted(set(scores) - set(bundle.query_sets))
    if unknown or not scores:
        raise ConfigError(f"scores for query sets {unknown or 'none'}; the bundle has {bundle.query_sets}")
    by_set = {}
    for query_set, value in scores.items():
        expected = (bundle.num_queries(query_set), bundle.num_train)
        if isinstance(value, Mapping):
            by_lambda = {None if c is None else float(c): np.asarray(matrix) for c, matrix in value.items()}
        else:
            value = np.asarray(value)
            if value.ndim == 3:
                grid = list(range(len(value))) if lambdas is None else list(lambdas)
                if len(grid) != len(value):
                    raise ConfigError(
                        f"scores for query set {query_set!r} have {len(value)} rows of lambda but {len(grid)} "
                        "lambdas were given"
                    )
                by_lambda = {float(c): matrix for c, matrix in zip(grid, value, strict=True)}
            else:
                by_lambda = {None: value}
        for c, matrix in by_lambda.items():
            if matrix.shape != expected:
                raise ConfigError(
                    f"scores for query set {query_set!r}{'' if c is None else f' at c = {c:g}'} have shape "
                    f"{matrix.shape}; the bundle expects queries x train = {expected} "
                    f"(or lambdas x queries x train = (L, {expected[0]}, {expected[1]}))"
                )
            if not np.isfinite(matrix).all():
                raise NumericalError(f"scores for query set {query_set!r} hold NaN or infinite values")
        by_set[query_set] = {c: matrix.astype(np.float64, copy=False) for c, matrix in by_lambda.items()}
    return by_set
