"""The Lightning data module for training diffusion models, and the plain loader the other stages use.

Training may run on a subset (an LDS subset model), but samples keep their index in the FULL dataset: the
noise rule and the feature rows address images by that index, whichever subset a model was trained on.
"""

from __future__ import annotations

import numpy as np
import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Subset

from das_lightning.data.base import ImageDataset, Sample
from das_lightning.errors import ConfigError


class HorizontalFlipDataset(Dataset[Sample]):
    """Mirrors each image left-right with probability ``probability``; index and label are untouched.

    The coin is drawn from torch's global generator, which the DataLoader seeds per worker from its own
    (seeded) generator, so flips are reproducible for a given shuffling seed and worker count.
    """

    def __init__(self, dataset: Dataset[Sample], probability: float = 0.5):
        self.dataset = dataset
        self.probability = probability

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int) -> Sample:
        sample = self.dataset[position]
        if torch.rand(()) < self.probability:
            sample = {**sample, "image": sample["image"].flip(-1)}
        return sample


def _restrict(dataset: Dataset[Sample], indices: np.ndarray | None) -> Dataset[Sample]:
    """The samples at ``indices`` (their "index" stays their position in ``dataset``)."""
    if indices is None:
        return dataset
    return Subset(dataset, np.asarray(indices, dtype=np.int64).tolist())


def make_loader(
    dataset: ImageDataset,
    batch_size: int,
    indices: np.ndarray | None = None,
    shuffle: bool = False,
    num_workers: int = 0,
    seed: int = 0,
) -> DataLoader:
    """A loader without augmentation, for prediction: features, ground-truth losses, similarity baselines.

    Batches are dicts of stacked tensors: ``index`` (B,) int64, ``image`` (B, C, H, W), ``label`` (B,).
    """
    return DataLoader(
        _restrict(dataset, indices),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        persistent_workers=num_workers > 0,
    )


class DiffusionDataModule(LightningDataModule):
    """Training batches of a dataset (or of one of its subsets), shuffled with a seeded generator.

    Args:
        dataset: the full training split; sample indices refer to it.
        subset_indices: positions in ``dataset`` to train on (an LDS subset), or None for all.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
        random_flip: mirror images left-right with probability 1/2 (the paper's only augmentation).
        seed: seeds the shuffling order (and, through it, the workers' flips).
    """

    def __init__(
        self,
        dataset: ImageDataset,
        subset_indices: np.ndarray | None,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        random_flip: bool = True,
    ):
        super().__init__()
        if subset_indices is not None:
            subset_indices = np.asarray(subset_indices, dtype=np.int64)
            if subset_indices.size and not 0 <= subset_indices.min() <= subset_indices.max() < len(dataset):
                raise ConfigError(f"subset indices fall outside {dataset.set_name} of {len(dataset)} images")
        self.dataset = dataset
        self.subset_indices = subset_indices
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.random_flip = random_flip
        self.seed = seed

    @property
    def train_set(self) -> Dataset[Sample]:
        """What training iterates over: the subset, with flips when enabled."""
        restricted = _restrict(self.dataset, self.subset_indices)
        return HorizontalFlipDataset(restricted) if self.random_flip else restricted

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
            persistent_workers=self.num_workers > 0,
        )

    def predict_dataloader(self) -> DataLoader:
        return make_loader(self.dataset, self.batch_size, self.subset_indices, num_workers=self.num_workers)
