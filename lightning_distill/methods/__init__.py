"""Distillation methods (one per file)."""

from lightning_distill.methods.apm import APM
from lightning_distill.methods.base import DistillationMethod, MetaStep, NonFiniteMetaStep
from lightning_distill.methods.frepo import FRePo
from lightning_distill.methods.memories import MemoriesBPTT
from lightning_distill.methods.random_subset import RandomSubset
from lightning_distill.methods.rcig import RCIG

__all__ = [
    "APM",
    "DistillationMethod",
    "FRePo",
    "MemoriesBPTT",
    "MetaStep",
    "NonFiniteMetaStep",
    "RCIG",
    "RandomSubset",
]
