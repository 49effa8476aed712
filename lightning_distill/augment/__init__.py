"""Differentiable, seeded, replayable augmentation: siamese DSA and the FRePo/RCIG evaluation augmentation.

Randomness is explicit: ``aug.sample(batch_size, generator, device)`` draws a params dict from a
``torch.Generator`` (never the global RNG), ``aug.apply(x, params)`` replays it, and ``aug(x, generator=g)`` does
both.
"""

from lightning_distill.augment.dsa import DSA
from lightning_distill.augment.functional import (
    affine,
    brightness,
    contrast,
    cutout,
    flip,
    rotate,
    saturation,
    scale,
    translate,
)
from lightning_distill.augment.krr_augment import KRRAugment

__all__ = [
    "DSA",
    "KRRAugment",
    "affine",
    "brightness",
    "contrast",
    "cutout",
    "flip",
    "rotate",
    "saturation",
    "scale",
    "translate",
]
