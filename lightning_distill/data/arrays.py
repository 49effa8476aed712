"""Datasets held as arrays: in-memory tensors, or an ``.npz`` / ``.npz.xz`` file (such as the offline CIFAR-10)."""

from __future__ import annotations

import logging
import lzma
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_distill.data.cache import DatasetNotFoundError, atomic_path, cache_subdir, digest
from lightning_distill.data.constants import CLASS_NAMES, canonical_name
from lightning_distill.data.convert import to_labels
from lightning_distill.data.real import RealDataModule

log = logging.getLogger(__name__)

ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")


def decompressed_path(path: str | Path) -> Path:
    """The uncompressed ``.npz`` for ``path``: itself, or for ``.xz`` a copy decompressed once into the cache folder.

    The copy is keyed by the source's absolute path, size and modification time, and written atomically, so an
    interrupted or concurrent first read never leaves a truncated file behind.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetNotFoundError(
            f"array file {path} not found: pass path= an existing .npz or .npz.xz file with keys "
            f"{', '.join(ARRAY_KEYS)}"
        )
    if path.suffix != ".xz":
        return path
    stat = path.stat()
    key = digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    stem = path.name[: -len(".xz")].removesuffix(".npz")
    target = cache_subdir("arrays") / f"{stem}-{key}.npz"
    if not target.is_file():
        log.info("decompressing %s once into %s", path, target)
        with atomic_path(target) as tmp, lzma.open(path) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 24)
    return target


def load_array_file(path: str | Path) -> dict[str, np.ndarray]:
    """Read every array of an ``.npz`` or ``.npz.xz`` file (the ``.xz`` is decompressed once, then cached).

    Args:
        path: The file; it must hold ``x_train, y_train, x_test, y_test`` and may hold ``classes``.

    Returns:
        The arrays by key.
    """
    source = Path(path).expanduser()
    with np.load(decompressed_path(source), allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    missing = [key for key in ARRAY_KEYS if key not in arrays]
    if missing:
        raise KeyError(f"{source} lacks {', '.join(missing)}: the file must hold {', '.join(ARRAY_KEYS)}")
    return arrays


class ArrayDataModule(RealDataModule):
    """A dataset given as uint8 arrays, either in memory or as an ``.npz`` / ``.npz.xz`` file.

    Images may be ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)``. With ``name`` set to a canonical dataset name
    (e.g. ``"cifar10"``), that dataset's published mean/std and class names are used; otherwise mean/std are computed
    from the training images. This is how the offline CIFAR-10 file is read::

        ArrayDataModule(path="shared/datasets/CIFAR10/cifar10.npz.xz", name="cifar10", zca="trace")

    Args:
        path: An ``.npz`` or ``.npz.xz`` file holding ``x_train, y_train, x_test, y_test`` (and optionally
            ``classes``). Leave None to pass the arrays instead.
        x_train: Training images (uint8), with ``y_train``, ``x_test``, ``y_test``, when ``path`` is None.
        y_train: Training labels.
        x_test: Test images.
        y_test: Test labels.
        name: Dataset name (used for constants, cache file names and exported metadata).
        classes: Class names. None: from the file, else the canonical ones for ``name``, else ``"0", "1", ...``.
        mean: Per-channel mean overriding the constants / computed value (needs ``std`` too).
        std: Per-channel std.
        **kwargs: Forwarded to :class:`RealDataModule` (``batch_size``, ``val_size``, ``zca``, ``seed``, ...).
    """

    def __init__(
        self,
        path: str | None = None,
        x_train: Any = None,
        y_train: Any = None,
        x_test: Any = None,
        y_test: Any = None,
        name: str = "array",
        classes: list[str] | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        given = [a is not None for a in (x_train, y_train, x_test, y_test)]
        if path is None and not all(given):
            raise ValueError(
                "ArrayDataModule needs path= (an .npz or .npz.xz file) or all of x_train, y_train, x_test, y_test"
            )
        if path is not None and any(given):
            raise ValueError("ArrayDataModule takes path= or the arrays x_train, y_train, x_test, y_test, not both")
        if (mean is None) != (std is None):
            raise ValueError("pass both mean and std, or neither")
        self.name = canonical_name(name)
        self.path = path
        self._arrays: dict[str, Any] | None = (
            None if path is not None else dict(zip(ARRAY_KEYS, (x_train, y_train, x_test, y_test), strict=True))
        )
        self._classes = list(classes) if classes is not None else None
        self._mean, self._std = mean, std

    def _array_dict(self) -> dict[str, Any]:
        if self._arrays is None:
            assert self.path is not None
            self._arrays = load_array_file(self.path)
            if self._classes is None and "classes" in self._arrays:
                self._classes = [str(c) for c in self._arrays["classes"].tolist()]
        return self._arrays

    def _load_raw(self, split: str) -> tuple[Tensor, Tensor]:
        arrays = self._array_dict()
        # Popped once converted: load_split keeps the tensors, so the arrays need not stay in memory too.
        return arrays.pop(f"x_{split}"), arrays.pop(f"y_{split}")

    @property
    def image_shape(self) -> tuple[int, int, int]:  # type: ignore[override]
        """``(C, H, W)`` of the images (reads the data on first use)."""
        return tuple(self.load_split("train")[0].shape[1:])  # type: ignore[return-value]

    @property
    def class_names(self) -> list[str]:  # type: ignore[override]
        """Class names: given, else from the file, else canonical for ``name``, else the label numbers."""
        if self._classes is None and self.path is not None:
            self._array_dict()  # reads the file's optional `classes`
        if self._classes is not None:
            return self._classes
        if self.name in CLASS_NAMES:
            return CLASS_NAMES[self.name]
        labels = torch.cat([to_labels(self.load_split(s)[1]) for s in ("train", "test")])
        return [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        """Number of classes (``len(class_names)``)."""
        return len(self.class_names)

    def normalization_stats(self, x_train_raw: Tensor) -> tuple[list[float], list[float]]:
        """The given mean/std, else the canonical constants for ``name``, else computed from the training images."""
        if self._mean is not None and self._std is not None:
            return list(self._mean), list(self._std)
        return super().normalization_stats(x_train_raw)

    def prepare_data(self) -> None:
        """Decompress an ``.npz.xz`` into the cache once, on one process per node."""
        if self.path is not None:
            decompressed_path(self.path)
