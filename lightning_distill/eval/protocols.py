"""Named evaluation protocols: how fresh networks are trained on a distilled set."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

#: Datasets whose images must not be flipped horizontally (digits): the augmentation drops flip for them.
NO_FLIP_DATASETS = frozenset({"mnist", "fashion_mnist", "svhn"})

# FRePo's evaluation length by distilled-set size N (script/eval.py); other N take the next larger entry.
_KRR_STEPS = {10: 1000, 100: 2000, 200: 20000, 400: 5000, 500: 5000, 1000: 10000, 2000: 40000, 5000: 40000}


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol; every number it produces is recorded with its name.

    Attributes:
        name: ``dc`` or ``krr``.
        arch: default network (registry name) and ``arch_kwargs`` its options.
        optimizer: ``sgd`` or ``adam``; ``lr``, ``momentum``, ``weight_decay`` its settings.
        loss: ``ce`` (cross-entropy on class ids; float labels enter as their argmax class) or ``mse`` (regression
            on float labels; class ids as centred one-hot).
        schedule: ``step_half`` (lr x0.1 after half the steps) or ``warmup_cosine`` (linear warm-up, cosine to 1 %).
        epochs: passes over the set (``dc``); ``None`` means the step count comes from :meth:`num_steps`.
        batch_size: training batch (capped at the set size).
        augment: ``dsa`` (per-image DSA, one op group per batch) or ``krr`` (FRePo's op set, one op per batch).
        shuffle: reshuffle every epoch (FRePo's evaluation takes fixed slices in order).
    """

    name: str
    arch: str
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    loss: str = "ce"
    schedule: str = "step_half"
    epochs: int | None = 1000
    batch_size: int = 256
    augment: str = "dsa"
    shuffle: bool = True
    warmup: int = 500

    def num_steps(self, num_images: int, epochs: int | None = None, steps: int | None = None) -> int:
        """Total optimiser steps for a set of ``num_images`` (``epochs`` / ``steps`` override the protocol)."""
        if steps is not None:
            return steps
        epochs = epochs if epochs is not None else self.epochs
        if epochs is not None:
            return epochs * -(-num_images // self.batch_size)
        keys = sorted(_KRR_STEPS)
        i = min(bisect.bisect_left(keys, num_images), len(keys) - 1)
        return _KRR_STEPS[keys[i]]


PROTOCOLS: dict[str, Protocol] = {
    # DC/DSA/MTT/APM: ConvNet-3 instance norm, SGD 0.01/0.9/5e-4, batch 256, 1000 epochs, lr x0.1 at half, DSA.
    "dc": Protocol(name="dc", arch="convnet", arch_kwargs={"width": 128, "norm": "instance"}),
    # FRePo/RCIG: their ConvNet without normalisation, Adam 3e-4, MSE on the stored labels, 500 warm-up steps then
    # cosine to 1 %, steps by set size, batch min(N, 500), one augmentation op per batch.
    "krr": Protocol(
        name="krr",
        arch="convnet_frepo",
        arch_kwargs={"norm": "none"},
        optimizer="adam",
        lr=3e-4,
        momentum=0.0,
        weight_decay=0.0,
        loss="mse",
        schedule="warmup_cosine",
        epochs=None,
        batch_size=500,
        augment="krr",
        shuffle=False,
    ),
}


def get_protocol(name: str | Protocol) -> Protocol:
    """Look a protocol up by name (a :class:`Protocol` passes through)."""
    if isinstance(name, Protocol):
        return name
    if name not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {name!r}; choose one of {', '.join(sorted(PROTOCOLS))}")
    return PROTOCOLS[name]
