"""``AddressableMemories``: K shared bases and r learned coefficient rows ("addresses") per class.

Deng & Russakovsky, "Remember the Past: Distilling Datasets into Addressable Memories for Neural Networks",
NeurIPS 2022 (re-implemented from the paper's description; see shared/reference/methods_memories_apm.md §1).
Image ``c·r + i`` (address ``i`` of class ``c``) is its coefficient row times the flattened bases, reshaped to
``(C, H/ds, W/ds)`` and upsampled bilinearly to ``(C, H, W)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_distill.functional.losses import centred_one_hot
from lightning_distill.synthetic.base import LabelKind, SyntheticSet
from lightning_distill.synthetic.pixels import select_real

__all__ = ["AddressableMemories", "memory_rows_per_class"]


def memory_rows_per_class(
    budget: int, num_classes: int, image_shape: Sequence[int], num_bases: int, downsample: int = 1
) -> int:
    """Addresses per class ``r`` that fit a storage budget of ``budget`` images per class.

    Bases (``K`` images at ``1/downsample`` resolution) and coefficients (``r·C`` rows of ``K``) are counted as
    floats, like pixels; hard labels are free: ``r = floor((B·C·d − K·d') / (C·K))`` with ``d = C_in·H·W`` and
    ``d' = C_in·(H/ds)·(W/ds)``. K = 16, ds = 2 gives r = 29 on MNIST and 115 on CIFAR-10 at budget 1.

    Raises:
        ValueError: when the bases alone exceed the budget, or a side is not divisible by ``downsample``.
    """
    c, h, w = (int(s) for s in image_shape)
    if num_bases < 1 or downsample < 1 or budget < 1 or num_classes < 1:
        raise ValueError(
            f"budget, num_classes, num_bases and downsample must be positive, got {budget}, {num_classes}, "
            f"{num_bases}, {downsample}"
        )
    if h % downsample or w % downsample:
        raise ValueError(f"downsample={downsample} must divide the image sides {h}x{w}: choose a divisor (1, 2, 4)")
    base_floats = c * (h // downsample) * (w // downsample)
    free = budget * num_classes * c * h * w - num_bases * base_floats
    r = free // (num_classes * num_bases)
    if r < 1:
        raise ValueError(
            f"{num_bases} bases of {c}x{h // downsample}x{w // downsample} leave no room for coefficients in a budget "
            f"of {budget} image(s) per class: use fewer bases, a larger downsample, or a larger budget"
        )
    return int(r)


class AddressableMemories(SyntheticSet):
    """A factorised synthetic set: ``num_bases`` shared bases, ``r`` coefficient rows per class, one image per row.

    ``ipc`` is the storage budget in images per class; ``r`` (:attr:`images_per_class`) is derived from it by
    :func:`memory_rows_per_class` unless ``rows_per_class`` fixes it. Each generated image has one label: its class
    (``hard``, the paper's), or a float target (``soft`` fixed, ``learned`` optimised; one per address).

    Meta-parameters come in groups ``bases`` and ``coefficients`` (and ``labels`` when learned), so a recipe can give
    each its own rate. ``forward(index)`` builds only the requested images, so a method can sample per-class batches
    without generating the whole set. The export stores the generated images plus ``bases`` and ``coefficients``.

    Args:
        ipc: storage budget in images per class.
        num_bases: ``K``, the number of shared bases (paper: 16).
        downsample: ``ds``, bases are stored at ``1/ds`` resolution and upsampled bilinearly (paper: 2).
        rows_per_class: ``r``; ``None`` takes the most that fit the budget.
        num_classes: number of classes (``None``: from the data).
        image_shape: ``(C, H, W)`` (``None``: from the data).
        init: ``"xavier"`` (the official code: Xavier-uniform bases and coefficients) or ``"real"`` (bases are random
            real images, downsampled, spread over the classes; the rows of class ``c`` start on ``c``'s bases plus
            small noise).
        labels: ``"hard"`` (class ids), ``"soft"`` (fixed float targets) or ``"learned"``.
        centred: soft/learned labels use the centred one-hot convention.
        label_scale: multiplies the initial soft/learned labels; ``None`` means 1.
        allow_over_budget: accept a ``rows_per_class`` whose storage exceeds the budget (off: refused).
    """

    def __init__(
        self,
        ipc: int,
        num_bases: int = 16,
        downsample: int = 2,
        rows_per_class: int | None = None,
        num_classes: int | None = None,
        image_shape: Sequence[int] | None = None,
        init: Literal["xavier", "real"] = "xavier",
        labels: LabelKind = "hard",
        centred: bool = True,
        label_scale: float | None = None,
        allow_over_budget: bool = False,
    ) -> None:
        if init not in ("xavier", "real"):
            raise ValueError(f"init must be 'xavier' or 'real', got {init!r}")
        if labels not in ("hard", "soft", "learned"):
            raise ValueError(f"labels must be 'hard', 'soft' or 'learned', got {labels!r}")
        if isinstance(num_bases, bool) or not isinstance(num_bases, int) or num_bases < 1:
            raise ValueError(f"num_bases must be a positive integer, got {num_bases!r}")
        if isinstance(downsample, bool) or not isinstance(downsample, int) or downsample < 1:
            raise ValueError(f"downsample must be a positive integer (1: full resolution), got {downsample!r}")
        if rows_per_class is not None and (not isinstance(rows_per_class, int) or rows_per_class < 1):
            raise ValueError(
                f"rows_per_class must be a positive integer or null (from the budget), got {rows_per_class!r}"
            )
        self.num_bases, self.downsample = num_bases, downsample
        self.rows_per_class = rows_per_class
        self.init = init
        self.label_kind = labels
        self.centred = centred
        self.label_scale = 1.0 if label_scale is None else float(label_scale)
        self.allow_over_budget = allow_over_budget
        self._r: int | None = None
        super().__init__(ipc, num_classes, image_shape)

    # ------------------------------------------------------------------------------------------- shapes
    @property
    def images_per_class(self) -> int:
        """``r``, the addresses (generated images) per class; known once the set is built."""
        if self._r is None:
            if self.rows_per_class is None:
                raise RuntimeError("the memory is not built yet: r follows from the data's shape (call build)")
            return self.rows_per_class
        return self._r

    @property
    def base_shape(self) -> tuple[int, int, int]:
        c, h, w = self.image_shape
        return c, h // self.downsample, w // self.downsample

    def _build(self) -> None:
        budget_r = memory_rows_per_class(self.ipc, self.num_classes, self.image_shape, self.num_bases, self.downsample)
        if self.rows_per_class is not None and self.rows_per_class > budget_r and not self.allow_over_budget:
            raise ValueError(
                f"rows_per_class={self.rows_per_class} exceeds the budget of {self.ipc} image(s) per class "
                f"({budget_r} rows fit with {self.num_bases} bases): lower it, leave it null, or set allow_over_budget"
            )
        self._r = self.rows_per_class or budget_r
        self.bases = nn.Parameter(torch.zeros(self.num_bases, *self.base_shape))
        self.coefficients = nn.Parameter(torch.zeros(self.num_images, self.num_bases))
        if self.label_kind == "hard":
            self.register_buffer("labels", self.class_ids())
        else:
            ids = self.class_ids()
            if self.centred:
                target = centred_one_hot(ids, self.num_classes, scale=self.label_scale)
            else:
                target = F.one_hot(ids, self.num_classes).float() * self.label_scale
            if self.label_kind == "learned":
                self.labels = nn.Parameter(target)
            else:
                self.register_buffer("labels", target)

    # --------------------------------------------------------------------------------------------- values
    @torch.no_grad()
    def initialise(self, x_real: Tensor, y_real: Tensor, generator: torch.Generator | None = None) -> None:
        """Xavier-uniform bases and coefficients (the official code), or real-image bases (``init="real"``)."""
        if not self.is_built:
            raise RuntimeError("build(num_classes, image_shape) before initialise()")
        if tuple(x_real.shape[1:]) != self.image_shape:
            raise ValueError(f"real images have shape {tuple(x_real.shape[1:])}, the set expects {self.image_shape}")
        k, n = self.num_bases, self.num_images
        if self.init == "xavier":
            # Drawn on the CPU generator, then moved: the same seed gives the same set on any device.
            d = math.prod(self.base_shape)
            bound_b, bound_c = math.sqrt(6.0 / (k + d)), math.sqrt(6.0 / (n + k))
            bases = (torch.rand(self.bases.shape, generator=generator) * 2 - 1) * bound_b
            coef = (torch.rand(self.coefficients.shape, generator=generator) * 2 - 1) * bound_c
        else:
            # Base j holds a real image of class j mod C, so every class owns at least one base when K >= C.
            per = -(-k // self.num_classes)
            picks = select_real(x_real, y_real, self.num_classes, per, generator).cpu()
            order = torch.arange(per * self.num_classes).view(self.num_classes, per).t().flatten()[:k]
            small = F.interpolate(picks[order].float(), size=self.base_shape[1:], mode="area")
            bases = small
            owner = torch.arange(k) % self.num_classes
            coef = torch.randn(self.coefficients.shape, generator=generator) * 0.05
            own = (owner[None, :] == self.class_ids()[:, None]).float()
            coef += own / own.sum(1, keepdim=True).clamp_min(1)
        self.bases.copy_(bases.to(self.bases))
        self.coefficients.copy_(coef.to(self.coefficients))

    def check_data(self, counts: list[int], class_names: list[str]) -> None:
        """With ``init="real"`` every class needs enough training images for its bases."""
        if self.init != "real":
            return
        need = -(-self.num_bases // len(counts))
        short = [c for c, m in enumerate(counts) if m < need]
        if short:
            c = short[0]
            raise ValueError(
                f"init: real needs {need} training images of every class, but class {c} ({class_names[c]}) has "
                f"{counts[c]}: use init: xavier or fewer bases"
            )

    def generate(self, coefficients: Tensor, bases: Tensor) -> Tensor:
        """Images from coefficient rows ``(B, K)`` and bases ``(K, C, h, w)``: ``(B, C, H, W)``."""
        x = (coefficients @ bases.flatten(1)).view(len(coefficients), *bases.shape[1:])
        if self.downsample > 1:
            x = F.interpolate(x, size=self.image_shape[1:], mode="bilinear", align_corners=False)
        return x

    def forward(self, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if index is None:
            return self.generate(self.coefficients, self.bases), self.labels
        index = index.to(self.coefficients.device)
        return self.generate(self.coefficients[index], self.bases), self.labels[index]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``bases``, ``coefficients`` and, when learned, ``labels``."""
        groups = {n: [p] for n, p in (("bases", self.bases), ("coefficients", self.coefficients)) if p.requires_grad}
        if isinstance(self.labels, nn.Parameter) and self.labels.requires_grad:
            groups["labels"] = [self.labels]
        return groups

    def export_extras(self) -> dict[str, Tensor]:
        """The bases and coefficients, stored beside the generated images."""
        return {"bases": self.bases, "coefficients": self.coefficients}

    def storage(self) -> dict[str, Any]:
        """Floats of bases and coefficients beside the pixel set of the same budget, with the memory's shape."""
        out = super().storage()
        out.update(
            bases=int(self.bases.numel()),
            coefficients=int(self.coefficients.numel()),
            num_bases=self.num_bases,
            downsample=self.downsample,
            rows_per_class=self.images_per_class,
        )
        return out

    def extra_repr(self) -> str:
        r = self._r if self._r is not None else self.rows_per_class
        return f"{super().extra_repr()}, num_bases={self.num_bases}, downsample={self.downsample}, rows_per_class={r}"
