"""``train_on_distilled``: train fresh networks on a distilled set under a protocol, report test accuracy.

:func:`train_network` is the one training loop behind every protocol; methods that train students on their own
set (APM keeps checkpoints along the way) call it directly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from tqdm.auto import tqdm

from lightning_distill.eval.protocols import (
    Protocol,
    get_protocol,
    make_augment,
    make_loss,
    make_optimizer,
    make_schedule,
    prepare_labels,
    training_set,
)
from lightning_distill.nets import get_net, seeded_net
from lightning_distill.precision import FP32, NetworkPrecision, PrecisionMode, PrecisionPolicy


@dataclass
class EvalResult:
    """Accuracies (in %) of ``repeats`` fresh networks, with what produced them."""

    protocol: str
    arch: str
    accuracies: list[float]
    num_images: int
    steps: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return float(torch.tensor(self.accuracies).mean())

    @property
    def std(self) -> float:
        # Population std over networks, as the papers report it.
        return float(torch.tensor(self.accuracies).std(unbiased=False)) if len(self.accuracies) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": self.mean, "std": self.std}

    def __str__(self) -> str:
        return f"{self.arch} [{self.protocol}] {self.mean:.2f} ± {self.std:.2f} % ({len(self.accuracies)} nets)"


def train_on_distilled(
    images: Tensor,
    labels: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    protocol: str | Protocol = "dc",
    arch: str | None = None,
    repeats: int = 5,
    num_classes: int | None = None,
    flip: bool = True,
    epochs: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    arch_kwargs: dict[str, Any] | None = None,
    precision: PrecisionMode = "fp32",
) -> EvalResult:
    """Train ``repeats`` fresh networks on ``(images, labels)`` and test each on ``(x_test, y_test)``.

    Args:
        images: distilled images ``(N, C, H, W)`` in model-input space.
        labels: ``(N,)`` class ids or ``(N, K)`` float targets, turned into the protocol's loss targets by its label
            rule: ``krr`` regresses float targets with MSE (class ids as centred one-hot); ``dc`` trains
            cross-entropy on class ids, taking float labels' argmax class (recorded in ``extra["labels"]``).
        x_test: test images in the same space; ``y_test`` their class ids.
        protocol: a registered protocol name (``dc``, ``krr``, ...) or a :class:`Protocol`.
        arch: network registry name; ``None`` takes the protocol's network (with its options).
        repeats: number of fresh networks.
        num_classes: defaults to the label width or the largest class id + 1.
        flip: allow horizontal flips (augmentation, ``flip_support``); ``False`` for digits.
        epochs: override the protocol's epochs; ``steps`` overrides the total step count. Both count over the
            stored set, also where ``flip_support`` doubles the training set.
        seed: network ``i`` is initialised and augmented with ``seed + i``; no global RNG state leaks.
        device: where to train (default: CUDA when available).
        progress: show a progress bar.
        arch_kwargs: network options, merged over the protocol's own (e.g. ``{"width": 64}`` for a CPU budget).
        precision: precision of the networks' passes (:mod:`lightning_distill.precision`): ``fp32`` (the
            published numbers' setting), ``bf16``, or ``auto`` (bf16 where the device has fast bf16). Weights,
            optimiser and loss stay float32; recorded in ``extra["precision"]``.
    """
    spec = get_protocol(protocol)
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many labels as images and at least one image, got {len(images)} and {len(labels)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if num_classes is None:
        num_classes = int(labels.shape[1]) if labels.ndim == 2 else int(max(labels.max(), y_test.max())) + 1
    name = arch or spec.arch
    kwargs = {**(spec.arch_kwargs if arch is None or arch == spec.arch else {}), **(arch_kwargs or {})}
    # The step count is the stored set's: a protocol's length belongs to the distilled set, not to its flipped copies.
    n_images, n_steps = len(images), spec.num_steps(len(images), epochs, steps)
    targets, label_use = prepare_labels(labels, spec, num_classes)
    x_train, targets = training_set(images.to(device, torch.float32), targets.to(device), spec, flip)
    x_test, y_test = x_test.to(device), y_test.to(device)
    augment = make_augment(spec, flip).to(device)
    build = partial(get_net, name, x_train.shape[1], num_classes, x_train.shape[-1], **kwargs)
    policy = PrecisionPolicy(precision).bind(device)

    start, accs = time.perf_counter(), []
    bar = tqdm(total=repeats * n_steps, desc=f"eval {name} [{spec.name}]", disable=not progress, leave=False)
    for i in range(repeats):
        net = seeded_net(build, seed + i).to(device)
        gen = torch.Generator().manual_seed(seed + i)
        train_network(net, x_train, targets, spec, n_steps, num_classes, gen, augment, bar=bar, precision=policy)
        accs.append(test_accuracy(net, x_test, y_test, num_classes, precision=policy))
        bar.set_postfix(acc=f"{accs[-1]:.2f}")
    bar.close()
    result = EvalResult(spec.name, name, accs, n_images, n_steps, time.perf_counter() - start)
    result.extra["arch_kwargs"] = kwargs
    result.extra["labels"] = label_use
    # A registered name alone may not say what ran (a method's file defines it): record every field.
    result.extra["protocol"] = spec.to_dict()
    result.extra["train_images"] = len(x_train)
    result.extra["precision"] = policy.to_dict()
    return result


def train_network(
    net: nn.Module,
    images: Tensor,
    labels: Tensor,
    protocol: Protocol,
    n_steps: int,
    num_classes: int,
    generator: torch.Generator,
    augment: nn.Module,
    checkpoint_steps: Sequence[int] = (),
    bar: tqdm | None = None,
    precision: NetworkPrecision = FP32,
) -> list[dict[str, Tensor]]:
    """Train ``net`` in place for ``n_steps`` optimiser steps under ``protocol``: the loop behind every protocol.

    Batches are consecutive slices of an order that is redrawn from ``generator`` at each pass when the protocol
    shuffles (fixed order otherwise); a pass that cannot fill a whole batch starts over. The augmentation draws from
    the same generator, so one generator seed fixes the run.

    Args:
        net: the network, on the training device, in its initial state.
        images: the training set ``(N, C, H, W)`` on the same device (see
            :func:`~lightning_distill.eval.protocols.training_set` for ``flip_support``).
        labels: ``(N,)`` class ids or ``(N, K)`` float targets; the protocol's label rule makes them the loss's
            targets (labels it already prepared pass through unchanged).
        protocol: loss, optimiser, schedule, batch size and shuffling.
        n_steps: optimiser steps.
        num_classes: width of float targets built from class ids.
        generator: CPU generator for the data order and the augmentation.
        augment: called as ``augment(x, generator=generator)`` on each batch
            (:func:`~lightning_distill.eval.protocols.make_augment`).
        checkpoint_steps: step counts (0 to ``n_steps``; 0 is the initial state) after which to keep a copy of the
            network's state.
        bar: a progress bar to advance by one per step.
        precision: the resolved policy of the passes: under bf16 the forward runs in bf16 autocast on
            channels-last inputs (``net`` is converted to channels-last in place) and the loss in float32; under
            fp32 (the default) the loop is exactly the float32 one.

    Returns:
        One detached CPU copy of ``net.state_dict()`` per distinct entry of ``checkpoint_steps``, in increasing
        order of steps.

    Raises:
        ValueError: if a checkpoint step lies outside ``[0, n_steps]``.
    """
    keep = sorted(set(checkpoint_steps))
    if keep and (keep[0] < 0 or keep[-1] > n_steps):
        raise ValueError(f"checkpoint steps must lie in [0, {n_steps}], got {list(checkpoint_steps)}")
    loss_fn = make_loss(protocol)
    targets, _ = prepare_labels(labels, protocol, num_classes)
    opt = make_optimizer(net.parameters(), protocol)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, make_schedule(protocol, n_steps))
    n, bs = len(images), min(protocol.batch_size, len(images))
    order, cursor = torch.arange(n), 0
    checkpoints = [_state_copy(net)] if keep and keep[0] == 0 else []
    precision.module(net)
    net.train()
    for step in range(1, n_steps + 1):
        if cursor + bs > n:
            cursor = 0
        if cursor == 0 and protocol.shuffle:
            order = torch.randperm(n, generator=generator)
        idx = order[cursor : cursor + bs].to(images.device)
        cursor += bs
        loss = loss_fn(precision.call(net, augment(images[idx], generator=generator)), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if bar is not None:
            bar.update(1)
        if step in keep:
            checkpoints.append(_state_copy(net))
    return checkpoints


def _state_copy(net: nn.Module) -> dict[str, Tensor]:
    # Copies on the CPU: K checkpoints must not hold K networks' worth of accelerator memory.
    return {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}


@torch.no_grad()
def test_accuracy(
    net: nn.Module,
    x_test: Tensor,
    y_test: Tensor,
    num_classes: int,
    batch_size: int = 1000,
    precision: NetworkPrecision = FP32,
) -> float:
    """Top-1 accuracy in % (torchmetrics), the passes under ``precision`` (float32 by default)."""
    net.eval()
    metric = MulticlassAccuracy(num_classes=num_classes, average="micro").to(x_test.device)
    for i in range(0, len(x_test), batch_size):
        metric.update(precision.call(net, x_test[i : i + batch_size]), y_test[i : i + batch_size])
    net.train()
    return float(metric.compute()) * 100
