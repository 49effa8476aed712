"""Learnable synthetic sets."""

from lightning_distill.synthetic.base import LabelKind, SyntheticSet
from lightning_distill.synthetic.pixels import PixelSet, select_real

__all__ = ["LabelKind", "PixelSet", "SyntheticSet", "select_real"]
