"""Real datasets as in-memory DataModules, their preprocessing (mean/std, both ZCA conventions) and a registry."""

from __future__ import annotations

from typing import Any

from lightning_distill.data.arrays import ArrayDataModule, load_array_file
from lightning_distill.data.cache import DatasetNotFoundError, default_cache_dir, default_data_root
from lightning_distill.data.constants import CLASS_NAMES, DATASET_STATS, canonical_name
from lightning_distill.data.distilled import DistilledDataModule
from lightning_distill.data.folders import ImageFolderDataModule, TinyImageNetDataModule
from lightning_distill.data.preprocess import Preprocessing, ZCAFit, fit_zca, fit_zca_kornia, fit_zca_trace
from lightning_distill.data.real import RealBatchStream, RealDataModule
from lightning_distill.data.stream import ClassBalancedStream, ClassSubsetStream
from lightning_distill.data.torchvision_sets import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
    SVHNDataModule,
)

#: Canonical dataset name -> DataModule class.
DATASETS: dict[str, type[RealDataModule]] = {
    "mnist": MNISTDataModule,
    "fashion_mnist": FashionMNISTDataModule,
    "cifar10": CIFAR10DataModule,
    "cifar100": CIFAR100DataModule,
    "svhn": SVHNDataModule,
    "tiny_imagenet": TinyImageNetDataModule,
}


def get_datamodule(name: str, **kwargs: Any) -> RealDataModule:
    """Build the DataModule of a canonical dataset.

    Args:
        name: A key of :data:`DATASETS` (case and ``-``/``_`` do not matter; ``fmnist``, ``cifar-10`` also work).
        **kwargs: Passed to the DataModule (``root``, ``batch_size``, ``val_size``, ``zca``, ...).

    Returns:
        The DataModule (not set up yet).

    Raises:
        ValueError: For an unknown name; the message lists the known ones.
    """
    key = canonical_name(name)
    if key not in DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}: known datasets are {', '.join(DATASETS)}; "
            f"use ImageFolderDataModule or ArrayDataModule for your own data"
        )
    return DATASETS[key](**kwargs)


__all__ = [
    "CLASS_NAMES",
    "DATASETS",
    "DATASET_STATS",
    "ArrayDataModule",
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "ClassBalancedStream",
    "ClassSubsetStream",
    "DatasetNotFoundError",
    "DistilledDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "Preprocessing",
    "RealBatchStream",
    "RealDataModule",
    "SVHNDataModule",
    "TinyImageNetDataModule",
    "ZCAFit",
    "canonical_name",
    "default_cache_dir",
    "default_data_root",
    "fit_zca",
    "fit_zca_kornia",
    "fit_zca_trace",
    "get_datamodule",
    "load_array_file",
]
