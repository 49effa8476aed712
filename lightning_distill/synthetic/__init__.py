"""Learnable synthetic sets."""

from lightning_distill.synthetic.base import DistilledView, LabelKind, SyntheticSet
from lightning_distill.synthetic.memories import AddressableMemories, memory_rows_per_class
from lightning_distill.synthetic.pixels import PixelSet, select_kmeans, select_real

__all__ = [
    "AddressableMemories",
    "DistilledView",
    "LabelKind",
    "PixelSet",
    "SyntheticSet",
    "memory_rows_per_class",
    "select_kmeans",
    "select_real",
]
