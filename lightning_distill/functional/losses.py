"""Label conventions and losses shared by the KRR-based methods (FRePo, RCIG)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["centred_one_hot", "frepo_label_init_scale", "half_mse", "label_margin_loss"]


def centred_one_hot(y: Tensor, num_classes: int, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> Tensor:
    """Centred one-hot regression targets: ``1 − 1/C`` for the true class, ``−1/C`` elsewhere, times ``scale``.

    Each row sums to zero, which is the convention of FRePo and RCIG for both real and synthetic labels.

    Args:
        y: Integer class labels ``(N,)``.
        num_classes: Number of classes ``C``.
        scale: Multiplier (FRePo initialises its learned labels with :func:`frepo_label_init_scale`).
        dtype: Floating dtype of the result.

    Returns:
        Targets ``(N, C)``.
    """
    onehot = F.one_hot(y.long(), num_classes).to(dtype)
    return (onehot - 1.0 / num_classes) * scale


def frepo_label_init_scale(num_classes: int) -> float:
    """FRePo's scale for the initial learned labels, ``1 / sqrt(C / 10)`` (1 for 10 classes, 1/√10 for 100).

    Only the synthetic labels are scaled; real targets stay unscaled.

    Args:
        num_classes: Number of classes ``C``.

    Returns:
        The scale factor.
    """
    return 1.0 / math.sqrt(num_classes / 10.0)


def label_margin_loss(y_syn: Tensor, margin: float | None = None) -> Tensor:
    """FRePo's label regulariser: ``−mean_j min(top1_j − top2_j, margin)``.

    It rewards each learned label for keeping its largest entry ahead of the runner-up by up to ``margin``, and is
    flat (zero gradient) once the margin is reached, so it only stops learned labels from becoming ambiguous.

    Args:
        y_syn: Learned labels ``(N, C)``, ``C >= 2``.
        margin: Margin cap; ``None`` means ``1/C`` (FRePo's choice).

    Returns:
        Scalar loss.
    """
    if y_syn.shape[-1] < 2:
        raise ValueError("label_margin_loss needs at least 2 classes")
    if margin is None:
        margin = 1.0 / y_syn.shape[-1]
    top2 = y_syn.topk(2, dim=-1).values
    return -(top2[..., 0] - top2[..., 1]).clamp(max=margin).mean()


def half_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over rows of ``½‖pred − target‖²`` (the per-example squared error is summed over outputs).

    Args:
        pred: Predictions ``(N, ...)``.
        target: Targets of the same shape.

    Returns:
        Scalar loss.
    """
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: pred {tuple(pred.shape)} vs target {tuple(target.shape)}")
    return 0.5 * (pred - target).pow(2).flatten(1).sum(1).mean()
