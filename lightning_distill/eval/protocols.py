"""Evaluation protocols: how fresh networks are trained on a distilled set, as registered, recorded objects.

A :class:`Protocol` names its parts (loss, optimiser, learning-rate schedule, augmentation, label rule), and each
part is looked up in a small registry here, so a method's own file can add a part and a protocol without touching
this package::

    @register_loss("my_loss", targets="float")
    def my_loss(out, target):
        return (out - target).abs().max(1).values.mean()

    register_protocol(Protocol(name="mine", arch="convnet", loss="my_loss", schedule="constant", epochs=300))

Parts are held by name, never as callables, so a protocol stays plain data: :meth:`Protocol.to_dict` is recorded
with every number it produces, and a name in a record means the same code on every machine that registers it.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Generic, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_distill.augment import DSA, KRRAugment
from lightning_distill.functional.losses import centred_one_hot

__all__ = [
    "NO_FLIP_DATASETS",
    "PROTOCOLS",
    "Loss",
    "Protocol",
    "get_protocol",
    "make_augment",
    "make_loss",
    "make_optimizer",
    "make_schedule",
    "prepare_labels",
    "register_augment",
    "register_labels",
    "register_loss",
    "register_optimizer",
    "register_protocol",
    "register_schedule",
    "training_set",
]

#: Datasets whose images must not be flipped horizontally (digits): the augmentation drops flip for them.
NO_FLIP_DATASETS = frozenset({"mnist", "fashion_mnist", "svhn"})

# FRePo's evaluation length by distilled-set size N (script/eval.py); other N take the next larger entry.
_KRR_STEPS = {10: 1000, 100: 2000, 200: 20000, 400: 5000, 500: 5000, 1000: 10000, 2000: 40000, 5000: 40000}

T = TypeVar("T")

#: What a loss regresses or classifies: ``class`` ids ``(B,)`` or ``float`` targets ``(B, K)``.
TargetKind = Literal["class", "float"]
#: ``(params, protocol) -> optimiser``; reads ``protocol.lr`` / ``momentum`` / ``weight_decay``.
OptimizerFactory = Callable[[Iterable[nn.Parameter], "Protocol"], torch.optim.Optimizer]
#: ``(protocol, n_steps) -> (step -> lr factor)``, the ``lr_lambda`` of a ``LambdaLR``.
ScheduleFactory = Callable[["Protocol", int], Callable[[int], float]]
#: ``(flip) -> augmentation``; the module is called as ``aug(x, generator=g)``.
AugmentFactory = Callable[[bool], nn.Module]
#: ``(labels, target kind, num_classes) -> (targets, note)``; the note is recorded in ``result.extra["labels"]``.
LabelRule = Callable[[Tensor, TargetKind, int], tuple[Tensor, str]]


class _Registry(Generic[T]):
    """A name -> part mapping that refuses duplicates, like the network registry.

    Silently replacing a part would change what an existing protocol name trains, and so what its recorded numbers
    mean; a duplicate is always a mistake (two files picking one name).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"a {self.kind} named {name!r} is already registered ({self._items[name]!r})")
        self._items[name] = item
        return item

    def decorator(self, name: str) -> Callable[[T], T]:
        return lambda item: self.add(name, item)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)


@dataclass(frozen=True)
class Loss:
    """A registered training loss: ``fn(out, target) -> scalar`` and the kind of target it takes."""

    fn: Callable[[Tensor, Tensor], Tensor]
    targets: TargetKind

    def __call__(self, out: Tensor, target: Tensor) -> Tensor:
        return self.fn(out, target)


_LOSSES: _Registry[Loss] = _Registry("loss")
_OPTIMIZERS: _Registry[OptimizerFactory] = _Registry("optimizer")
_SCHEDULES: _Registry[ScheduleFactory] = _Registry("schedule")
_AUGMENTS: _Registry[AugmentFactory] = _Registry("augmentation")
_LABELS: _Registry[LabelRule] = _Registry("label rule")


def register_loss(
    name: str, targets: TargetKind
) -> Callable[[Callable[[Tensor, Tensor], Tensor]], Callable[[Tensor, Tensor], Tensor]]:
    """Register ``fn(out, target) -> scalar loss`` under ``name`` (a decorator; the function comes back unchanged).

    Args:
        name: the name protocols use, e.g. ``"l1"``.
        targets: ``"class"`` (class ids ``(B,)``) or ``"float"`` (targets ``(B, K)``): the label rule turns the
            stored labels into this kind before training.

    Raises:
        ValueError: on a name already registered, or an unknown target kind.
    """
    if targets not in ("class", "float"):
        raise ValueError(f"loss targets must be 'class' or 'float', got {targets!r}")

    def decorator(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
        _LOSSES.add(name, Loss(fn, targets))
        return fn

    return decorator


def register_optimizer(name: str) -> Callable[[OptimizerFactory], OptimizerFactory]:
    """Register ``factory(params, protocol) -> Optimizer`` under ``name`` (a decorator); raises on a duplicate."""
    return _OPTIMIZERS.decorator(name)


def register_schedule(name: str) -> Callable[[ScheduleFactory], ScheduleFactory]:
    """Register ``factory(protocol, n_steps) -> lr_lambda`` under ``name`` (a decorator); raises on a duplicate.

    ``lr_lambda(t)`` is the factor on ``protocol.lr`` for step ``t`` (0-based), as ``LambdaLR`` calls it.
    """
    return _SCHEDULES.decorator(name)


def register_augment(name: str) -> Callable[[AugmentFactory], AugmentFactory]:
    """Register ``factory(flip) -> nn.Module`` under ``name`` (a decorator); raises on a duplicate.

    The module is called as ``aug(x, generator=g)`` once per batch; ``flip=False`` must leave out horizontal flips.
    """
    return _AUGMENTS.decorator(name)


def register_labels(name: str) -> Callable[[LabelRule], LabelRule]:
    """Register a label rule ``rule(labels, targets, num_classes) -> (targets, note)`` (a decorator).

    ``targets`` is the loss's target kind; the rule returns labels of that kind and a note recorded with the result.
    A rule applied to its own output must return it unchanged (:func:`train_network` re-applies it to labels that
    :func:`train_on_distilled` already prepared). Raises on a duplicate name.
    """
    return _LABELS.decorator(name)


# --- built-in parts ---------------------------------------------------------------------------------------------


@register_loss("ce", targets="class")
def _cross_entropy(out: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(out, target)


@register_loss("mse", targets="float")
def _half_sum_squares(out: Tensor, target: Tensor) -> Tensor:
    # FRePo/RCIG: ½·sum over classes, mean over the batch (not F.mse_loss, which also averages over classes).
    return 0.5 * (out - target).pow(2).sum(1).mean()


@register_loss("l1", targets="float")
def _sum_abs(out: Tensor, target: Tensor) -> Tensor:
    # APM regresses teacher logits: sum of absolute errors over classes, mean over the batch.
    return (out - target).abs().sum(1).mean()


@register_optimizer("sgd")
def _sgd(params: Iterable[nn.Parameter], protocol: Protocol) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=protocol.lr, momentum=protocol.momentum, weight_decay=protocol.weight_decay)


@register_optimizer("adam")
def _adam(params: Iterable[nn.Parameter], protocol: Protocol) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=protocol.lr, weight_decay=protocol.weight_decay)


@register_schedule("step_half")
def _step_half(protocol: Protocol, n_steps: int) -> Callable[[int], float]:
    return lambda t: 1.0 if t < n_steps // 2 else 0.1


@register_schedule("warmup_cosine")
def _warmup_cosine(protocol: Protocol, n_steps: int) -> Callable[[int], float]:
    # Short runs (tests, budgets) keep the shape: warm-up never exceeds half the run.
    warm = min(protocol.warmup, n_steps // 2)

    def f(t: int) -> float:
        if t < warm:
            return (t + 1) / warm
        p = (t - warm) / max(1, n_steps - warm)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))

    return f


@register_schedule("constant")
def _constant(protocol: Protocol, n_steps: int) -> Callable[[int], float]:
    return lambda t: 1.0


class _NoAugment(nn.Module):
    """The identity, called like the augmentations (it draws nothing from the generator)."""

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return x


@register_augment("dsa")
def _dsa(flip: bool) -> nn.Module:
    # Per-image DSA parameters, one op group per batch (DC/DSA/MTT evaluation).
    return DSA("color_crop_cutout_flip_scale_rotate" if flip else "color_crop_cutout_scale_rotate", batchwise=False)


@register_augment("krr")
def _krr(flip: bool) -> nn.Module:
    # FRePo's op set, one op per batch.
    return KRRAugment("flip_color_crop_rotate_translate_cutout" if flip else "color_crop_rotate_translate_cutout")


@register_augment("none")
def _none(flip: bool) -> nn.Module:
    return _NoAugment()


@register_labels("as_stored")
def _as_stored(labels: Tensor, targets: TargetKind, num_classes: int) -> tuple[Tensor, str]:
    if targets == "class" and labels.ndim == 2:
        # A class-label loss (dc): SGD on MSE targets barely trains its ConvNet (measured: ~10 % on MNIST after 300
        # steps, against ~58 % with cross-entropy), so float labels enter as their argmax class, and say so.
        return labels.argmax(1), "argmax class"
    if targets == "float" and labels.ndim == 1:
        # Class ids as the KRR methods' regression targets; still the stored labels, so recorded as such.
        return centred_one_hot(labels, num_classes), "as stored"
    return (labels.float() if labels.ndim == 2 else labels), "as stored"


@register_labels("argmax")
def _argmax(labels: Tensor, targets: TargetKind, num_classes: int) -> tuple[Tensor, str]:
    # Hard labels whatever was stored (a hard-label ablation of a soft-label set).
    note = "as stored"
    if labels.ndim == 2:
        labels, note = labels.argmax(1), "argmax class"
    return (centred_one_hot(labels, num_classes) if targets == "float" else labels), note


# --- protocols --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol; every number it produces is recorded with it (:meth:`to_dict`).

    Parts are registered names (see the module docstring); an unknown name raises ``ValueError`` listing the known
    ones when the protocol is built, not hours into an evaluation.

    Attributes:
        name: the registry key, e.g. ``dc`` or ``krr``.
        arch: default network (registry name) and ``arch_kwargs`` its options.
        optimizer: ``sgd`` or ``adam``; ``lr``, ``momentum``, ``weight_decay`` its settings.
        loss: ``ce`` (cross-entropy on class ids), ``mse`` (½·sum of squares on float targets) or ``l1`` (sum of
            absolute errors on float targets, e.g. teacher logits).
        labels: how stored labels become the loss's targets. ``as_stored``: float labels enter a class loss as
            their argmax class, class ids a float loss as centred one-hot; ``argmax``: always the hard class.
        schedule: ``step_half`` (lr x0.1 after half the steps), ``warmup_cosine`` (linear warm-up over ``warmup``
            steps, cosine to 1 %) or ``constant``.
        epochs: passes over the set; ``None`` means the step count comes from :meth:`num_steps`'s table.
        batch_size: training batch (capped at the training-set size).
        augment: ``dsa`` (per-image DSA, one op group per batch), ``krr`` (FRePo's op set, one op per batch) or
            ``none``.
        shuffle: reshuffle every epoch (FRePo's evaluation takes fixed slices in order).
        warmup: warm-up steps of ``warmup_cosine``.
        flip_support: train on the set plus its horizontally flipped copies (RCIG), where the dataset allows flips.
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
    labels: str = "as_stored"
    flip_support: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a protocol needs a name")
        for registry, value in (
            (_LOSSES, self.loss),
            (_OPTIMIZERS, self.optimizer),
            (_SCHEDULES, self.schedule),
            (_AUGMENTS, self.augment),
            (_LABELS, self.labels),
        ):
            try:
                registry.get(value)
            except ValueError as err:
                raise ValueError(f"protocol {self.name!r}: {err}") from None
        if self.batch_size < 1 or (self.epochs is not None and self.epochs < 1):
            raise ValueError(f"protocol {self.name!r}: batch_size and epochs must be positive")

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

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain data (JSON-ready), for recording beside the numbers; ``Protocol(**d)`` rebuilds it."""
        return asdict(self)


PROTOCOLS: dict[str, Protocol] = {}


def register_protocol(protocol: Protocol, overwrite: bool = False) -> Protocol:
    """Add ``protocol`` to :data:`PROTOCOLS` under ``protocol.name`` and return it.

    Its parts were checked when it was built (unknown names raise there, listing the known ones).

    Args:
        protocol: the protocol.
        overwrite: replace a protocol of the same name (say, re-running a notebook cell); off by default, because a
            silent replacement changes what results recorded under that name mean.

    Raises:
        ValueError: if the name is taken and ``overwrite`` is false.
    """
    if not isinstance(protocol, Protocol):
        raise TypeError(f"register_protocol takes a Protocol, got {type(protocol).__name__}")
    if protocol.name in PROTOCOLS and not overwrite:
        raise ValueError(f"a protocol named {protocol.name!r} is already registered (pass overwrite=True to replace)")
    PROTOCOLS[protocol.name] = protocol
    return protocol


# DC/DSA/MTT/APM: ConvNet-3 instance norm, SGD 0.01/0.9/5e-4, batch 256, 1000 epochs, lr x0.1 at half, DSA.
register_protocol(Protocol(name="dc", arch="convnet", arch_kwargs={"width": 128, "norm": "instance"}))
# FRePo/RCIG: their ConvNet without normalisation, Adam 3e-4, MSE on the stored labels, 500 warm-up steps then
# cosine to 1 %, steps by set size, batch min(N, 500), one augmentation op per batch.
register_protocol(
    Protocol(
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
    )
)


def get_protocol(name: str | Protocol) -> Protocol:
    """Look a protocol up by name (a :class:`Protocol` passes through)."""
    if isinstance(name, Protocol):
        return name
    if name not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {name!r}; choose one of {', '.join(sorted(PROTOCOLS))}")
    return PROTOCOLS[name]


# --- building a protocol's parts ----------------------------------------------------------------------------------


def make_loss(protocol: Protocol) -> Loss:
    """The protocol's training loss (``loss(out, target)``, with ``loss.targets`` its target kind)."""
    return _LOSSES.get(protocol.loss)


def make_optimizer(params: Iterable[nn.Parameter], protocol: Protocol) -> torch.optim.Optimizer:
    """The protocol's optimiser over ``params``."""
    return _OPTIMIZERS.get(protocol.optimizer)(params, protocol)


def make_schedule(protocol: Protocol, n_steps: int) -> Callable[[int], float]:
    """The protocol's learning-rate factor by step (0-based) for a run of ``n_steps``."""
    return _SCHEDULES.get(protocol.schedule)(protocol, n_steps)


def make_augment(protocol: Protocol, flip: bool) -> nn.Module:
    """The protocol's augmentation; ``flip=False`` leaves out horizontal flips (digits)."""
    return _AUGMENTS.get(protocol.augment)(flip)


def prepare_labels(labels: Tensor, protocol: Protocol, num_classes: int) -> tuple[Tensor, str]:
    """Stored labels as the protocol's loss takes them, and the note recorded in ``result.extra["labels"]``.

    Args:
        labels: ``(N,)`` class ids or ``(N, K)`` float targets, as stored.
        protocol: whose label rule and loss decide.
        num_classes: the width of float targets built from class ids.
    """
    return _LABELS.get(protocol.labels)(labels, make_loss(protocol).targets, num_classes)


def training_set(images: Tensor, labels: Tensor, protocol: Protocol, flip: bool) -> tuple[Tensor, Tensor]:
    """The set the networks train on: the distilled set, plus its horizontal flips under ``flip_support``.

    Flipped copies are added only where ``flip`` allows flips (not for digits), with the labels duplicated.
    """
    if not (protocol.flip_support and flip):
        return images, labels
    return torch.cat([images, images.flip(-1)]), torch.cat([labels, labels])
