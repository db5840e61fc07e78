"""The LDS stage (METHOD.md §3): find the subset models, measure their ground truth on the queries, score every
method's attributions against it, and write ``lds.json``, a Markdown table and a plot of LDS against lambda."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from das_lightning.artifacts import DONE_MARKER, load_finished, require_finished, retrain_remedy
from das_lightning.attribution.features import CollectionDevice
from das_lightning.attribution.pipeline import load_scores, scores_by_scale
from das_lightning.data import ImageDataset, content_entry, load_index_record
from das_lightning.diffusion import (
    DEFAULT_GROUND_TRUTH_NOISE,
    LEGACY_GROUND_TRUTH_NOISE,
    NUM_TRAIN_TIMESTEPS,
    check_noise_stream,
)
from das_lightning.distributed import build_trainer, is_global_zero
from das_lightning.errors import ConfigError, MissingArtifactError
from das_lightning.evaluation.ground_truth import (
    GroundTruthModule,
    LossPredictionWriter,
    cached_query_losses,
    gather_predictions,
    ground_truth_manifest,
    read_prediction_files,
)
from das_lightning.evaluation.intervals import check_subset_count
from das_lightning.evaluation.lambda_selection import (
    HELDOUT_MODES,
    SELECTION_CRITERIA,
    heldout_halves,
    lds_by_lambda,
    seed_subset_rows,
    subset_rows,
)
from das_lightning.evaluation.lds_report import (
    LDSRecord,
    PairedDifference,
    SharedFactorRecord,
    evaluate_method,
    markdown_table,
    paired_difference,
    plot_lds_vs_lambda,
    shared_factor_records,
    snr_table,
)
from das_lightning.evaluation.snr_lds import DEFAULT_SNR_RULE, check_rule, snr_row
from das_lightning.manifest import (
    CorruptArtifactError,
    ManifestMismatchError,
    atomic_write_text,
    hash_array,
    hash_file,
    read_manifest,
)
from das_lightning.models.adapters import ModelAdapter, dataset_extra
from das_lightning.paths import RunPaths, subset_tag
from das_lightning.selection import lds_json_path, write_lds_json
from das_lightning.training import SEED_RULE

log = logging.getLogger(__name__)


@dataclass
class LDSSettings:
    num_subsets: int = 32
    alpha: float = 0.5
    seeds: list[int] = field(default_factory=lambda: [0])  # R training runs per subset
    timestep_stride: int = 1  # ground truth on range(0, 1000, stride): 1 = all 1000 timesteps
    e_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    query_batch_size: int = 16
    pair_batch_size: int = 512
    num_resamples: int = 1000
    bootstrap_seed: int = 0
    heldout: str = "queries"  # queries | queries_and_subsets (see evaluation.lambda_selection.HeldoutHalves)
    snr_zeta: float | None = (
        None  # also report SNR-LDS (evaluation/snr_lds.py) at this zeta; NOT comparable with the LDS
    )
    snr_rule: str = DEFAULT_SNR_RULE  # author | stored: what SNR-LDS fits (evaluation/snr_lds.py)
    noise: str = DEFAULT_GROUND_TRUTH_NOISE  # the ground truth's noise: disjoint | coupled (diffusion.py)
    selection: str = "plain"  # plain | centred: which LDS chooses c (evaluation/lambda_selection.py)

    @property
    def timesteps(self) -> list[int]:
        return list(range(0, NUM_TRAIN_TIMESTEPS, self.timestep_stride))

    def validate(self) -> None:
        """Every check of ``lds.*``, before any artifact is looked for."""
        if self.heldout not in HELDOUT_MODES:
            raise ConfigError(f"lds.heldout must be one of {list(HELDOUT_MODES)}, not {self.heldout!r}")
        if int(self.num_subsets) < 2:
            raise ConfigError(f"lds.num_subsets must be at least 2, got {self.num_subsets}")
        if self.heldout == "queries_and_subsets" and int(self.num_subsets) < 4:
            raise ConfigError(
                f"lds.heldout=queries_and_subsets needs at least 4 subsets, got {self.num_subsets}"
            )
        if not 0.0 < float(self.alpha) < 1.0:
            raise ConfigError(
                f"lds.alpha is the fraction of the training set kept, in (0, 1): got {self.alpha}"
            )
        if not self.seeds or not self.e_seeds:
            raise ConfigError("lds.seeds and lds.e_seeds need at least one value each")
        if not 1 <= int(self.timestep_stride) <= NUM_TRAIN_TIMESTEPS:
            raise ConfigError(
                f"lds.timestep_stride must be in [1, {NUM_TRAIN_TIMESTEPS}], got {self.timestep_stride}"
            )
        check_noise_stream(self.noise)  # names the allowed values
        if self.selection not in SELECTION_CRITERIA:
            raise ConfigError(
                f"lds.selection must be one of {list(SELECTION_CRITERIA)}, not {self.selection!r}"
            )
        if self.snr_zeta is not None and float(self.snr_zeta) <= 0:
            raise ConfigError(f"lds.snr_zeta must be positive (the paper's is 3), got {self.snr_zeta}")
        check_rule(self.snr_rule)
        for key in ("query_batch_size", "pair_batch_size", "num_resamples"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"lds.{key} must be a positive integer, got {getattr(self, key)}")


class MissingSubsetModelsError(MissingArtifactError):
    pass


def subset_models(
    paths: RunPaths, settings: LDSSettings, num_train: int
) -> tuple[np.ndarray, list[list[RunPaths]]]:
    """(masks subsets x train, model paths per subset); names every missing model before any work."""
    masks = np.zeros((settings.num_subsets, num_train), dtype=bool)
    runs: list[list[RunPaths]] = []
    missing: list[str] = []
    other_rule: list[str] = []
    for k in range(settings.num_subsets):
        runs.append([])
        for seed in settings.seeds:
            run = paths.sibling(subset_tag("lds", k), seed)
            if not (run.unet_dir / DONE_MARKER).exists() or not run.subset_path.exists():
                missing.append(f"{k} (seed {seed})")
                continue
            if (read_manifest(run.run_dir) or {}).get("seed_rule") != SEED_RULE:
                other_rule.append(str(run.run_dir))
            runs[-1].append(run)
        if runs[-1]:
            record = load_index_record(runs[-1][0].subset_path)
            if record.get("N") != num_train or abs(float(record.get("alpha") or 0) - settings.alpha) > 1e-9:
                raise ManifestMismatchError(
                    runs[-1][0].subset_path,
                    {"N/alpha": ((record.get("N"), record.get("alpha")), (num_train, settings.alpha))},
                )
            # the run's manifest pins its index list: a damaged subset.json must not change the mask quietly
            pinned = (read_manifest(runs[-1][0].run_dir) or {}).get("subset_hash")
            if pinned is not None and hash_array(record["indices"]) != pinned:
                raise CorruptArtifactError(
                    f"{runs[-1][0].subset_path} is damaged: its indices do not match the subset_hash of "
                    f"{runs[-1][0].run_dir / 'manifest.json'}: {retrain_remedy(runs[-1][0])}"
                )
            masks[k, record["indices"]] = True
    if other_rule:
        # subset models of one training seed must share it (common random numbers); mixing rules breaks that
        raise ManifestMismatchError(
            Path(other_rule[0]).parent.parent,
            {
                "seed_rule": (
                    f"another rule in {len(other_rule)} subset models, e.g. {', '.join(other_rule[:3])}",
                    SEED_RULE,
                )
            },
        )
    if missing:
        indices = sorted({int(m.split()[0]) for m in missing})
        raise MissingSubsetModelsError(
            f"{len(missing)} subset models are missing: subset index {', '.join(missing[:20])}"
            f"{' ...' if len(missing) > 20 else ''}. Train them with\n  python train.py -m subset=lds "
            f"subset.index={','.join(map(str, indices))} seed={','.join(map(str, settings.seeds))}"
        )
    return masks, runs


def model_losses(
    run: RunPaths,
    queries: ImageDataset,
    settings: LDSSettings,
    device: CollectionDevice,
    adapter: ModelAdapter | None = None,
) -> torch.Tensor:
    """Ground truth of one subset model on one query set, cached beside the LDS results (predict loop, DDP-ready).

    ``adapter`` says how the model is loaded and fed (default: pixel DDPM); latent models see the queries' latents.
    """
    adapter = adapter or ModelAdapter()
    require_finished(run)  # damaged weights are named here, before their hash keys the cache
    weights = adapter.weights_file(run.unet_dir)
    manifest = ground_truth_manifest(
        hash_file(weights),
        queries.set_name,
        list(range(len(queries))),
        settings.timesteps,
        settings.e_seeds,
        noise=settings.noise,
        **content_entry(queries),
    )
    # each noise stream has its own cache, so a root keeps both: coupled in the folder every cache had before
    # lds.noise existed (those still read), disjoint beside it
    stream = "" if settings.noise == LEGACY_GROUND_TRUTH_NOISE else f"~noise-{settings.noise}"
    cache = (
        run.lds_dir
        / "ground_truth"
        / f"{run.tag}-seed{run.seed}"
        / (queries.set_name.replace("/", "_") + stream)
    )

    def compute() -> torch.Tensor:
        model = load_finished(run, adapter)
        inputs = model.model_space(queries)  # same set name and indices: the noise keys of lds.noise's stream
        module = GroundTruthModule(
            model.network,
            model.alphas_cumprod,
            settings.timesteps,
            settings.e_seeds,
            queries.set_name,
            settings.pair_batch_size,
            extra=dataset_extra(model.extra_inputs, inputs),
            noise=settings.noise,
        )
        # one folder every rank can see (a per-process temporary folder would hide the other ranks' rows); it
        # lives inside the manifest-checked cache, so rows left by an interrupted run are rows of this same model
        scratch = cache / "ranks"
        trainer = build_trainer(device, callbacks=[LossPredictionWriter(scratch)])
        loader = DataLoader(inputs, batch_size=settings.query_batch_size, shuffle=False)
        trainer.predict(module, loader, return_predictions=False)
        trainer.strategy.barrier()  # every rank's rows are on disk
        losses = gather_predictions(
            read_prediction_files(scratch, trainer.world_size), list(range(len(queries)))
        )
        trainer.strategy.barrier()  # every rank has read them
        if is_global_zero():
            shutil.rmtree(scratch, ignore_errors=True)
        return losses

    cache.parent.mkdir(parents=True, exist_ok=True)
    return cached_query_losses(cache, manifest, compute)


def ground_truth(
    runs: list[list[RunPaths]],
    queries: ImageDataset,
    settings: LDSSettings,
    device: CollectionDevice,
    adapter: ModelAdapter | None = None,
) -> np.ndarray:
    """seeds x subsets x queries (R x M x Q): the loss of subset k's model of training seed r on each query. The
    LDS uses their mean over seeds (METHOD.md §3); the intervals and the per-seed values use each seed."""
    losses = np.zeros((len(settings.seeds), len(runs), len(queries)), dtype=np.float64)
    for k, seeds in enumerate(runs):
        for r, run in enumerate(seeds):  # subset_models found one run per seed of settings.seeds, in order
            losses[r, k] = model_losses(run, queries, settings, device, adapter).numpy()
        log.info("ground truth: subset %d of %d done for %s", k + 1, len(runs), queries.set_name)
    return losses


def method_scores(
    scores_dir: Path, method: str, query_set: str, queries: ImageDataset, train_set: ImageDataset
) -> tuple[dict[float | None, np.ndarray], float | None, list[dict[str, Any]]]:
    """({c: queries x train}, lambda unit, ensemble members) of a method, refusing scores made for another training
    set or query list, or on the old absolute lambda grid; a method with no score folder is named with those that
    have one."""
    if not (scores_dir / method).is_dir():
        present = (
            sorted(path.name for path in scores_dir.glob("*") if path.is_dir()) if scores_dir.is_dir() else []
        )
        raise MissingArtifactError(
            f"method {method!r} has no scores for this model (looked in {scores_dir}); "
            f"scored here: {', '.join(present) or 'none'}. Run `python attribute.py method={method}` first, "
            "or fix the name in methods=[...]"
        )
    stacked, manifest = load_scores(scores_dir / method / query_set)
    expected = {
        "train_set": train_set.set_name,
        "num_train": len(train_set),
        "query_set": queries.set_name,
        "num_queries": len(queries),
        **content_entry(queries),
    }
    differences = {
        key: (manifest.get(key), value) for key, value in expected.items() if manifest.get(key) != value
    }
    if differences:
        raise ManifestMismatchError(scores_dir / method / query_set, differences)
    if "lambda_scales" not in manifest:
        raise ManifestMismatchError(
            scores_dir / method / query_set,
            {"lambda_scales": (None, "c x trace(K)/N")},
        )
    unit = float(manifest["lambda_unit"]) if manifest["lambda_scales"] else None
    return scores_by_scale(stacked, manifest), unit, manifest.get("ensemble") or []


@dataclass
class LDSReport:
    records: list[LDSRecord]
    differences: list[PairedDifference]
    curves: dict[str, dict[str, dict[float, float]]]
    table: str
    snr: list[dict[str, Any]] = field(default_factory=list)  # SNR-LDS rows (lds.snr_zeta), apart from the LDS
    # per query set: the factor share and the query-agnostic ceiling (evaluation/shared_factor.py)
    shared: list[SharedFactorRecord] = field(default_factory=list)


def evaluate(
    paths: RunPaths,
    train_set: ImageDataset,
    query_sets: dict[str, ImageDataset],
    methods: list[str],
    pairs: list[tuple[str, str]],
    settings: LDSSettings,
    device: CollectionDevice = CollectionDevice(),
    logger: Any = None,
    adapter: ModelAdapter | None = None,
) -> LDSReport:
    """LDS of every method on every query set, with held-out and oracle lambda, CIs and paired differences.

    ``adapter`` (from the model config) loads and feeds the subset models; default: pixel DDPM."""
    settings.validate()
    # read every score matrix first: a typo or a mismatch should stop us before the subset models are looked for
    scores = {
        (method, name): method_scores(paths.scores_dir, method, name, queries, train_set)
        for name, queries in query_sets.items()
        for method in methods
    }
    masks, runs = subset_models(paths, settings, len(train_set))
    records: list[LDSRecord] = []
    differences: list[PairedDifference] = []
    curves: dict[str, dict[str, dict[float, float]]] = {}
    snr: list[dict[str, Any]] = []
    shared: list[SharedFactorRecord] = []
    for name, queries in query_sets.items():
        losses_by_seed = ground_truth(runs, queries, settings, device, adapter)  # seeds x subsets x queries
        losses = losses_by_seed.mean(0)  # subsets x queries: the LDS's ground truth
        check_subset_count(len(losses))  # warns (and the table says so) below the count a Spearman needs
        halves = heldout_halves(len(queries), len(losses), settings.heldout, seed=settings.bootstrap_seed)
        report_masks, report_losses = subset_rows(masks, losses, halves.report_subsets)
        shared += shared_factor_records(
            name, losses_by_seed, halves, settings.num_resamples, settings.bootstrap_seed
        )
        chosen: dict[str, np.ndarray] = {}
        for method in methods:
            by_lambda, unit, members = scores[(method, name)]
            heldout, oracle = evaluate_method(
                by_lambda,
                masks,
                losses,
                method,
                name,
                settings.num_resamples,
                settings.bootstrap_seed,
                lambda_unit=unit,
                heldout=settings.heldout,
                members=members,
                losses_by_seed=losses_by_seed,
                selection=settings.selection,
            )
            records += [heldout, oracle]
            if None not in by_lambda:
                curves.setdefault(name, {})[method] = lds_by_lambda(by_lambda, masks, losses)
            chosen[method] = by_lambda[heldout.lambda_]  # the c the held-out half selected
        if settings.snr_zeta is not None:  # each method at its held-out c, on every query and subset
            held_out = {
                r.method: r.lambda_
                for r in records
                if r.query_set == name and r.lambda_selection == "heldout"
            }
            for method in methods:  # under lds.snr_rule=author, fitted on the signed scores of its readout
                snr.append(
                    snr_row(
                        paths.scores_dir,
                        method,
                        name,
                        held_out[method],
                        chosen[method],
                        masks,
                        losses,
                        float(settings.snr_zeta),
                        settings.snr_rule,
                    )
                )
        for a, b in pairs:
            if a in chosen and b in chosen:
                # each method at its held-out lambda, compared on the report half (queries, and subsets)
                differences.append(
                    paired_difference(
                        a,
                        chosen[a],
                        b,
                        chosen[b],
                        report_masks,
                        report_losses,
                        name,
                        settings.num_resamples,
                        settings.bootstrap_seed,
                        query_indices=halves.report_queries,
                        losses_by_seed=seed_subset_rows(losses_by_seed, halves.report_subsets),
                    )
                )
    table = markdown_table(records, differences, shared) + snr_table(snr)
    if not is_global_zero():  # under DDP every rank computed the same report; one writes it
        return LDSReport(records, differences, curves, table, snr, shared)
    out = paths.lds_results_dir
    write_lds_json(
        lds_json_path(paths),
        [record.to_json() for record in records],
        [difference.to_json() for difference in differences],
        {
            "num_subsets": settings.num_subsets,
            "seeds": settings.seeds,
            "alpha": settings.alpha,
            "timestep_stride": settings.timestep_stride,
            "e_seeds": settings.e_seeds,
            "train_set": train_set.set_name,
            "heldout": settings.heldout,
            "seed_rule": SEED_RULE,
            **({"snr_lds": snr} if snr else {}),
            "noise": settings.noise,
            "selection": settings.selection,
            "shared_factor": [row.to_json() for row in shared],
        },
    )
    atomic_write_text(out / "lds.md", table + "\n")
    for name, by_method in curves.items():
        selected = {
            r.method: r.lambda_
            for r in records
            if r.query_set == name and r.lambda_selection == "heldout" and r.lambda_ is not None
        }
        plot_lds_vs_lambda(by_method, out / f"lds_vs_lambda_{name}.png", selected)
    _log(logger, records, out, curves)
    return LDSReport(records, differences, curves, table, snr, shared)


def _log(logger: Any, records: list[LDSRecord], out: Path, curves: dict) -> None:
    from PIL import Image

    from das_lightning.viz import log_images_to_wandb, log_table

    rows = [
        [
            r.method,
            r.query_set,
            r.lambda_selection,
            r.lambda_,
            r.lambda_absolute,
            r.lds,
            r.ci_low,
            r.ci_high,
            r.centred,
            r.centred_ci_low,
            r.centred_ci_high,
            r.query_averaged,
            r.damping_dominated,
        ]
        for r in records
    ]
    columns = ["method", "query_set", "selection", "lambda_scale", "lambda", "lds", "ci_low", "ci_high"]
    columns += ["centred", "centred_ci_low", "centred_ci_high", "query_averaged", "damping_dominated"]
    log_table(logger, "lds/table", columns, rows)
    for name in curves:
        with Image.open(out / f"lds_vs_lambda_{name}.png") as plot:
            log_images_to_wandb(logger, f"lds/lds_vs_lambda/{name}", plot.copy())


def records_json(report: LDSReport) -> str:
    return json.dumps([record.to_json() for record in report.records], indent=2)
