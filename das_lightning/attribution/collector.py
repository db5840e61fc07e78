"""``ProjectedGradientCollector``: a Lightning callback that turns predict batches into rows of a feature store.

Used under ``trainer.predict`` with ``Trainer(inference_mode=False)`` (gradients are needed). Each rank of a DDP run
gets its own disjoint shard of the pending rows (no padding, so no row is written twice) and writes straight into
the shared memory-mapped store by dataset index.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset, Subset
from typing_extensions import override

from das_lightning.attribution.grads import PerSampleGradients
from das_lightning.attribution.store import FeatureStore

ExtraInputs = Callable[[Mapping[str, Any]], Mapping[str, torch.Tensor]]


class ShardedPredictModule(L.LightningModule):
    """Holds the network and serves this rank's shard of ``indices`` (known only once the ranks exist)."""

    def __init__(
        self,
        network: torch.nn.Module,
        dataset: Dataset,
        indices: np.ndarray,
        batch_size: int,
        num_workers: int = 0,
    ):
        super().__init__()
        self.network = network
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size = batch_size
        self.num_workers = num_workers

    @override
    def predict_dataloader(self) -> DataLoader:
        # strided shards: rank r takes pending rows r, r+W, ... (uneven is fine: predict has no collectives)
        shard = self.indices[self.global_rank :: self.trainer.world_size]
        return DataLoader(
            Subset(self.dataset, shard.tolist()),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
        )

    @override
    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        return None  # the work happens in the callbacks, which see every batch


class ProjectedGradientCollector(Callback):
    """Per-sample gradients -> random projection -> store rows, for every predict batch.

    Args:
        store: where rows go (by ``batch["index"]``); rows already done are skipped.
        gradients: the per-sample gradient computer (its model must be the predicting module's network).
        projector: anything with ``project(Tensor[B, P]) -> Tensor[B, k]``.
        set_name: identity of the image set, for the noise rule.
        extra_inputs: optional per-sample conditioning built from the batch (text embeddings, class labels).
    """

    def __init__(
        self,
        store: FeatureStore,
        gradients: PerSampleGradients,
        projector: Any,
        set_name: str,
        extra_inputs: ExtraInputs | None = None,
    ):
        self.store = store
        self.gradients = gradients
        self.projector = projector
        self.set_name = set_name
        self.extra_inputs = extra_inputs
        self.sample_timesteps = 0
        self.seconds = 0.0

    @override
    def on_predict_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx: int = 0
    ) -> None:
        started = time.perf_counter()
        indices = batch["index"].cpu().numpy().astype(np.int64)
        images = batch["image"].to(pl_module.device)
        extra = dict(self.extra_inputs(batch)) if self.extra_inputs is not None else {}
        with torch.inference_mode(False), torch.enable_grad():
            flat = self.gradients.flat_gradients(images, indices, self.set_name, extra)
            rows = self.projector.project(flat)
        self.store.write(indices, rows.detach().float().cpu().numpy())
        self.seconds += time.perf_counter() - started
        # one (sample, draw) pair per timestep and noise draw: with one draw per timestep, sample-timesteps
        self.sample_timesteps += len(indices) * self.gradients.num_draws
        if trainer.logger is not None and self.seconds > 0:
            trainer.logger.log_metrics(
                {
                    "features/sample_timesteps_per_s": self.sample_timesteps / self.seconds,
                    "features/rows_done": float(self.sample_timesteps / self.gradients.num_draws),
                },
                step=batch_idx,
            )

    @property
    def throughput(self) -> float:
        """Sample-draws (sample-timesteps with one draw per timestep) per second on this rank so far."""
        return self.sample_timesteps / self.seconds if self.seconds else 0.0
