"""The learnable synthetic set: an ``nn.Module`` whose ``forward()`` returns ``(x_syn, y_syn)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

LabelKind = Literal["hard", "soft", "learned"]


class SyntheticSet(nn.Module):
    """Base class of every synthetic-set parameterisation.

    Shapes may be given at construction or later through :meth:`build` (a method calls it in ``setup`` with the
    real DataModule's ``num_classes`` and ``image_shape``, so a recipe only states ``ipc``). Values are filled from
    real data by :meth:`initialise`; a checkpoint restore then overwrites them.

    Args:
        ipc: images per class (at least 1).
        num_classes: number of classes; ``None`` to take it from the data in :meth:`build`.
        image_shape: ``(C, H, W)``; ``None`` to take it from the data in :meth:`build`.
    """

    label_kind: LabelKind = "hard"

    def __init__(self, ipc: int, num_classes: int | None = None, image_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        if not isinstance(ipc, int) or ipc < 1:
            raise ValueError(f"ipc must be a positive integer (images per class), got {ipc!r}")
        self.ipc = ipc
        self.num_classes: int | None = None
        self.image_shape: tuple[int, int, int] | None = None
        if num_classes is not None and image_shape is not None:
            self.build(num_classes, image_shape)

    @property
    def is_built(self) -> bool:
        return self.num_classes is not None

    @property
    def num_images(self) -> int:
        if self.num_classes is None:
            raise RuntimeError("the synthetic set is not built yet: call build(num_classes, image_shape)")
        return self.ipc * self.num_classes

    def build(self, num_classes: int, image_shape: Sequence[int]) -> None:
        """Create the parameters for ``num_classes`` classes of ``image_shape`` images (idempotent)."""
        shape = tuple(int(s) for s in image_shape)
        if len(shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if self.is_built:
            if (self.num_classes, self.image_shape) != (num_classes, shape):
                raise ValueError(
                    f"synthetic set already built for {self.num_classes} classes of {self.image_shape}, "
                    f"the data has {num_classes} classes of {shape}"
                )
            return
        self.num_classes, self.image_shape = int(num_classes), shape
        self._build()

    def class_ids(self) -> Tensor:
        """The class of each synthetic image, ``ipc`` consecutive images per class: ``(N,)`` int64."""
        return torch.arange(self.num_images) // self.ipc

    def _build(self) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def initialise(self, x_real: Tensor, y_real: Tensor, generator: torch.Generator | None = None) -> None:
        """Fill the values (e.g. from random real images of each class)."""
        raise NotImplementedError

    def forward(self) -> tuple[Tensor, Tensor]:
        """Return ``(x_syn, y_syn)``: images ``(N, C, H, W)`` and labels (``(N,)`` int64 or ``(N, K)`` float)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"ipc={self.ipc}, num_classes={self.num_classes}, image_shape={self.image_shape}, labels={self.label_kind}"
        )
