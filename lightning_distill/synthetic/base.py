"""The learnable synthetic set: an ``nn.Module`` whose ``forward()`` returns ``(x_syn, y_syn)``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

LabelKind = Literal["hard", "soft", "learned"]


@dataclass
class DistilledView:
    """What a distilled set *is* to everything outside the method: export, pictures, evaluation, benchmarks.

    Attributes:
        images: ``(N, C, H, W)`` detached images in model-input space, ``images_per_class`` consecutive per class.
        labels: ``(N,)`` int64 class ids or ``(N, K)`` float targets, detached.
        label_kind: ``hard``, ``soft`` or ``learned`` (how the labels were made).
        images_per_class: generated images per class (``ipc`` for a pixel set; ``r`` for a factorised memory).
        class_ids: ``(N,)`` int64, the class of each image (also for float labels).
        extras: tensors stored beside the images (e.g. a memory's bases and coefficients).
        storage: what the set costs to store, in floats, beside its pixel-set equivalent (see
            :meth:`SyntheticSet.storage`).
        source: where the view came from: ``live`` (the set being learned) or ``average`` (a weight-averaging
            callback's copy, e.g. Lightning's ``EMAWeightAveraging``).
    """

    images: Tensor
    labels: Tensor
    label_kind: str
    images_per_class: int
    class_ids: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)
    storage: dict[str, Any] = field(default_factory=dict)
    source: str = "live"

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels) or len(self.images) != len(self.class_ids):
            raise ValueError(
                f"a view needs one label and one class id per image: {len(self.images)} images, "
                f"{len(self.labels)} labels, {len(self.class_ids)} class ids"
            )

    def to(self, device: torch.device | str) -> DistilledView:
        """The same view with every tensor on ``device``."""
        return DistilledView(
            self.images.to(device),
            self.labels.to(device),
            self.label_kind,
            self.images_per_class,
            self.class_ids.to(device),
            {k: v.to(device) for k, v in self.extras.items()},
            dict(self.storage),
            self.source,
        )


class SyntheticSet(nn.Module):
    """Base class of every synthetic-set parameterisation.

    Shapes may be given at construction or later through :meth:`build` (a method calls it in ``configure_model``
    with the real DataModule's ``num_classes`` and ``image_shape``, so a recipe only states ``ipc``). Values are
    filled from real data by :meth:`initialise`; a checkpoint restore then overwrites them.

    ``ipc`` is the *storage budget* in images per class. A pixel set generates exactly ``ipc`` images per class; a
    factorised set (shared bases and per-image coefficients) may generate more from the same budget: it says how
    many through :attr:`images_per_class`, and builds any subset by index (``forward(index)``), so a method can
    sample per-class batches without generating the whole set.

    A subclass writes ``_build``, ``initialise`` and ``forward``; it may override :meth:`parameter_groups` (named
    groups of its learnable tensors, each optimised with its own settings), :meth:`export_extras` (tensors to store
    beside the generated images) and :meth:`storage`.

    Args:
        ipc: images per class (at least 1), the storage budget.
        num_classes: number of classes; ``None`` to take it from the data in :meth:`build`.
        image_shape: ``(C, H, W)``; ``None`` to take it from the data in :meth:`build`.
    """

    label_kind: LabelKind = "hard"

    def __init__(self, ipc: int, num_classes: int | None = None, image_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
            raise ValueError(f"ipc must be a positive integer (images per class), got {ipc!r}")
        self.ipc = ipc
        self.num_classes: int | None = None
        self.image_shape: tuple[int, int, int] | None = None
        if num_classes is not None and image_shape is not None:
            self.build(num_classes, image_shape)

    # ------------------------------------------------------------------------------------------- shapes
    @property
    def is_built(self) -> bool:
        return self.num_classes is not None

    @property
    def images_per_class(self) -> int:
        """Images the set generates per class (``ipc`` unless a subclass generates more from the same budget)."""
        return self.ipc

    @property
    def num_images(self) -> int:
        """Images the set generates in all: ``images_per_class * num_classes``."""
        if self.num_classes is None:
            raise RuntimeError("the synthetic set is not built yet: call build(num_classes, image_shape)")
        return self.images_per_class * self.num_classes

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
        """The class of each generated image, ``images_per_class`` consecutive images per class: ``(N,)`` int64."""
        return torch.arange(self.num_images) // self.images_per_class

    def class_index(self, c: int) -> Tensor:
        """Indices (into the generated set) of the images of class ``c``: ``(images_per_class,)`` int64."""
        if not 0 <= c < (self.num_classes or 0):
            raise IndexError(f"class {c} out of range for {self.num_classes} classes")
        r = self.images_per_class
        return torch.arange(c * r, (c + 1) * r)

    # ----------------------------------------------------------------------------------------- subclass
    def check_data(self, counts: list[int], class_names: list[str]) -> None:
        """Refuse real data the set cannot be initialised from, before any parameter is allocated.

        Args:
            counts: training images per class.
            class_names: the classes' names, for the message.
        """

    def _build(self) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def initialise(self, x_real: Tensor, y_real: Tensor, generator: torch.Generator | None = None) -> None:
        """Fill the values (e.g. from random real images of each class)."""
        raise NotImplementedError

    def forward(self, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(x_syn, y_syn)``: images ``(N, C, H, W)`` and labels (``(N,)`` int64 or ``(N, K)`` float).

        Args:
            index: ``(B,)`` indices into the generated set (see :meth:`class_index`); ``None`` builds all of it.
                Subclasses that generate images should build only the requested ones.
        """
        raise NotImplementedError

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The learnable tensors in named groups (each group gets its own optimiser settings).

        The default is one group, ``synthetic``, holding every parameter that requires a gradient.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        return {"synthetic": params} if params else {}

    def export_extras(self) -> dict[str, Tensor]:
        """Tensors an export stores beside the generated images (none for a pixel set)."""
        return {}

    def storage(self) -> dict[str, Any]:
        """What the set costs to store: floats of its image parameters and buffers, beside a pixel set's.

        Returns ``floats`` (every parameter and floating buffer except the labels), ``label_floats`` (float labels,
        0 for hard ones), ``pixel_floats`` (what ``ipc`` raw images per class would take) and ``ipc_equivalent``
        (``floats`` in images per class).
        """
        if not self.is_built:
            raise RuntimeError("the synthetic set is not built yet: call build(num_classes, image_shape)")
        labels = getattr(self, "labels", None)
        tensors = list(self.parameters()) + [b for b in self.buffers() if b.is_floating_point()]
        label_floats = labels.numel() if isinstance(labels, Tensor) and labels.is_floating_point() else 0
        floats = sum(t.numel() for t in tensors if t is not labels)
        per_image = math.prod(self.image_shape)
        return {
            "floats": int(floats),
            "label_floats": int(label_floats),
            "pixel_floats": int(self.ipc * self.num_classes * per_image),
            "ipc_equivalent": floats / (self.num_classes * per_image),
        }

    # ------------------------------------------------------------------------------------------- views
    @torch.no_grad()
    def view(self, source: str = "live") -> DistilledView:
        """A detached snapshot of the whole generated set (see :class:`DistilledView`)."""
        x_syn, y_syn = self()
        return DistilledView(
            images=x_syn.detach().clone(),
            labels=y_syn.detach().clone(),
            label_kind=self.label_kind,
            images_per_class=self.images_per_class,
            class_ids=self.class_ids().to(x_syn.device),
            extras={k: v.detach().clone() for k, v in self.export_extras().items()},
            storage=self.storage(),
            source=source,
        )

    def extra_repr(self) -> str:
        return (
            f"ipc={self.ipc}, num_classes={self.num_classes}, image_shape={self.image_shape}, labels={self.label_kind}"
        )
