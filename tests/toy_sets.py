"""A toy factorised synthetic set (r ≠ ipc images per class from shared bases), for the contract suite."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_distill.synthetic import SyntheticSet, select_real


class MixtureSet(SyntheticSet):
    """``num_bases`` shared images mixed by one coefficient row per generated image; ``per_class`` images a class.

    Hard labels. It stands in for a factorised memory: it generates more images than its ``ipc`` budget, builds
    subsets by index, stores its bases and coefficients as export extras, and has two parameter groups.
    """

    def __init__(self, ipc: int, per_class: int = 3, num_bases: int = 4) -> None:
        self.per_class, self.num_bases = per_class, num_bases
        super().__init__(ipc)

    @property
    def images_per_class(self) -> int:
        return self.per_class

    def _build(self) -> None:
        self.bases = nn.Parameter(torch.zeros(self.num_bases, *self.image_shape))
        self.coefficients = nn.Parameter(torch.zeros(self.num_images, self.num_bases))
        self.register_buffer("labels", self.class_ids())

    @torch.no_grad()
    def initialise(self, x_real: Tensor, y_real: Tensor, generator: torch.Generator | None = None) -> None:
        per = -(-self.num_bases // self.num_classes)
        picks = select_real(x_real, y_real, self.num_classes, per, generator)[: self.num_bases]
        self.bases.copy_(picks.to(self.bases))
        coef = torch.rand(self.coefficients.shape, generator=generator)
        self.coefficients.copy_((coef / coef.sum(1, keepdim=True)).to(self.coefficients))

    def forward(self, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        coef = self.coefficients if index is None else self.coefficients[index.to(self.coefficients.device)]
        labels = self.labels if index is None else self.labels[index.to(self.labels.device)]
        images = (coef @ self.bases.flatten(1)).view(len(coef), *self.image_shape)
        return images, labels

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"bases": [self.bases], "coefficients": [self.coefficients]}

    def export_extras(self) -> dict[str, Tensor]:
        return {"bases": self.bases, "coefficients": self.coefficients}
