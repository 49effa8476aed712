"""Learnable synthetic sets."""

from lightning_distill.synthetic.base import DistilledView, LabelKind, SyntheticSet
from lightning_distill.synthetic.pixels import PixelSet, select_real

__all__ = ["DistilledView", "LabelKind", "PixelSet", "SyntheticSet", "select_real"]
