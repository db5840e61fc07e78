"""Datasets (official formats, one sample contract), LDS subsets and the Lightning data module."""

from das_lightning.data.base import (
    DatasetNotFoundError,
    FileImageDataset,
    ImageDataset,
    ModelSpaceDataset,
    Sample,
    TensorImageDataset,
    content_entry,
    dataset_identity,
)
from das_lightning.data.datamodule import DiffusionDataModule, HorizontalFlipDataset, make_loader
from das_lightning.data.registry import DATASETS, DatasetEntry, build_dataset
from das_lightning.data.subsets import (
    lds_subset_indices,
    load_index_list,
    load_index_record,
    save_index_list,
    stratified_sample,
)

__all__ = [
    "DATASETS",
    "DatasetEntry",
    "DatasetNotFoundError",
    "DiffusionDataModule",
    "FileImageDataset",
    "HorizontalFlipDataset",
    "ImageDataset",
    "ModelSpaceDataset",
    "Sample",
    "TensorImageDataset",
    "build_dataset",
    "content_entry",
    "dataset_identity",
    "lds_subset_indices",
    "load_index_list",
    "load_index_record",
    "make_loader",
    "save_index_list",
    "stratified_sample",
]
