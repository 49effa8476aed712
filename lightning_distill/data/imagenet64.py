"""Downsampled ImageNet-1K at 64×64 (Chrabaszcz, Loshchilov, Hutter 2017), read from its published npz batches.

The files as image-net.org publishes them (``Imagenet64_train_part1_npz.zip``, ``..._part2_npz.zip``,
``Imagenet64_val_npz.zip``): ``train_data_batch_1.npz`` .. ``train_data_batch_10.npz`` and ``val_data.npz``, each
with ``data`` (uint8 rows of 3·64·64 values, channel-major: all red, then green, then blue, each row-major) and
``labels`` (class ids from 1 to 1000). APM and RCIG distil ImageNet-1K at this resolution; its labelled validation
set serves as the test split (our validation split is held out of train, as for every dataset).

The npz files are read with ``allow_pickle=False`` (the pickled variant of the same batches is not read: unpickling
runs code from the file).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_distill.data.cache import DatasetNotFoundError
from lightning_distill.data.real import RealDataModule

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageNet64DataModule", "TRAIN_BATCHES"]

#: The ten training batches of the published split.
TRAIN_BATCHES = tuple(range(1, 11))
#: ImageNet's usual channel statistics (APM normalises Tiny-ImageNet and ImageNet-1K with them, no ZCA).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNet64DataModule(RealDataModule):
    """ImageNet-1K downsampled to 64×64: 1,281,167 training images of 1000 classes; ``val_data`` is the test split.

    Looks for ``train_data_batch_<i>.npz`` and ``val_data.npz`` anywhere under ``root/folder`` (the zips unpack
    into sub-folders). Labels become 0-based. Memory: the full training split is 15.7 GB as uint8 and 63 GB once
    preprocessed to float32 (held where ``device`` says): set ``device: cpu`` unless the accelerator has room, or
    read fewer batches (``train_batches``) or images (``max_per_class``).

    Args:
        folder: sub-folder of ``root`` holding the npz files.
        train_batches: which of the ten training batches to read (default: all).
        max_per_class: keep at most this many training images of each class (the first ones, in file order).
        **kwargs: see :class:`RealDataModule` (``root``, ``batch_size``, ``val_size``, ``device``, ...).
    """

    name = "imagenet64"
    image_shape = (3, 64, 64)
    num_classes = 1000
    expected_path = "imagenet64/train_data_batch_1.npz"

    def __init__(
        self,
        folder: str = "imagenet64",
        train_batches: Sequence[int] | None = None,
        max_per_class: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        batches = tuple(TRAIN_BATCHES if train_batches is None else (int(b) for b in train_batches))
        bad = [b for b in batches if b not in TRAIN_BATCHES]
        if bad or not batches:
            raise ValueError(f"train_batches must name some of the batches 1..10, got {list(train_batches or [])}")
        if max_per_class is not None and max_per_class < 1:
            raise ValueError(f"max_per_class must be a positive number of images (or null), got {max_per_class}")
        self.folder, self.train_batches, self.max_per_class = folder, batches, max_per_class
        self.expected_path = f"{folder}/train_data_batch_1.npz"

    @property
    def class_names(self) -> list[str]:  # type: ignore[override]
        """Class ids as strings (the npz files carry no names)."""
        return [str(c) for c in range(self.num_classes)]

    def normalization_stats(self, x_train_raw: Tensor) -> tuple[list[float], list[float]]:
        """ImageNet's usual mean/std (APM's), not a pass over a million images."""
        return list(IMAGENET_MEAN), list(IMAGENET_STD)

    def _find(self, name: str) -> Path:
        root = self.resolve_root()
        base = root / self.folder
        direct = base / name
        if direct.is_file():
            return direct
        found = sorted(base.rglob(name)) if base.is_dir() else []
        if not found:
            raise DatasetNotFoundError(
                f"{name} not found under {base}: unpack the published Imagenet64 npz zips (train part 1 and 2, val) "
                f"there, or set root (a recipe's data.init_args.root) / LIGHTNING_DISTILL_DATA to the folder above "
                f"{self.folder}/"
            )
        return found[0]

    def _read(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        with np.load(path, allow_pickle=False) as f:
            if "data" not in f or "labels" not in f:
                raise ValueError(f"{path} holds {sorted(f.files)}, not the published 'data' and 'labels' arrays")
            data, labels = np.asarray(f["data"]), np.asarray(f["labels"]).astype(np.int64).reshape(-1)
        d = int(np.prod(self.image_shape))
        if data.ndim != 2 or data.shape[1] != d or data.dtype != np.uint8:
            raise ValueError(f"{path}: data must be uint8 rows of {d} values (3x64x64), got {data.dtype} {data.shape}")
        if len(labels) != len(data):
            raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
        if len(labels) and (labels.min() < 1 or labels.max() > self.num_classes):
            raise ValueError(
                f"{path}: labels must be the published 1-based class ids 1..{self.num_classes}, "
                f"got {labels.min()}..{labels.max()}"
            )
        return data, labels - 1

    def _load_raw(self, split: str) -> tuple[Tensor, Tensor]:
        names = [f"train_data_batch_{b}.npz" for b in self.train_batches] if split == "train" else ["val_data.npz"]
        parts = [self._read(self._find(n)) for n in names]
        data = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        if split == "train" and self.max_per_class is not None:
            keep = np.zeros(len(labels), dtype=bool)
            for c in np.unique(labels):
                keep[np.flatnonzero(labels == c)[: self.max_per_class]] = True
            data, labels = data[keep], labels[keep]
        x = torch.from_numpy(np.ascontiguousarray(data)).view(-1, *self.image_shape)  # rows are CHW already
        return x, torch.from_numpy(labels)
