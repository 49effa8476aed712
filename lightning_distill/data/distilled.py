"""``DistilledDataModule``: a distilled set (an export file or a live synthetic set) served as a DataModule."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_distill.export import load_distilled
from lightning_distill.synthetic.base import SyntheticSet


class DistilledDataModule(L.LightningDataModule):
    """Serve a distilled set for downstream training like any other DataModule.

    Build it from an export file (``DistilledDataModule("runs/x/distilled.pt")`` or :meth:`from_file`), from
    tensors (:meth:`from_tensors`) or from a live :class:`SyntheticSet` (:meth:`from_synthetic`, a detached
    snapshot of its current output, which is how evaluation callbacks train on a set while it is being learned).
    Images are in the model-input space recorded in :attr:`preprocessing`; apply the same preprocessing to any
    real test data.

    Args:
        path: an export file written by ``ExportDistilled`` / ``save_distilled``.
        batch_size: training batch size (the whole set when it is smaller).
        shuffle: reshuffle every epoch (seeded).
        seed: seed of the shuffling.
    """

    def __init__(self, path: str | None = None, batch_size: int = 256, shuffle: bool = True, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.meta: dict[str, Any] = {}
        self.images: Tensor | None = None
        self.labels: Tensor | None = None
        if path is not None:
            self._load(load_distilled(path))

    # ------------------------------------------------------------------------------------- constructors
    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs: Any) -> DistilledDataModule:
        """Read an export file."""
        return cls(str(path), **kwargs)

    @classmethod
    def from_tensors(
        cls, images: Tensor, labels: Tensor, meta: dict[str, Any] | None = None, **kwargs: Any
    ) -> DistilledDataModule:
        """Wrap tensors (images ``(N, C, H, W)``, labels ``(N,)`` int64 or ``(N, K)`` float)."""
        dm = cls(**kwargs)
        kind = "hard" if labels.ndim == 1 else "soft"
        dm._load({"images": images, "labels": labels, "label_kind": kind, **(meta or {})})
        return dm

    @classmethod
    def from_synthetic(
        cls, synthetic: SyntheticSet, meta: dict[str, Any] | None = None, **kwargs: Any
    ) -> DistilledDataModule:
        """A detached snapshot of a live synthetic set's current output (``synthetic.view()``)."""
        view = synthetic.view()
        meta = {
            "label_kind": view.label_kind,
            "num_classes": synthetic.num_classes,
            "ipc": synthetic.ipc,
            "images_per_class": view.images_per_class,
            **(meta or {}),
        }
        dm = cls(**kwargs)
        dm._load({"images": view.images, "labels": view.labels, **meta})
        return dm

    def _load(self, payload: dict[str, Any]) -> None:
        self.images = payload["images"].float()
        self.labels = payload["labels"]
        self.meta = {k: v for k, v in payload.items() if k not in ("images", "labels")}

    # --------------------------------------------------------------------------------------- properties
    @property
    def label_kind(self) -> str:
        return self.meta.get("label_kind", "hard" if self.labels.ndim == 1 else "soft")

    @property
    def num_classes(self) -> int:
        if "num_classes" in self.meta:
            return int(self.meta["num_classes"])
        return int(self.labels.max()) + 1 if self.labels.ndim == 1 else int(self.labels.shape[1])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def preprocessing(self) -> Any:
        """The recorded :class:`~lightning_distill.data.preprocess.Preprocessing` (``None`` if not recorded)."""
        from lightning_distill.data.preprocess import Preprocessing

        d = self.meta.get("preprocessing")
        return Preprocessing.from_dict(d) if d else None

    def __len__(self) -> int:
        return 0 if self.images is None else len(self.images)

    # -------------------------------------------------------------------------------------- dataloaders
    def train_dataloader(self) -> DataLoader:
        if self.images is None:
            raise RuntimeError("DistilledDataModule has no data: give a path or use from_file/from_tensors")
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            TensorDataset(self.images, self.labels),
            batch_size=min(self.batch_size, len(self.images)),
            shuffle=self.shuffle,
            generator=g,
        )
