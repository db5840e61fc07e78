"""Collect (or resume, or reuse) the projected gradient features of one image set into a feature store.

Where a store lives (one rule, :func:`store_folder`; score folders follow it, :func:`store_suffix`):
``collect_features`` is given ``<features_dir>/<name>/<key>``.

- The feature set's *home* is ``<name>``, whatever the draws (since issue 18 moved DAS's and TRAK's default draws:
  a run's default store is ``<name>``, where ``evaluate_lds.py methods=[<name>]`` finds its scores). A store of other
  draws made before that in ``<name>-<hash of the draw settings>`` is still found there.
- A store lives in its home unless the home already holds stores of other semantic settings (another K, projector
  kind, k or seed, e_seed, timesteps, output function, dtype, ...: the manifest's ``features`` section). Then it
  lives in ``<name>-<hash of all its semantic settings>`` beside it instead of being refused: stores of different
  settings coexist and a sweep needs no hand-made names (or name one yourself: ``method.features.name``).
- So every store made before this rule keeps its folder (the demo's, the benchmarks', the tests' tiny ones), and a
  run's default store stays ``<name>`` on a run folder where it was made first. Batch size, workers, activation
  budget and timestep_batch compute the same rows: they never change the folder.

Within one folder a store made from another checkpoint or image set is still refused, naming the keys that differ.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from das_lightning import __version__
from das_lightning.attribution.collector import ProjectedGradientCollector, ShardedPredictModule
from das_lightning.attribution.grads import NORMALIZATIONS, PerSampleGradients, resolve_normalize
from das_lightning.attribution.projectors import TAKES_DISTRIBUTION, ProjectorSettings, build_projector
from das_lightning.attribution.store import FeatureStore, exclusive_writer
from das_lightning.attribution.timesteps import (
    SAMPLING_SCHEMES,
    draw_plan,
    select_timesteps,
    stratified_timesteps,
)
from das_lightning.data import ImageDataset, dataset_identity
from das_lightning.diffusion import NUM_TRAIN_TIMESTEPS
from das_lightning.distributed import build_trainer, process_device
from das_lightning.errors import ConfigError

log = logging.getLogger(__name__)

# settings that do not change a row (how fast it is computed), left out of the store manifest
NOT_RECORDED = ("batch_size", "num_workers", "timestep_batch", "activation_budget_mib")
# the draw settings: recorded only when they are not the one-draw defaults (FeatureSettings.draw_settings)
DRAW_KEYS = ("normalize", "draws_per_timestep", "sampling", "antithetic")


@dataclass
class FeatureSettings:
    """What is differentiated and how it is compressed (METHOD.md §2); all of it goes into the store manifest."""

    name: str = "das"  # feature-set name: methods sharing settings share a store (trak, relatif, renorm, ...)
    output_function: str = "mean"
    timestep_strategy: str = "uniform"
    num_timesteps: int = 10
    timesteps: list[int] | None = None  # explicit list, with timestep_strategy=explicit
    # the older switch, kept for configs and code that set it: true = normalize "timestep", false = "none"; when
    # given it wins over `normalize` (false always means no normalisation), then it is cleared to None
    normalize_per_timestep: bool | None = None
    projector: ProjectorSettings = field(default_factory=ProjectorSettings)
    param_pattern: str | None = None  # regex on parameter names; None = all trainable
    e_seed: int = 0
    batch_size: int = 32
    timestep_batch: int | None = None
    activation_budget_mib: int = 2048  # peak memory of one vmap call (see PerSampleGradients.pairs_per_call)
    dtype: str = "float32"
    num_workers: int = 0
    # draws (METHOD.md §7): D noise draws per timestep, the timestep scheme, antithetic pairs, and how the draws'
    # gradients are normalised before averaging; the defaults are the one-draw features of METHOD.md §2
    normalize: str = "timestep"  # timestep (DAS: per t, over its draws) | draw (SNR-LDS: each draw) | none
    draws_per_timestep: int = 1
    sampling: str = "grid"  # grid (timestep_strategy's timesteps) | stratified (one jittered t per stratum)
    antithetic: bool = False  # draws in pairs (eps, -eps): draws_per_timestep must be even

    def __post_init__(self) -> None:
        if isinstance(self.projector, dict):  # from a composed config, or from asdict() of another settings
            self.projector = ProjectorSettings(**self.projector)
        if self.normalize_per_timestep is not None:
            if not self.normalize_per_timestep:
                self.normalize = "none"
            elif self.normalize == "none":
                self.normalize = "timestep"
            self.normalize_per_timestep = None  # copies (asdict) carry `normalize` alone
        self.validate_draws()

    def validate_draws(self) -> None:
        """Refuse draw settings that cannot work, before any feature is computed."""
        if self.normalize not in NORMALIZATIONS:
            raise ConfigError(
                f"method.features.normalize must be one of {list(NORMALIZATIONS)}, not {self.normalize!r}"
            )
        if self.sampling not in SAMPLING_SCHEMES:
            raise ConfigError(
                f"method.features.sampling must be one of {list(SAMPLING_SCHEMES)}, not {self.sampling!r}"
            )
        if self.sampling == "stratified" and (
            self.timestep_strategy != "uniform" or self.timesteps is not None
        ):
            raise ConfigError(
                "method.features.sampling=stratified draws its own timesteps (one per stratum of "
                f"[0, {NUM_TRAIN_TIMESTEPS})): it needs timestep_strategy=uniform and no explicit timesteps, "
                f"not timestep_strategy={self.timestep_strategy!r}; for chosen timesteps set "
                "method.features.sampling=grid (and draws_per_timestep, antithetic as wanted)"
            )
        draw_plan([0], int(self.draws_per_timestep), bool(self.antithetic))  # D >= 1, even when antithetic

    @property
    def effective_normalize(self) -> str:
        """The normalisation in force ("draw" with one draw per timestep is "timestep": the same feature)."""
        return resolve_normalize(self.normalize, None, int(self.draws_per_timestep))

    def draw_settings(self) -> dict[str, Any]:
        """The draw settings that differ from the one-draw defaults (empty for today's features): what enters
        the store manifest beside the older keys, and what names a store's folder."""
        described: dict[str, Any] = {}
        if int(self.draws_per_timestep) != 1:
            described["draws_per_timestep"] = int(self.draws_per_timestep)
        if self.sampling != "grid":
            described["sampling"] = self.sampling
        if self.antithetic:
            described["antithetic"] = True
        if self.effective_normalize == "draw":
            described["normalize"] = "draw"
        return described

    def timestep_list(self) -> list[int]:
        if self.sampling == "stratified":
            return stratified_timesteps(self.num_timesteps, total=NUM_TRAIN_TIMESTEPS, seed=self.e_seed)
        return select_timesteps(
            self.timestep_strategy,
            self.num_timesteps,
            total=NUM_TRAIN_TIMESTEPS,
            seed=self.e_seed,
            explicit=self.timesteps,
        )


@dataclass
class CollectionDevice:
    """Where feature collection runs (Trainer arguments)."""

    accelerator: str = "cpu"
    devices: int | str = 1
    strategy: str = "auto"
    num_nodes: int = 1
    enable_progress_bar: bool = True

    def torch_device(self) -> torch.device:
        """This process's device for work outside a Trainer (DAS residuals, Journey-TRAK replays): its rank's GPU
        when the collection runs on GPUs, else the CPU."""
        return process_device(self.accelerator)


def make_gradients(
    unet: torch.nn.Module,
    alphas_cumprod: torch.Tensor,
    settings: FeatureSettings,
    unet_kwargs: dict[str, Any] | None = None,
) -> PerSampleGradients:
    return PerSampleGradients(
        unet,
        alphas_cumprod,
        output_function=settings.output_function,
        timesteps=settings.timestep_list(),
        normalize_per_timestep=settings.effective_normalize == "timestep",
        param_filter=settings.param_pattern,
        e_seed=settings.e_seed,
        unet_kwargs=unet_kwargs,
        timestep_batch=settings.timestep_batch,
        activation_bytes=settings.activation_budget_mib << 20,
        draws_per_timestep=settings.draws_per_timestep,
        antithetic=settings.antithetic,
        normalize=settings.normalize,
    )


def make_projector(settings: FeatureSettings, num_params: int, device: torch.device | str = "cpu"):
    """The projector of ``settings``; the same one is reused for every image set of a run (train, val,
    generated), so a dense matrix kept in memory is generated once, not once per set."""
    projector = settings.projector
    options = dict(projector.options)
    if projector.kind in TAKES_DISTRIBUTION:
        options.setdefault("distribution", projector.distribution)
    if projector.kind != "identity":
        options.setdefault("device", str(device))
    key = tuple(sorted((name, repr(value)) for name, value in options.items()))
    return _cached_projector(projector.kind, num_params, projector.dim, projector.seed, key, options)


_last_projector: dict[tuple, Any] = {}


def _cached_projector(kind: str, num_params: int, dim: int, seed: int, key: tuple, options: dict[str, Any]):
    """Keeps the last projector built (one, so at most one dense matrix stays in memory)."""
    identity = (kind, num_params, dim, seed, key)
    if identity not in _last_projector:
        _last_projector.clear()
        _last_projector[identity] = build_projector(kind, num_params, dim, seed, **options)
    return _last_projector[identity]


def feature_description(settings: FeatureSettings) -> dict[str, Any]:
    """The semantic settings of a store (its manifest's ``features`` section): what changes the rows, in the keys
    stores have always recorded; batch size, workers, activation budget and timestep_batch are left out."""
    described = {
        k: v for k, v in asdict(settings).items() if k not in {*NOT_RECORDED, "projector", *DRAW_KEYS}
    }
    # the normalisation under the key stores have always recorded, the draw settings only when they are not the
    # one-draw defaults: stores made before draws existed keep their manifest, and stay valid
    described["normalize_per_timestep"] = settings.effective_normalize == "timestep"
    described.update(settings.draw_settings())
    # the projector's settings under the flat keys stores have always recorded, so existing stores stay valid
    chosen = settings.projector
    described.update(
        projector=chosen.kind,
        projector_distribution=chosen.distribution,
        projector_dim=chosen.dim,
        projector_seed=chosen.seed,
        projector_options=chosen.options,
    )
    return described


def feature_manifest(
    checkpoint_id: str,
    dataset: ImageDataset,
    settings: FeatureSettings,
    gradients: PerSampleGradients,
    projector: Any,
) -> dict[str, Any]:
    """Everything that determines the rows; a store whose manifest differs is refused."""
    return {
        "checkpoint": checkpoint_id,
        **dataset_identity(dataset),
        "features": feature_description(settings),
        "gradients": gradients.describe(),
        "projector": projector.describe(),
        "package_version": __version__,
    }


def _short_hash(described: dict[str, Any]) -> str:
    return "-" + hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:10]


def draw_suffix(settings: FeatureSettings) -> str:
    """ "" for one-draw settings, else "-<10 hex digits of a hash of the draw settings>": where stores of other draws
    were made until issue 18 (see the module docstring), still read there."""
    draws = settings.draw_settings()
    return _short_hash(draws) if draws else ""


def settings_suffix(settings: FeatureSettings) -> str:
    """ "-<10 hex digits of a hash of every semantic setting but the name>": the folder of settings whose home holds
    stores of other settings."""
    described = {k: v for k, v in feature_description(settings).items() if k != "name"}
    return _short_hash(described)


def _held_settings(folder: Path) -> list[dict[str, Any]]:
    """The ``features`` sections of the stores under ``folder`` (one per key: train, val, ...)."""
    held = []
    for manifest in sorted(Path(folder).glob("*/manifest.json")):
        try:
            held.append(json.loads(manifest.read_text()).get("features"))
        except (OSError, ValueError):
            continue  # a damaged manifest is named when that store is opened, not here
    return held


def _suffix_in(parent: Path, name: str, settings: FeatureSettings) -> str:
    """The suffix of ``settings``'s folder among the feature sets ``<parent>/<name>*``."""
    described = json.loads(json.dumps(feature_description(settings)))  # as a manifest reads back
    legacy = draw_suffix(
        settings
    )  # where stores of other draws were made until the defaults moved (issue 18)
    if legacy and described in _held_settings(parent / (name + legacy)):
        return legacy
    held = _held_settings(parent / name)
    if not held or described in held:
        return ""
    return settings_suffix(settings)


def store_suffix(features_dir: Path, settings: FeatureSettings) -> str:
    """What follows ``settings.name`` in the folder of its stores under ``features_dir`` ("" for the plain folder):
    the attribute stage appends the same to the method's score folder, so scores of other settings coexist too."""
    return _suffix_in(Path(features_dir), settings.name, settings)


def store_folder(folder: Path, settings: FeatureSettings) -> Path:
    """Where the store of ``settings`` lives, given the folder of its feature set's name and key
    (``<features_dir>/<name>/<key>``): there, or in ``<name>-<hash>/<key>`` beside it (see the module docstring)."""
    folder = Path(folder)
    if not folder.parent.name:  # a bare relative folder: it is its own home
        return folder
    suffix = _suffix_in(folder.parent.parent, folder.parent.name, settings)
    if not suffix:
        return folder
    return folder.parent.with_name(folder.parent.name + suffix) / folder.name


def collect_features(
    unet: torch.nn.Module,
    alphas_cumprod: torch.Tensor,
    dataset: ImageDataset,
    checkpoint_id: str,
    folder: Path,
    settings: FeatureSettings,
    device: CollectionDevice = CollectionDevice(),
    logger: Any = None,
    unet_kwargs: dict[str, Any] | None = None,
    extra_inputs: Callable | None = None,
) -> FeatureStore:
    """Fill the store of ``settings`` at ``folder`` (or beside it, see :func:`store_folder`) with the features of
    every image of ``dataset``; resumes at missing rows. The returned store's ``folder`` says where it is."""
    gradients = make_gradients(unet, alphas_cumprod, settings, unet_kwargs)
    target = process_device(device.accelerator).type
    projector = make_projector(settings, gradients.num_parameters, target)
    manifest = feature_manifest(checkpoint_id, dataset, settings, gradients, projector)
    folder = store_folder(folder, settings)
    with exclusive_writer(folder):  # a second run on this store stops here instead of writing beside this one
        store = FeatureStore.open(folder, len(dataset), projector.dim, manifest, dtype=settings.dtype)
        pending = store.pending_indices()
        if pending.size == 0:
            log.info("features at %s are complete; reusing them", folder)
            return store
        log.info("collecting %d of %d rows into %s", pending.size, len(dataset), folder)
        module = ShardedPredictModule(unet, dataset, pending, settings.batch_size, settings.num_workers)
        collector = ProjectedGradientCollector(store, gradients, projector, dataset.set_name, extra_inputs)
        trainer = build_trainer(
            device,
            inference_mode=False,  # gradients are the point
            use_distributed_sampler=False,  # the module shards the pending rows itself, without padding
            logger=logger if logger is not None else False,
            callbacks=[collector],
        )
        trainer.predict(module, return_predictions=False)
        if trainer.world_size > 1:
            trainer.strategy.barrier()
    log.info("features: %.1f sample-timesteps/s on rank %d", collector.throughput, trainer.global_rank)
    return store
