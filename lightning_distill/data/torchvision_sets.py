"""MNIST, Fashion-MNIST, CIFAR-10/100 and SVHN through torchvision, read as whole arrays (no per-image transforms)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor
from torchvision import datasets

from lightning_distill.data.arrays import load_array_file
from lightning_distill.data.cache import DatasetNotFoundError
from lightning_distill.data.constants import CLASS_NAMES
from lightning_distill.data.real import RealDataModule


class _TorchvisionDataModule(RealDataModule):
    """Reads a torchvision dataset's ``.data`` / ``.targets`` arrays directly, in torchvision's folder layout."""

    def _dataset(self, root: Path, train: bool) -> Any:
        raise NotImplementedError

    def _arrays(self, ds: Any) -> tuple[Any, Any]:
        return ds.data, ds.targets

    def _load_raw(self, split: str) -> tuple[Tensor, Tensor]:
        root = self.resolve_root()
        try:
            ds = self._dataset(root, split == "train")
        except RuntimeError as err:
            # torchvision says "Dataset not found [or corrupted]. You can use download=True": say where and how.
            if "not found" in str(err).lower():
                raise self.not_found(root) from err
            # A failed download (no network) lists every mirror it tried: one line naming the root and the fix.
            if "error downloading" in str(err).lower():
                raise DatasetNotFoundError(
                    f"{self.name} is not under {root} and downloading it failed (no internet access?): set root / "
                    f"LIGHTNING_DISTILL_DATA to a folder that holds it (expected {root / self.expected_path})"
                ) from None
            raise
        return self._arrays(ds)


class MNISTDataModule(_TorchvisionDataModule):
    """MNIST: 60,000 train / 10,000 test, 1×28×28, 10 digits. Arguments: see :class:`RealDataModule`."""

    name = "mnist"
    num_classes = 10
    image_shape = (1, 28, 28)
    class_names = CLASS_NAMES["mnist"]
    expected_path = "MNIST/raw/train-images-idx3-ubyte"

    def _dataset(self, root: Path, train: bool) -> Any:
        return datasets.MNIST(str(root), train=train, download=self.download)


class FashionMNISTDataModule(_TorchvisionDataModule):
    """Fashion-MNIST: 60,000 train / 10,000 test, 1×28×28, 10 garments. Arguments: see :class:`RealDataModule`."""

    name = "fashion_mnist"
    num_classes = 10
    image_shape = (1, 28, 28)
    class_names = CLASS_NAMES["fashion_mnist"]
    expected_path = "FashionMNIST/raw/train-images-idx3-ubyte"

    def _dataset(self, root: Path, train: bool) -> Any:
        return datasets.FashionMNIST(str(root), train=train, download=self.download)


class CIFAR10DataModule(_TorchvisionDataModule):
    """CIFAR-10: 50,000 train / 10,000 test, 3×32×32, 10 classes. Arguments: see :class:`RealDataModule`.

    Reads torchvision's ``root/cifar-10-batches-py``; when that is absent it falls back to the offline array file
    ``root/CIFAR10/cifar10.npz`` or ``root/CIFAR10/cifar10.npz.xz`` (keys ``x_train, y_train, x_test, y_test``).
    """

    name = "cifar10"
    num_classes = 10
    image_shape = (3, 32, 32)
    class_names = CLASS_NAMES["cifar10"]
    expected_path = "cifar-10-batches-py/data_batch_1"
    array_files = ("CIFAR10/cifar10.npz", "CIFAR10/cifar10.npz.xz")

    def _dataset(self, root: Path, train: bool) -> Any:
        return datasets.CIFAR10(str(root), train=train, download=self.download)

    def _load_raw(self, split: str) -> tuple[Tensor, Tensor]:
        root = self.resolve_root()
        if not (root / "cifar-10-batches-py").is_dir() and not self.download:
            for rel in self.array_files:
                if (root / rel).is_file():
                    # One read gives both splits; each is dropped here once load_split has converted it.
                    arrays = getattr(self, "_array_file", None) or load_array_file(root / rel)
                    self._array_file = arrays
                    return arrays.pop(f"x_{split}"), arrays.pop(f"y_{split}")
        return super()._load_raw(split)

    def not_found(self, root: Path, expected: str | None = None) -> DatasetNotFoundError:
        """Names both accepted layouts."""
        return DatasetNotFoundError(
            f"{self.name} not found under {root} (expected {root / self.expected_path} or "
            f"{root / self.array_files[1]}): pass download=True with internet access, or set root / "
            f"LIGHTNING_DISTILL_DATA to a folder that holds it"
        )


class CIFAR100DataModule(_TorchvisionDataModule):
    """CIFAR-100: 50,000 train / 10,000 test, 3×32×32, 100 fine classes. Arguments: see :class:`RealDataModule`."""

    name = "cifar100"
    num_classes = 100
    image_shape = (3, 32, 32)
    class_names = CLASS_NAMES["cifar100"]
    expected_path = "cifar-100-python/train"

    def _dataset(self, root: Path, train: bool) -> Any:
        return datasets.CIFAR100(str(root), train=train, download=self.download)


class SVHNDataModule(_TorchvisionDataModule):
    """SVHN (cropped digits): 73,257 train / 26,032 test, 3×32×32, digits 0-9 (label 10 mapped to 0 by torchvision).

    The ``extra`` split is not used. Reading the ``.mat`` files needs scipy. Arguments: see :class:`RealDataModule`.
    """

    name = "svhn"
    num_classes = 10
    image_shape = (3, 32, 32)
    class_names = CLASS_NAMES["svhn"]
    expected_path = "train_32x32.mat"

    def _dataset(self, root: Path, train: bool) -> Any:
        try:
            import scipy.io  # noqa: F401
        except ImportError as err:
            raise ImportError("SVHN is stored as .mat files, which need scipy: pip install scipy") from err
        return datasets.SVHN(str(root), split="train" if train else "test", download=self.download)

    def _arrays(self, ds: Any) -> tuple[Any, Any]:
        return ds.data, np.asarray(ds.labels)
