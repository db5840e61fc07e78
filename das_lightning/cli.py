"""Turning composed Hydra configs into the typed settings the package takes (the package never sees a DictConfig).

Entry points call these; each returns plain dataclasses or objects."""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from das_lightning.data import build_dataset
from das_lightning.distributed import is_global_zero
from das_lightning.errors import UserError
from das_lightning.loggers import LoggerSettings
from das_lightning.models.ddpm import OptimizerSettings
from das_lightning.models.sampling import SamplerSettings
from das_lightning.paths import RunPaths
from das_lightning.training import (
    GenerationSettings,
    SubsetSettings,
    TrainerSettings,
    TrainingRecipe,
    TrainSettings,
)

T = TypeVar("T")
log = logging.getLogger("das_lightning")

# errors that are the user's to fix: one clear line, exit 2, no traceback (DAS_DEBUG=1 shows the traceback)
USER_ERRORS = (UserError,)  # das_lightning.errors: settings, missing/damaged/mismatched artifacts, NaNs


# a full disk, a full quota, a file-size limit: the user's to fix, not a bug
NO_ROOM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def user_errors_exit(main: Callable[..., T]) -> Callable[..., T]:
    """Report configuration/data errors as one message and a non-zero exit instead of a traceback."""

    @wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        from das_lightning.quiet import quiet_other_libraries

        quiet_other_libraries()
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as error:
            if os.environ.get("DAS_DEBUG"):
                raise
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        except OSError as error:
            if error.errno not in NO_ROOM_ERRNOS or os.environ.get("DAS_DEBUG"):
                raise
            # every file is written to a temporary name and renamed: nothing half-written was left in place
            where = f" writing {error.filename}" if error.filename else ""
            print(
                f"error: no room{where} ({error.strerror}): free disk space (or raise the file-size limit) and "
                "rerun the same command; finished work is kept and reused",
                file=sys.stderr,
            )
            sys.exit(2)

    return wrapper


def run_paths(cfg: DictConfig, tag: str | None = None, seed: int | None = None) -> RunPaths:
    return RunPaths(
        root=Path(cfg.paths.root),
        dataset=str(cfg.dataset.name),
        model=model_folder_name(cfg),
        tag=str(cfg.subset.tag) if tag is None else tag,
        seed=int(cfg.seed) if seed is None else seed,
    )


def model_folder_name(cfg: DictConfig) -> str:
    """``model.name``; for a model trained elsewhere also its weights' hash, so two folders never share artifacts."""
    from das_lightning.models.adapters import PretrainedAdapter

    adapter = model_adapter(cfg.model) if cfg.model.get("adapter") is not None else None
    if isinstance(adapter, PretrainedAdapter):
        from das_lightning.manifest import hash_file

        return f"{cfg.model.name}-{hash_file(adapter.weights_file())[:12]}"
    return str(cfg.model.name)


def dataset_from_config(cfg: DictConfig, split: str):
    data = to_plain(cfg.dataset)
    return build_dataset(
        name=data["name"],
        split=split,
        root=data.get("root"),
        image_size=int(data["image_size"]),
        classes=data.get("classes"),
        num_train=data.get("num_train"),
        download=bool(data.get("download", False)),
    )


def subset_settings(cfg: DictConfig) -> SubsetSettings:
    subset = to_plain(cfg.subset)
    return SubsetSettings(
        kind=subset["kind"], index=subset.get("index"), alpha=float(subset.get("alpha", 1.0))
    )


def train_settings(cfg: DictConfig) -> TrainSettings:
    train = to_plain(cfg.train)
    optimizer = train.pop("optimizer")
    optimizer["betas"] = tuple(optimizer["betas"])
    return TrainSettings(**train, optimizer=OptimizerSettings(**optimizer))


def trainer_settings(cfg: DictConfig) -> TrainerSettings:
    return TrainerSettings(**to_plain(cfg.trainer))


def logger_settings(cfg: DictConfig) -> LoggerSettings:
    return LoggerSettings(**to_plain(cfg.logger))


def generation_settings(cfg: DictConfig, enabled: bool = True) -> GenerationSettings:
    generate = to_plain(cfg.generate)
    return GenerationSettings(
        num_images=int(generate["num_images"]) if enabled else 0,
        batch_size=int(generate["batch_size"]),
        sampler=SamplerSettings(**generate["sampler"]),
    )


def method_settings(cfg: DictConfig):
    """The method's own settings class (das_lightning.attribution.settings), built from ``cfg.method``."""
    from das_lightning.attribution.methods import method_settings as build

    # features.param_pattern follows model.param_pattern (conf/method/features/)
    return build(to_plain(cfg.method))


def collection_device(cfg: DictConfig):
    from das_lightning.attribution.features import CollectionDevice

    trainer = to_plain(cfg.trainer)
    return CollectionDevice(
        accelerator=trainer["accelerator"],
        devices=trainer["devices"],
        strategy=trainer["strategy"],
        num_nodes=trainer.get("num_nodes", 1),
        enable_progress_bar=trainer.get("enable_progress_bar", True),
    )


def query_settings(cfg: DictConfig):
    from das_lightning.queries import QuerySettings

    return QuerySettings(**to_plain(cfg.queries))


def model_adapter(model_cfg: DictConfig):
    """How the measuring stages load and feed this model (``model.adapter``; default: pixel DDPM)."""
    import hydra

    from das_lightning.models.adapters import ModelAdapter

    node = model_cfg.get("adapter")
    return hydra.utils.instantiate(node, _convert_="all") if node is not None else ModelAdapter()


def module_settings(model_cfg: DictConfig) -> dict[str, Any]:
    """``train_model``'s module_class / module_kwargs / adapter from a model config (absent: pixel DDPM)."""
    import hydra

    settings: dict[str, Any] = {"adapter": model_adapter(model_cfg)}
    if model_cfg.get("module_class") is not None:
        settings["module_class"] = hydra.utils.get_class(str(model_cfg.module_class))
        settings["module_kwargs"] = (
            to_plain(model_cfg.module_kwargs) if model_cfg.get("module_kwargs") else {}
        )
    return settings


def attribution_inputs(cfg: DictConfig, paths: RunPaths, method):
    """The attribute stage's typed inputs from the config: the model's adapter, the training set and the query sets."""
    from das_lightning.attribution.inputs import load_attribution_inputs
    from das_lightning.attribution.methods import build_method
    from das_lightning.queries import build_query_sets

    return load_attribution_inputs(
        paths,
        model_adapter(cfg.model),
        dataset_from_config(cfg, split="train"),
        lambda: build_query_sets(query_settings(cfg), dataset_from_config(cfg, split="test"), paths),
        build_method(method),
        collection_device(cfg),
    )


def make_logger(cfg: DictConfig, save_dir: Path, name: str, job_type: str):
    from das_lightning.loggers import build_logger

    paths = run_paths(cfg)
    return build_logger(
        logger_settings(cfg),
        save_dir,
        name=name,
        config=to_plain(cfg),
        group=f"{paths.dataset}/{paths.model}",
        job_type=job_type,
    )


def close_logger(logger) -> None:
    from das_lightning.loggers import finish_logger

    finish_logger(logger)


def run_lds(cfg: DictConfig):
    """evaluate_lds.py mode=lds: compose the typed inputs and run the LDS stage; returns the report."""
    from das_lightning.evaluation.pipeline import LDSSettings, evaluate
    from das_lightning.queries import build_query_sets

    settings = LDSSettings(**to_plain(cfg.lds))
    settings.validate()  # a typo in lds.* is named before any artifact is looked for
    if cfg.get("plan"):
        return run_lds_plan(cfg, settings)
    if cfg.get("bundle") is not None:  # an LDS against a bundle: nothing trained, loaded or measured
        return run_bundle_lds(cfg)
    paths = run_paths(cfg)
    train_set = dataset_from_config(cfg, split="train")
    query_sets = build_query_sets(query_settings(cfg), dataset_from_config(cfg, split="test"), paths)
    logger = make_logger(cfg, paths.lds_results_dir, name="evaluate_lds", job_type="evaluate")
    try:
        report = evaluate(
            paths,
            train_set,
            query_sets,
            list(cfg.methods),
            [tuple(pair) for pair in cfg.pairs],
            settings,
            collection_device(cfg),
            logger,
            adapter=model_adapter(cfg.model),
        )
    finally:
        close_logger(logger)
    if is_global_zero():
        print(report.table)
        print(f"\nwritten: {paths.lds_results_dir}/lds.json, lds.md, lds_vs_lambda_*.png")
    if cfg.get("export_bundle") is not None and is_global_zero():
        export_lds_bundle(cfg, paths, train_set, query_sets, settings, report)
    return report


def run_counterfactual(cfg: DictConfig) -> None:
    """evaluate_lds.py mode=counterfactual: retrain without top-k proponents with the full model's own recipe."""
    import json

    from omegaconf import OmegaConf

    from das_lightning.artifacts import require_trained_on
    from das_lightning.evaluation.counterfactual import CounterfactualSettings, counterfactual

    paths = run_paths(cfg)
    train_set = dataset_from_config(cfg, split="train")
    require_trained_on(paths, train_set)
    # the full model's own config: the retrainings follow its recipe, placed by this run's trainer and logger
    recipe = OmegaConf.create(json.loads((paths.run_dir / "config.json").read_text()))
    result = counterfactual(
        paths,
        CounterfactualSettings(**to_plain(cfg.counterfactual)),
        training_recipe(recipe, cfg, train_set),
    )
    print(
        f"counterfactual ({result.method}): median pixel L2 after removing top proponents "
        f"{result.median_l2_top:.3f} vs random removal {result.median_l2_random:.3f}"
    )
    if result.median_clip_cosine_top is None:
        print(
            "  CLIP cosine: skipped (no CLIP model in the local Hugging Face cache; see counterfactual.clip_model)"
        )
    else:
        print(
            f"  median CLIP cosine: top {result.median_clip_cosine_top:.3f}, random {result.median_clip_cosine_random:.3f}"
        )


def training_recipe(recipe: DictConfig, cfg: DictConfig, train_set) -> TrainingRecipe:
    """The typed recipe of a run's composed config ``recipe`` (the full model's, for retrainings), on the trainer and
    logger of ``cfg`` (this command's)."""
    import hydra

    return TrainingRecipe(
        unet_factory=lambda: hydra.utils.instantiate(recipe.model.unet),
        train_set=train_set,
        seed=int(recipe.seed),
        train=train_settings(recipe),
        trainer_settings=trainer_settings(cfg),
        logger_settings=logger_settings(cfg),
        config=to_plain(recipe),
        **module_settings(recipe.model),
    )


def run_train(cfg: DictConfig) -> RunPaths:
    """train.py: train (or resume, or reuse) one model and generate its queries."""
    subset = subset_settings(cfg)
    subset.validate()  # refuse a bad subset before loading anything
    if cfg.get("plan"):
        return run_train_plan(cfg, subset)
    recipe = training_recipe(cfg, cfg, dataset_from_config(cfg, split="train"))
    paths = recipe.run(
        run_paths(cfg),
        subset,
        generation_settings(cfg, enabled=subset.kind == "full"),
        resume_from=cfg.resume_from,
    )
    print(f"model: {paths.unet_dir}")
    return paths


def run_attribute(cfg: DictConfig):
    """attribute.py: features, then scores of one method for every query set."""
    from das_lightning.attribution.ensemble import EnsembleSettings, ensemble_members
    from das_lightning.attribution.features import store_suffix
    from das_lightning.attribution.pipeline import attribute, validate_method

    method = method_settings(cfg)
    ensemble = EnsembleSettings(**to_plain(cfg.ensemble)) if cfg.get("ensemble") else EnsembleSettings()
    ensemble.validate()
    validate_method(method, ensemble.active)  # before the model is loaded or any feature is computed
    if ensemble.active:  # the ensemble's scores are a method of their own in the score folders and the LDS
        method = replace(method, name=ensemble.scores_name(method.name))
    if method.features is not None:
        # other feature settings are other scores: the score folder (and LDS name) takes the suffix of the folder
        # their features live in (features.store_suffix: "" for the plain store), so both coexist with today's
        suffix = store_suffix(attribute_features_dir(cfg), method.features)
        method = replace(method, name=method.name + suffix)
    if cfg.get("plan"):
        return run_attribute_plan(cfg, method)
    if cfg.get("bundle") is not None:  # a bundle's model and queries: nothing trained or generated here
        return run_bundle_attribute(cfg, method, ensemble.active)
    paths = run_paths(cfg)
    inputs = attribution_inputs(cfg, paths, method)
    members = ensemble_members(inputs, paths, ensemble, model_adapter(cfg.model)) if ensemble.active else None
    logger = make_logger(cfg, paths.scores_dir, name=f"attribute/{method.name}", job_type="attribute")
    try:
        result = attribute(inputs, method, collection_device(cfg), logger, members)
    finally:
        close_logger(logger)
    if is_global_zero():
        print(f"method {result.method}:  (score folder {paths.scores_dir / result.method})")
        for query_set, folder in result.folders.items():
            chosen = result.chosen[query_set]
            picked = "" if chosen is None else f" (pictures at c = {chosen.scale:g}, from {chosen.source})"
            print(f"  {query_set}: {folder}/scores.npy, topk.json, grid.png{picked}")
    return result


def attribute_features_dir(cfg: DictConfig) -> Path:
    """Where attribute.py keeps this run's feature stores (a bundle's model folder with ``bundle=``)."""
    if cfg.get("bundle") is not None:
        from das_lightning.evaluation.bundle import bundle_run_paths, load_bundle

        return bundle_run_paths(load_bundle(Path(cfg.bundle)), Path(cfg.paths.root)).features_dir
    return run_paths(cfg).features_dir


# ------------------------------------------------------------------------------------------------ plan=true


def plan_inputs(cfg: DictConfig, features=None):
    """(training set size, query set sizes, network figures or None, free resources) for a plan, from the config:
    nothing is loaded, computed or written (das_lightning/plan.py)."""
    import hydra

    from das_lightning import plan
    from das_lightning.data.registry import DATASETS
    from das_lightning.models.adapters import PretrainedAdapter

    resources = plan.machine_resources(Path(cfg.paths.root), str(cfg.trainer.accelerator))
    registry = DATASETS.get(str(cfg.dataset.name))
    fallback = cfg.dataset.get("num_train") or (registry.num_train if registry else None)
    num_train = plan.dataset_size(
        lambda: dataset_from_config(cfg, split="train"), fallback, str(cfg.dataset.name)
    )
    queries = to_plain(cfg.queries) if cfg.get("queries") else {"sets": []}
    counts = {"val": queries.get("num_val"), "generated": queries.get("num_generated")}
    query_sizes = {name: counts.get(name) for name in queries["sets"]}  # files: counted when read
    adapter = model_adapter(cfg.model) if cfg.model.get("adapter") is not None else None
    if isinstance(adapter, PretrainedAdapter):
        from diffusers import UNet2DModel

        factory = lambda: UNet2DModel.from_config(adapter.unet_config())  # noqa: E731
    elif cfg.model.get("unet") is not None and cfg.model.get("module_class") is None:
        factory = lambda: hydra.utils.instantiate(cfg.model.unet)  # noqa: E731
    else:  # a network built around a pretrained pipeline (LoRA, latent): not without its weights
        factory = None
    image_shape = (int(cfg.dataset.channels), int(cfg.dataset.image_size), int(cfg.dataset.image_size))
    network = (
        None
        if factory is None
        else plan.network_figures(factory, features, image_shape, resources.free_memory)
    )
    return num_train, query_sizes, network, resources


def run_attribute_plan(cfg: DictConfig, method):
    """attribute.py plan=true: print what the stage would compute and store, and exit."""
    from das_lightning.plan import attribute_plan

    num_train, query_sizes, network, resources = plan_inputs(cfg, method.features)
    device = f"{cfg.trainer.accelerator} x {cfg.trainer.devices}"
    result = attribute_plan(method, num_train, query_sizes, run_paths(cfg), network, resources, device)
    print(result)
    return result


def run_lds_plan(cfg: DictConfig, settings):
    """evaluate_lds.py plan=true: subset models, ground-truth passes, caches; nothing is looked for or written."""
    from das_lightning.manifest import read_manifest
    from das_lightning.plan import evaluate_plan

    num_train, query_sizes, _, resources = plan_inputs(cfg)
    paths = run_paths(cfg)
    methods = {}
    # rows of each method's scores.npy, from its manifest (a small JSON) when it exists
    for method in map(str, cfg.methods):
        folders = [paths.scores_dir / method / name for name in query_sizes]
        manifest = next((read_manifest(f) for f in folders if (f / "manifest.json").exists()), None)
        methods[method] = None if manifest is None else len(manifest.get("lambda_scales") or [None])
    train = cfg.get("train")
    result = evaluate_plan(
        settings.num_subsets,
        settings.seeds,
        settings.timesteps,
        settings.e_seeds,
        settings.pair_batch_size,
        methods,
        num_train,
        query_sizes,
        paths,
        resources,
        train_steps=int(train.max_steps) if train is not None else None,
    )
    print(result)
    return result


def run_train_plan(cfg: DictConfig, subset: SubsetSettings):
    """train.py plan=true: the model, its steps and files, and the LDS's subset models when the config has them."""
    from das_lightning.plan import train_plan

    num_train, _, network, resources = plan_inputs(cfg)
    size = num_train.count
    if size is not None and subset.kind == "lds":
        size = int(round(subset.alpha * size))
    lds = cfg.get("lds")
    train = to_plain(cfg.train)
    result = train_plan(
        network,
        run_paths(cfg).tag,
        size,
        int(train["max_steps"]),
        int(train["batch_size"]),
        int(train.get("snapshot_every_n_steps") or 0),
        train["optimizer"].get("ema_decay") is not None,
        int(cfg.generate.num_images) if subset.kind == "full" else 0,
        (int(lds.num_subsets), len(lds.seeds)) if lds is not None else None,
        run_paths(cfg),
        resources,
    )
    print(result)
    return result


# ------------------------------------------------------------------------------------------- LDS bundles


def run_bundle_lds(cfg: DictConfig):
    """evaluate_lds.py bundle=PATH [scores=FILE]: your scores against a bundle, or without scores the bundle's
    recorded table recomputed from its files."""
    from das_lightning.evaluation.bundle import evaluate_scores, load_bundle, reproduce_recorded

    bundle = load_bundle(Path(cfg.bundle))
    if cfg.get("scores") is None:
        report = reproduce_recorded(bundle)
    else:  # named after the file (or score folder), marked "(yours)" if the bundle records that name
        report = evaluate_scores(bundle, Path(cfg.scores))
    print(report.table)
    return report


def export_lds_bundle(cfg: DictConfig, paths: RunPaths, train_set, query_sets, settings, report) -> Path:
    """evaluate_lds.py export_bundle=PATH: the bundle of the LDS just reported."""
    from das_lightning.evaluation.bundle import export_bundle

    target = export_bundle(
        Path(cfg.export_bundle),
        paths,
        train_set,
        query_sets,
        settings,
        report,
        to_plain(cfg.dataset),
        dataset_from_config(cfg, split="test"),
        collection_device(cfg),
        model_adapter(cfg.model),
    )
    print(f"bundle: {target}")
    return target


def run_bundle_attribute(cfg: DictConfig, method, ensemble: bool):
    """attribute.py bundle=PATH method=...: scores against a bundle's model and queries, under paths.root."""
    from das_lightning.attribution.pipeline import attribute
    from das_lightning.evaluation.bundle import bundle_attribution

    if ensemble:
        raise UserError("an ensemble needs several trained models and a bundle carries one; drop ensemble.*")
    data = to_plain(cfg.dataset)
    paths, inputs = bundle_attribution(
        Path(cfg.bundle), Path(cfg.paths.root), method, data.get("root"), bool(data.get("download", False))
    )
    logger = make_logger(cfg, paths.scores_dir, name=f"attribute/{method.name}", job_type="attribute")
    try:
        result = attribute(inputs, method, collection_device(cfg), logger)
    finally:
        close_logger(logger)
    if is_global_zero():
        for query_set, folder in result.folders.items():
            print(f"method {result.method}, {query_set}: {folder}/scores.npy")
        scores = paths.scores_dir / method.name
        print(f"evaluate them with: python evaluate_lds.py bundle={cfg.bundle} scores={scores}")
    return result
