"""Train one diffusion model (full set or an LDS subset), save it where later stages look, generate its queries."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from PIL import Image
from safetensors.torch import save_file
from typing_extensions import override

from das_lightning.artifacts import (
    DONE_MARKER,
    GENERATED_FILE,
    load_finished,
    regenerate_remedy,
    require_finished,
)
from das_lightning.data import ImageDataset
from das_lightning.data.datamodule import DiffusionDataModule
from das_lightning.data.subsets import lds_subset_indices, save_index_list
from das_lightning.distributed import build_trainer, is_global_zero, process_device
from das_lightning.errors import ConfigError, MissingArtifactError
from das_lightning.loggers import LoggerSettings, build_logger, finish_logger
from das_lightning.manifest import (
    CorruptArtifactError,
    atomic_folder,
    atomic_save,
    atomic_write_text,
    check_or_write_manifest,
    commit_file,
    file_record,
    hash_array,
    hash_file,
    verified_file,
)
from das_lightning.models.adapters import ModelAdapter
from das_lightning.models.ddpm import DiffusionModule, OptimizerSettings
from das_lightning.models.sampling import SamplerSettings, ddim_sample
from das_lightning.paths import RunPaths
from das_lightning.seeding import derive_seed
from das_lightning.viz import image_grid, log_images_to_wandb

log = logging.getLogger(__name__)


@dataclass
class SubsetSettings:
    """Which training images a model sees: all of them, or LDS subset ``index`` of size alpha*N."""

    kind: str = "full"  # full | lds | custom (explicit indices, e.g. a counterfactual retraining)
    index: int | None = None
    alpha: float = 0.5
    indices: list[int] | None = None  # kind=custom only
    seed_tag: str | None = (
        None  # training seed derived from this tag instead of the run's (counterfactuals: "full")
    )

    def validate(self) -> None:
        if self.kind not in {"full", "lds", "custom"}:
            raise ConfigError(f"subset.kind must be 'full' or 'lds', not {self.kind!r}")
        if self.kind == "custom" and not self.indices:
            raise ConfigError("subset.kind=custom needs a non-empty list of indices")
        if self.kind == "lds":
            if self.index is None or int(self.index) < 0:
                raise ConfigError(f"subset.index must be an integer >= 0 for subset=lds, got {self.index!r}")
            if not 0.0 < float(self.alpha) <= 1.0:
                raise ConfigError(f"subset.alpha must lie in (0, 1], got {self.alpha!r}")


@dataclass
class TrainSettings:
    batch_size: int = 64
    max_steps: int = 1000
    grad_clip: float = 1.0
    random_flip: bool = True
    num_workers: int = 0
    snapshot_every_n_steps: int = 0  # >0: keep weights every N steps for TracIn
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)

    def validate(self) -> None:
        """Refuse settings that would end in a Lightning or optimizer traceback later."""
        for key in ("max_steps", "batch_size"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"train.{key} must be a positive integer, got {getattr(self, key)}")
        if int(self.snapshot_every_n_steps) < 0 or int(self.num_workers) < 0:
            raise ConfigError("train.snapshot_every_n_steps and train.num_workers must be >= 0")
        if float(self.grad_clip) < 0:
            raise ConfigError(f"train.grad_clip must be >= 0 (0: no clipping), got {self.grad_clip}")
        if not float(self.optimizer.lr) > 0:
            raise ConfigError(f"train.optimizer.lr must be positive, got {self.optimizer.lr}")


@dataclass
class TrainerSettings:
    accelerator: str = "cpu"
    devices: int | str = 1
    strategy: str = "auto"
    precision: str = "32-true"
    num_nodes: int = 1
    enable_progress_bar: bool = True
    log_every_n_steps: int = 10


@dataclass
class GenerationSettings:
    num_images: int = 0
    batch_size: int = 64
    sampler: SamplerSettings = field(default_factory=SamplerSettings)


# How a run's training seed follows from its subset tag and seed r; recorded in every run manifest, and
# evaluate_lds.py refuses subset models made under another rule.
SEED_RULE = "subsets-share-seed-r"


def training_seed(tag: str, seed: int) -> int:
    """The seed of a run's initial weights, batch order, noise and timesteps (METHOD.md §3, D-TRAK's protocol).

    Every LDS subset model with training seed r gets the SAME seed, whatever its subset index (common random
    numbers: what differs between subset models is their data, which is what the LDS measures). The full model's
    seed is distinct from all of them (generated queries come from it; subset models sharing its initialisation
    would be rewarded for tracking that seed rather than the data). Other tags (a counterfactual retraining names
    the full model's tag) keep their own.
    """
    group = "lds-subset" if tag.startswith("lds-") else tag
    return derive_seed("train", group, seed) % (2**31)


def subset_indices(dataset: ImageDataset, subset: SubsetSettings) -> np.ndarray:
    subset.validate()
    if subset.kind == "full":
        return np.arange(len(dataset), dtype=np.int64)
    if subset.kind == "custom":
        indices = np.unique(np.asarray(subset.indices, dtype=np.int64))
        if indices[0] < 0 or indices[-1] >= len(dataset):
            raise ConfigError(f"custom subset indices must lie in [0, {len(dataset)})")
        return indices
    return lds_subset_indices(dataset.labels, float(subset.alpha), int(subset.index))


class SnapshotCallback(Callback):
    """Keeps the trained weights (``snapshot_state``: the whole UNet, or a LoRA run's adapters) and the learning rate
    every N steps (safetensors), for TracIn."""

    def __init__(self, folder: Path, every_n_steps: int):
        self.folder = Path(folder)
        self.every_n_steps = every_n_steps

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or not trainer.is_global_zero:
            return
        target = self.folder / f"step{step:07d}"
        target.mkdir(parents=True, exist_ok=True)
        state = pl_module.snapshot_state()
        atomic_save(target / "diffusion_pytorch_model.safetensors", lambda tmp: save_file(state, str(tmp)))
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        atomic_write_text(target / "snapshot.json", json.dumps({"step": step, "lr": lr}))


class CorruptCheckpointError(CorruptArtifactError):
    """A checkpoint that cannot be resumed from (truncated, not a checkpoint, or not weights-only loadable)."""


def _check_resumable(checkpoint: Path) -> None:
    """Fail with the file's name, not a traceback from deep inside Lightning, when a checkpoint is unreadable."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means the same thing to the user
        raise CorruptCheckpointError(
            f"cannot resume: checkpoint {checkpoint} is corrupt or not a checkpoint ({type(error).__name__}). "
            "Delete it to train from scratch."
        ) from error
    if "state_dict" not in state:
        raise RuntimeError(
            f"cannot resume: {checkpoint} holds no state_dict; delete it to train from scratch."
        )


def check_fits_unet(unet: torch.nn.Module, image_size: int) -> None:
    """A UNet2DModel halves the image at every down block but the last: the size must divide by that factor."""
    blocks = getattr(getattr(unet, "config", None), "block_out_channels", None)
    if blocks is None:
        return
    factor = 2 ** (len(blocks) - 1)
    if int(image_size) % factor:
        raise ConfigError(
            f"dataset.image_size={image_size} does not fit this UNet: its {len(blocks)} levels need a multiple of "
            f"{factor} (e.g. {max(factor, int(image_size) // factor * factor)})"
        )


def train_model(
    paths: RunPaths,
    unet_factory: Callable[[], torch.nn.Module],
    train_set: ImageDataset,
    subset: SubsetSettings,
    seed: int,
    train: TrainSettings,
    trainer_settings: TrainerSettings,
    logger_settings: LoggerSettings,
    generation: GenerationSettings,
    config: dict[str, Any],
    resume_from: Path | None = None,
    module_class: type[DiffusionModule] = DiffusionModule,
    module_kwargs: dict[str, Any] | None = None,
    adapter: ModelAdapter | None = None,
) -> RunPaths:
    """Train (or resume, or reuse) the model at ``paths`` and return where it lives.

    ``unet_factory`` is called after seeding, so the initial weights are a function of the run's training seed.
    ``adapter`` loads the saved model for generating queries (default: pixel DDPM; see ``model.adapter``).
    """
    train.validate()
    indices = subset_indices(train_set, subset)  # validates the subset before any work
    run_dir = paths.run_dir
    seed_for_run = training_seed(subset.seed_tag or paths.tag, seed)
    L.seed_everything(seed_for_run, workers=True, verbose=False)
    unet = unet_factory()
    if module_class is DiffusionModule:  # pixel DDPM: the images enter the UNet as they are
        check_fits_unet(unet, train_set.image_size)
    manifest = {
        "dataset": train_set.set_name,
        "num_train": len(train_set),
        "subset": paths.tag,
        "subset_alpha": subset.alpha if subset.kind == "lds" else len(indices) / len(train_set),
        "subset_hash": hash_array(indices),
        "unet_config": {k: v for k, v in dict(unet.config).items() if not k.startswith("_")},
        "seed": seed,
        "training_seed": seed_for_run,
        "seed_rule": SEED_RULE,
        "train": asdict(train),
    }
    if module_class is not DiffusionModule or module_kwargs:
        # other modules (LoRA rank, pretrained pipeline, VAE) make other models: keep their runs apart
        manifest["module"] = {"class": module_class.__qualname__, **(module_kwargs or {})}
    check_or_write_manifest(run_dir, manifest)
    save_index_list(
        paths.subset_path,
        indices,
        alpha=subset.alpha if subset.kind == "lds" else 1.0,
        index=subset.index if subset.kind == "lds" else -1,
        num_total=len(train_set),
    )
    atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2, sort_keys=True, default=str))

    # one logger for the run: training curves, then the grid of generated samples
    logger = build_logger(
        logger_settings,
        paths.run_dir,
        name=f"train/{paths.dataset}/{paths.tag}/seed{paths.seed}",
        config=config,
        group=f"{paths.dataset}/{paths.model}",
        job_type="train" if subset.kind == "full" else "subset",
    )
    try:
        if (paths.unet_dir / DONE_MARKER).exists():
            require_finished(paths)  # a damaged model is named here, not reused
            log.info("model at %s is complete; reusing it", paths.unet_dir)
        else:
            _fit(
                paths,
                unet,
                train_set,
                indices,
                seed_for_run,
                train,
                trainer_settings,
                logger,
                resume_from,
                module_class,
                module_kwargs,
            )
        if generation.num_images > 0 and is_global_zero():
            generate_queries(paths, generation, adapter or ModelAdapter(), list(train_set.class_names))
            with Image.open(paths.queries_dir / "generated_grid.png") as grid:
                log_images_to_wandb(
                    logger, "samples/generated", grid.copy(), caption="DDIM samples of this model"
                )
    finally:
        finish_logger(logger)
    return paths


@dataclass
class TrainingRecipe:
    """How the models of one experiment are trained: what the full model, its subset models and the
    counterfactual's retrainings share (the full model's recipe is its config.json; see cli.training_recipe)."""

    unet_factory: Callable[[], torch.nn.Module]
    train_set: ImageDataset
    seed: int
    train: TrainSettings
    trainer_settings: TrainerSettings
    logger_settings: LoggerSettings
    config: dict[str, Any]
    module_class: type[DiffusionModule] = DiffusionModule
    module_kwargs: dict[str, Any] | None = None
    adapter: ModelAdapter | None = None

    def run(
        self,
        paths: RunPaths,
        subset: SubsetSettings,
        generation: GenerationSettings | None = None,
        resume_from: Path | None = None,
    ) -> RunPaths:
        """Train (or resume, or reuse) the model of ``subset`` at ``paths`` with this recipe."""
        return train_model(
            paths=paths,
            unet_factory=self.unet_factory,
            train_set=self.train_set,
            subset=subset,
            seed=self.seed,
            train=self.train,
            trainer_settings=self.trainer_settings,
            logger_settings=self.logger_settings,
            generation=generation or GenerationSettings(),
            config=self.config,
            resume_from=resume_from,
            module_class=self.module_class,
            module_kwargs=self.module_kwargs,
            adapter=self.adapter,
        )


def _fit(
    paths: RunPaths,
    unet: torch.nn.Module,
    train_set: ImageDataset,
    indices: np.ndarray,
    seed_for_run: int,
    train: TrainSettings,
    trainer_settings: TrainerSettings,
    logger: Logger | None,
    resume_from: Path | None,
    module_class: type[DiffusionModule],
    module_kwargs: dict[str, Any] | None,
) -> None:
    optimizer = OptimizerSettings(**{**asdict(train.optimizer), "total_steps": train.max_steps})
    module = module_class(unet, optimizer, seed=seed_for_run, **(module_kwargs or {}))
    datamodule = DiffusionDataModule(
        dataset=module.prepare_training_set(train_set),
        subset_indices=indices,
        batch_size=train.batch_size,
        num_workers=train.num_workers,
        random_flip=train.random_flip,
        seed=seed_for_run,
    )
    checkpoint = ModelCheckpoint(
        dirpath=paths.checkpoint_path.parent,
        filename="last",
        save_top_k=0,
        save_last=True,
        every_n_train_steps=max(1, min(500, train.max_steps)),
        enable_version_counter=False,
    )
    callbacks: list[Callback] = [checkpoint]
    if trainer_settings.enable_progress_bar:
        callbacks.extend(step_progress_bar())
    if train.snapshot_every_n_steps > 0:
        callbacks.append(SnapshotCallback(paths.snapshots_dir, train.snapshot_every_n_steps))
    resume = Path(resume_from) if resume_from is not None else None
    if resume is not None and not resume.exists():
        raise MissingArtifactError(f"cannot resume: checkpoint {resume} does not exist")
    if resume is None and paths.checkpoint_path.exists():
        resume = paths.checkpoint_path
    if resume is not None:
        _check_resumable(resume)
        log.info("resuming from %s", resume)
    trainer = build_trainer(
        trainer_settings,
        max_steps=train.max_steps,
        gradient_clip_val=train.grad_clip,
        precision=trainer_settings.precision,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        default_root_dir=str(paths.run_dir),
        log_every_n_steps=trainer_settings.log_every_n_steps,
        enable_checkpointing=True,
        deterministic=False,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None, weights_only=True)
    if trainer.is_global_zero:
        save_finished_model(paths.unet_dir, module.save_trained, trainer.global_step)


def step_progress_bar() -> list[Callback]:
    """Training is bounded by steps, not epochs: the bar names the epoch and the step budget (Lightning's own
    reads "Epoch 3/-2" when only max_steps is set). Lightning's plain bar where rich is not installed."""
    from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE, RichProgressBar

    if not _RICH_AVAILABLE:
        return []

    class StepBudgetProgressBar(RichProgressBar):
        def _get_train_description(self, current_epoch: int) -> str:
            return f"Epoch {current_epoch} of a {self.trainer.max_steps}-step run"

    return [StepBudgetProgressBar()]


def save_finished_model(unet_dir: Path, save: Callable[[str], None], step: int) -> None:
    """Write the trained model into a staging folder, seal it (``DONE``: the size and checksum of every file),
    then rename it to ``unet_dir``: a kill at any moment leaves no model folder or a whole, sealed one."""
    with atomic_folder(unet_dir) as staging:
        save(str(staging))
        files = {
            path.relative_to(staging).as_posix(): file_record(path)
            for path in sorted(staging.rglob("*"))
            if path.is_file()
        }
        atomic_write_text(staging / DONE_MARKER, json.dumps({"step": int(step), "files": files}, indent=2))


def generate_queries(
    paths: RunPaths, generation: GenerationSettings, adapter: ModelAdapter, class_names: list[str]
) -> Path:
    """Generate (or reuse) the model's query images: ``queries/generated.safetensors`` (images in [-1, 1] and the
    class each was conditioned on) + a PNG grid. ``class_names``: the training set's, for conditioned models."""
    folder = paths.queries_dir
    model = load_finished(paths, adapter)
    manifest = {
        "num_images": generation.num_images,
        "model": hash_file(model.weights_file),
        "class_names": list(class_names) if model.num_classes else ["generated"],
        **generation.sampler.describe(),
    }
    check_or_write_manifest(folder, manifest)
    target = folder / GENERATED_FILE
    if verified_file(folder, GENERATED_FILE, regenerate_remedy(paths)) is not None:
        return target
    device = process_device("auto")
    generated = ddim_sample(
        model.to(device), generation.num_images, generation.sampler, generation.batch_size, device
    )
    grid = image_grid(generated.images[:64], nrow=8)
    atomic_save(folder / "generated_grid.png", grid.save)
    tensors = {"images": generated.images.contiguous(), "labels": generated.labels.contiguous()}
    commit_file(folder, GENERATED_FILE, lambda tmp: save_file(tensors, str(tmp)))
    return target
