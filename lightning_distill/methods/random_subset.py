"""``RandomSubset``: the random-real baseline (``ipc`` random real images per class, nothing learned)."""

from __future__ import annotations

from torch import Tensor

from lightning_distill.methods.base import DistillationMethod, MetaStep
from lightning_distill.synthetic.base import SyntheticSet


class RandomSubset(DistillationMethod):
    """Random real images of each class: the baseline every distilled set must beat.

    It runs the whole pipeline (data, synthetic set, checkpoints, export, evaluation) without updating the set:
    its ``outer_loss`` returns ``None`` (the base class then steps the optimiser without gradients, which changes
    nothing but counts the outer step). With ``PixelSet(init="real")`` the exported set is ``ipc`` distinct random
    training images per class, drawn with ``seed``.

    Args:
        synthetic: the set to fill (a ``PixelSet`` with ``init: real`` for the published baseline).
        seed: which random images are drawn.
    """

    learns = False

    def __init__(self, synthetic: SyntheticSet, seed: int = 0) -> None:
        super().__init__(synthetic=synthetic, seed=seed, precision="fp32")  # no network passes

    def outer_loss(self, x_syn: Tensor, y_syn: Tensor, x_real: Tensor, y_real: Tensor) -> MetaStep | None:
        return None
