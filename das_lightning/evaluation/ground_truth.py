"""LDS ground truth (METHOD.md §3, step 3): the loss of a subset model on each query.

L(q) = mean over e_seeds and over a timestep grid of L_simple(q, t, eps), with eps keyed by the query's identity
(set_name, dataset index, t, e_seed) under a named stream, ``lds.noise``
(:func:`das_lightning.diffusion.ground_truth_noise`):

- ``disjoint`` (default): the ground truth's own keys, which no feature setting can reproduce. The LDS should test
  how well a method predicts the loss, not whether its features happened to see the noise the loss was measured on:
  with the coupled stream, grid features at e_seed 0 reuse 10 of a query's 60 ground-truth draws (t in {0, 50, ...,
  950} x e_seeds {0, 1, 2}) and stratified features none, which favours grid over stratified (METHOD.md §8).
- ``coupled``: the features' draw 0 (:func:`das_lightning.diffusion.rule_noise`), the paper's protocol and every
  ground truth measured before ``lds.noise`` existed. The cache manifest records the stream; one without the key was
  measured coupled, and a run that asks for another stream refuses it (:class:`NoiseStreamMismatchError`).

The noise does not depend on the model, but it is redrawn per batch rather than cached across models: drawing costs
~25 us per (query, t, e_seed) pair on one CPU core for a 3x32x32 image (measured here), ~75 s for 1000 queries x 1000
timesteps x 3 e_seeds, while keeping it would take 3e6 x 3072 floats = 37 GB. A UNet forward of the same pairs costs
far more, so the draw is not the bottleneck.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from safetensors.torch import load_file, save_file
from typing_extensions import override

from das_lightning.diffusion import (
    DEFAULT_GROUND_TRUTH_NOISE,
    LEGACY_GROUND_TRUTH_NOISE,
    NUM_TRAIN_TIMESTEPS,
    as_index_list,
    check_noise_stream,
    query_losses,
)
from das_lightning.errors import ConfigError, MissingArtifactError
from das_lightning.manifest import (
    ManifestMismatchError,
    atomic_save,
    check_or_write_manifest,
    commit_file,
    hash_array,
    read_manifest,
    verified_file,
)

DEFAULT_E_SEEDS: tuple[int, ...] = (0, 1, 2)
DEFAULT_TIMESTEPS: tuple[int, ...] = tuple(range(NUM_TRAIN_TIMESTEPS))
LOSSES_FILE = "losses.safetensors"
NOISE_KEY = "noise"  # the manifest's record of the ground truth's noise stream (lds.noise)


class GroundTruthModule(lightning.LightningModule):
    """Predict-only module: batch {"index": (B,), "image": (B, C, H, W) in [-1, 1], ...} -> {"index", "loss"}.

    ``extra`` holds per-query network inputs for the whole query set, row i for dataset index i (conditioning);
    ``noise`` is the noise stream (``lds.noise``; see the module docstring).

    Run it with ``trainer.predict`` over the query set; under DDP write the outputs with
    :class:`LossPredictionWriter` and assemble them with :func:`gather_predictions`.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        alphas_cumprod: torch.Tensor,
        timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
        e_seeds: Sequence[int] = DEFAULT_E_SEEDS,
        set_name: str = "val",
        pair_batch_size: int = 256,
        extra: Mapping[str, torch.Tensor] | None = None,
        noise: str = DEFAULT_GROUND_TRUTH_NOISE,
    ):
        super().__init__()
        self.noise = check_noise_stream(noise)
        self.unet = unet
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().clone().float(), persistent=False)
        self.timesteps = [int(t) for t in timesteps]
        self.e_seeds = [int(e) for e in e_seeds]
        self.set_name = set_name
        self.pair_batch_size = pair_batch_size
        self.extra = {key: value.detach().cpu() for key, value in (extra or {}).items()}

    @override
    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        rows = torch.as_tensor(batch["index"]).long().cpu()
        losses = query_losses(
            self.unet,
            self.alphas_cumprod,
            batch["image"],
            batch["index"],
            self.set_name,
            self.timesteps,
            self.e_seeds,
            batch_size=self.pair_batch_size,
            device=self.device,
            extra={key: value[rows] for key, value in self.extra.items()},
            noise=self.noise,
        )
        return {"index": rows, "loss": losses}


class LossPredictionWriter(BasePredictionWriter):
    """Writes each rank's {"index", "loss"} rows to ``<folder>/losses_rank<r>_of<world size>.safetensors`` at the end
    of predict, so outputs survive ``ddp_spawn`` (whose workers return nothing to the launcher) and multi-node runs
    alike. The world size in the name keeps a reader from mixing in files an earlier run of another size left."""

    def __init__(self, folder: Path):
        super().__init__(write_interval="epoch")
        self.folder = Path(folder)

    @override
    def write_on_epoch_end(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any] | None,
    ) -> None:
        outputs = _flatten_outputs(predictions)
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            "index": torch.cat([output["index"] for output in outputs]).long(),
            "loss": torch.cat([output["loss"] for output in outputs]).double(),
        }
        name = f"losses_rank{trainer.global_rank}_of{trainer.world_size}.safetensors"
        _atomic_save(tensors, self.folder / name)


def read_prediction_files(folder: Path, world_size: int) -> list[dict[str, torch.Tensor]]:
    """The ``world_size`` per-rank files written by :class:`LossPredictionWriter`, as predict outputs."""
    paths = [Path(folder) / f"losses_rank{rank}_of{world_size}.safetensors" for rank in range(world_size)]
    missing = [path.name for path in paths if not path.exists()]
    if missing:
        raise MissingArtifactError(f"prediction files missing from {folder}: {', '.join(missing)}")
    return [load_file(path) for path in paths]


def _flatten_outputs(outputs: Iterable[Any]) -> list[Mapping[str, torch.Tensor]]:
    """Predict outputs come as a list of dicts, or a list per dataloader of lists of dicts."""
    flat: list[Mapping[str, torch.Tensor]] = []
    for output in outputs:
        if isinstance(output, Mapping):
            flat.append(output)
        else:
            flat.extend(_flatten_outputs(output))
    return flat


def gather_predictions(
    outputs: Iterable[Any], indices: Sequence[int] | torch.Tensor | None = None
) -> torch.Tensor:
    """Assemble predict outputs into one (Q,) float64 tensor, ordered by ``indices`` (default: sorted indices).

    A plain DistributedSampler pads ranks with repeated samples, so an index may appear twice (Lightning's own
    predict sampler does not pad, a user-supplied one may): the copies are deduplicated and must agree. A requested index with no row is an error, never a silent zero.
    """
    loss_by_index: dict[int, float] = {}
    for output in _flatten_outputs(outputs):
        for index, loss in zip(output["index"].tolist(), output["loss"].double().tolist(), strict=True):
            previous = loss_by_index.setdefault(int(index), loss)
            if abs(previous - loss) > 1e-6 * max(1.0, abs(loss)):
                raise ConfigError(f"index {index} has two different losses: {previous} and {loss}")
    wanted = sorted(loss_by_index) if indices is None else as_index_list(indices)
    missing = [index for index in wanted if index not in loss_by_index]
    if missing:
        raise KeyError(f"{len(missing)} requested indices have no prediction, e.g. {missing[:5]}")
    return torch.tensor([loss_by_index[index] for index in wanted], dtype=torch.float64)


# --------------------------------------------------------------------------------------------------- cache


def ground_truth_manifest(
    model_id: str,
    set_name: str,
    indices: Sequence[int] | torch.Tensor,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    e_seeds: Sequence[int] = DEFAULT_E_SEEDS,
    noise: str = DEFAULT_GROUND_TRUTH_NOISE,
    **extra: Any,
) -> dict[str, Any]:
    """The settings that make a ground-truth cache: the model (e.g. its checkpoint hash), the queries, the grid
    and the noise stream (a manifest without :data:`NOISE_KEY` was measured ``coupled``)."""
    index_list = as_index_list(indices)
    return {
        "kind": "lds_ground_truth",
        "model": model_id,
        "set_name": set_name,
        "num_queries": len(index_list),
        "query_indices_hash": hash_array(index_list),
        "timesteps_hash": hash_array(timesteps),
        "num_timesteps": len(timesteps),
        "e_seeds": [int(e) for e in e_seeds],
        NOISE_KEY: check_noise_stream(noise),
        **extra,
    }


class NoiseStreamMismatchError(ManifestMismatchError):
    """A ground-truth cache measured under another noise stream than ``lds.noise`` asks for."""

    def __init__(self, path: Path, recorded: str, requested: str, made_before: bool):
        super().__init__(path, {NOISE_KEY: (recorded, requested)})
        why = (
            f"its manifest has no {NOISE_KEY!r} key: it was made before lds.noise existed, when every ground truth "
            "was coupled"
            if made_before
            else f"its manifest's {NOISE_KEY!r} key"
        )
        self.args = (
            f"{path} holds a ground truth measured with lds.noise={recorded} ({why}); this run asks for "
            f"lds.noise={requested}, whose noise differs. Pass lds.noise={recorded} to reuse it, or delete {path} "
            f"to measure it again under lds.noise={requested}.",
        )


def _check_noise_stream(cache_dir: Path, manifest: Mapping[str, Any]) -> None:
    """Refuse a cache measured under another noise stream than ``manifest`` asks for; a manifest on disk without the
    key reads as ``coupled``, so caches made before ``lds.noise`` stay readable with ``lds.noise=coupled``."""
    on_disk = read_manifest(cache_dir) or {}
    recorded = on_disk.get(NOISE_KEY, LEGACY_GROUND_TRUTH_NOISE)
    if recorded != manifest[NOISE_KEY]:
        raise NoiseStreamMismatchError(cache_dir, recorded, manifest[NOISE_KEY], NOISE_KEY not in on_disk)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    contiguous = {key: value.contiguous() for key, value in tensors.items()}
    atomic_save(path, lambda tmp: save_file(contiguous, str(tmp)))


def cached_query_losses(
    cache_dir: Path, manifest: Mapping[str, Any], compute: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """Ground-truth losses of one model, computed once and kept in ``cache_dir/losses.safetensors``.

    A cache made with other settings (``manifest`` differs from the one on disk) raises
    :class:`das_lightning.manifest.ManifestMismatchError` naming the differing keys (for the noise stream,
    :class:`NoiseStreamMismatchError`, saying how to reuse or remeasure it); nothing is pickled.
    """
    cache_dir = Path(cache_dir)
    # the noise stream is compared apart: a manifest without it was measured coupled, not "under no stream"
    check_or_write_manifest(cache_dir, manifest, ignore={NOISE_KEY} if NOISE_KEY in manifest else ())
    if NOISE_KEY in manifest:
        _check_noise_stream(cache_dir, manifest)
    remedy = f"delete {cache_dir} and rerun `python evaluate_lds.py` to measure this ground truth again"
    path = verified_file(cache_dir, LOSSES_FILE, remedy)
    if path is not None:
        return load_file(path)["loss"]
    losses = compute().detach().cpu().double()
    expected = manifest.get("num_queries")
    if expected is not None and losses.shape != (expected,):
        raise ConfigError(
            f"computed losses have shape {tuple(losses.shape)}, manifest says {expected} queries"
        )
    commit_file(cache_dir, LOSSES_FILE, lambda tmp: save_file({"loss": losses.contiguous()}, str(tmp)))
    return losses
