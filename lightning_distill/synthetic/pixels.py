"""``PixelSet``: one learnable tensor of images, with hard, soft or learnable labels."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_distill.functional.kmeans import kmeans_pp_starts, lloyd, squared_distances
from lightning_distill.functional.losses import centred_one_hot
from lightning_distill.synthetic.base import LabelKind, SyntheticSet


class PixelSet(SyntheticSet):
    """Synthetic images stored as raw pixels (in model-input space), ``ipc`` per class.

    Args:
        ipc: images per class.
        num_classes: number of classes (``None``: from the data).
        image_shape: ``(C, H, W)`` (``None``: from the data).
        init: ``"real"`` draws random real images of each class; ``"kmeans"`` takes, in each class, the real
            image nearest each centre of a k-means with ``ipc`` clusters (see :func:`select_kmeans`): real images
            that cover the class's modes instead of a random draw; ``"noise"`` draws standard normal pixels
            (the inputs are normalised, so unit variance matches the data's scale).
        labels: ``"hard"`` (class ids, fixed), ``"soft"`` (fixed float targets) or ``"learned"`` (float targets
            that the method optimises, FRePo/RCIG style).
        centred: soft/learned labels use the centred one-hot convention (1 - 1/C, -1/C) instead of one-hot.
        label_scale: multiplies the initial soft/learned labels (FRePo: 1/sqrt(C/10)); ``None`` means 1.
    """

    def __init__(
        self,
        ipc: int,
        num_classes: int | None = None,
        image_shape: Sequence[int] | None = None,
        init: Literal["real", "kmeans", "noise"] = "real",
        labels: LabelKind = "hard",
        centred: bool = True,
        label_scale: float | None = None,
    ) -> None:
        if init not in ("real", "kmeans", "noise"):
            raise ValueError(f"init must be 'real', 'kmeans' or 'noise', got {init!r}")
        if labels not in ("hard", "soft", "learned"):
            raise ValueError(f"labels must be 'hard', 'soft' or 'learned', got {labels!r}")
        self.init = init
        self.label_kind = labels
        self.centred = centred
        self.label_scale = 1.0 if label_scale is None else float(label_scale)
        super().__init__(ipc, num_classes, image_shape)

    def check_data(self, counts: list[int], class_names: list[str]) -> None:
        """With ``init="real"`` or ``"kmeans"`` every class needs at least ``ipc`` training images."""
        if self.init == "noise":
            return
        short = [c for c, n in enumerate(counts) if n < self.ipc]
        if short:
            c = min(short, key=lambda i: counts[i])
            raise ValueError(
                f"ipc={self.ipc} needs {self.ipc} training images of every class, but class {c} ({class_names[c]}) "
                f"has {counts[c]}: use ipc <= {min(counts)} (or init: noise)"
            )

    def _build(self) -> None:
        n, (c, h, w), _k = self.num_images, self.image_shape, self.num_classes
        self.images = nn.Parameter(torch.zeros(n, c, h, w))
        if self.label_kind == "hard":
            self.register_buffer("labels", self.class_ids())
        else:
            target = self._initial_targets()
            if self.label_kind == "learned":
                self.labels = nn.Parameter(target)
            else:
                self.register_buffer("labels", target)

    def _initial_targets(self) -> Tensor:
        ids = self.class_ids()
        if self.centred:
            return centred_one_hot(ids, self.num_classes, scale=self.label_scale)
        return torch.nn.functional.one_hot(ids, self.num_classes).float() * self.label_scale

    @torch.no_grad()
    def initialise(self, x_real: Tensor, y_real: Tensor, generator: torch.Generator | None = None) -> None:
        """``ipc`` distinct real images of each class, at random or by k-means (or noise when ``init="noise"``)."""
        if not self.is_built:
            raise RuntimeError("build(num_classes, image_shape) before initialise()")
        if tuple(x_real.shape[1:]) != self.image_shape:
            raise ValueError(f"real images have shape {tuple(x_real.shape[1:])}, the set expects {self.image_shape}")
        if self.init == "noise":
            # Drawn on the generator's device (CPU), then moved: the same seed gives the same set on any device.
            self.images.copy_(torch.randn(self.images.shape, generator=generator).to(self.images))
            return
        select = select_kmeans if self.init == "kmeans" else select_real
        self.images.copy_(select(x_real, y_real, self.num_classes, self.ipc, generator).to(self.images))

    def forward(self, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if index is None:
            return self.images, self.labels
        index = index.to(self.images.device)
        return self.images[index], self.labels[index]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``images`` and, when learned, ``labels``: two groups, so a recipe can give labels their own rate."""
        groups = {"images": [self.images]} if self.images.requires_grad else {}
        if isinstance(self.labels, nn.Parameter) and self.labels.requires_grad:
            groups["labels"] = [self.labels]
        return groups


def select_real(
    x_real: Tensor, y_real: Tensor, num_classes: int, ipc: int, generator: torch.Generator | None
) -> Tensor:
    """``ipc`` distinct random images of each class in class order: ``(num_classes * ipc, C, H, W)``.

    Raises:
        ValueError: when a class has fewer than ``ipc`` images.
    """
    return _per_class(
        x_real, y_real, num_classes, ipc, lambda idx: idx[torch.randperm(len(idx), generator=generator)[:ipc]]
    )


def select_kmeans(
    x_real: Tensor,
    y_real: Tensor,
    num_classes: int,
    ipc: int,
    generator: torch.Generator | None,
    max_iterations: int = 100,
) -> Tensor:
    """``ipc`` distinct real images of each class, nearest the centres of a k-means of the class.

    Returns ``(num_classes * ipc, C, H, W)`` in class order.

    A random draw of ``ipc`` images can take two from one mode of a class and none from another; the images nearest
    k-means centres cover the class, so a short distillation starts closer to a set that represents it (the idea of
    DREAM, Liu et al. 2023, used here only to choose the starting images). Per class, in pixel space:
    :func:`~lightning_distill.functional.kmeans.kmeans_pp_starts` from ``generator``, then
    :func:`~lightning_distill.functional.kmeans.lloyd`; each centre then takes the nearest image not
    taken by an earlier centre, so the picks are distinct real images and the same ``generator`` gives the same set.

    Raises:
        ValueError: when a class has fewer than ``ipc`` images.
    """

    def pick(idx: Tensor) -> Tensor:
        x_c = x_real[idx.to(x_real.device)].flatten(1).float()
        dist = squared_distances(lloyd(x_c, kmeans_pp_starts(x_c, ipc, generator), max_iterations), x_c)
        chosen = []
        for k in range(ipc):
            j = int(dist[k].argmin())
            chosen.append(j)
            dist[:, j] = float("inf")
        return idx[chosen]

    return _per_class(x_real, y_real, num_classes, ipc, pick)


def _per_class(x_real: Tensor, y_real: Tensor, num_classes: int, ipc: int, pick: Callable[[Tensor], Tensor]) -> Tensor:
    """``x_real`` at ``pick(indices of class c)`` for each class in order; refuses a class with fewer than ``ipc``."""
    y_cpu = y_real.cpu()
    picks = []
    for c in range(num_classes):
        idx = torch.nonzero(y_cpu == c).flatten()
        if len(idx) < ipc:
            raise ValueError(f"class {c} has {len(idx)} real images, fewer than ipc={ipc}")
        picks.append(pick(idx))
    return x_real[torch.cat(picks).to(x_real.device)]
