"""Conversions of raw arrays: uint8 images to ``(N, C, H, W)`` tensors, labels to int64, channel statistics."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

_CHUNK = 8192  # images per float64 chunk: bounds the working memory


def to_nchw_uint8(x: Any, what: str = "images") -> Tensor:
    """Convert uint8 images ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)`` (numpy or torch) to ``(N, C, H, W)``.

    Args:
        x: The images, with 1 or 3 channels.
        what: Name used in error messages.

    Returns:
        A contiguous uint8 tensor ``(N, C, H, W)``.
    """
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, Tensor) else x
    if t.dtype != torch.uint8:
        raise TypeError(f"{what} must be uint8 (0..255), got {t.dtype}: pass the raw pixel arrays")
    if t.ndim == 3:
        return t.unsqueeze(1).contiguous()
    if t.ndim == 4:
        if t.shape[1] in (1, 3) and t.shape[3] not in (1, 3):
            return t.contiguous()
        if t.shape[3] in (1, 3):
            return t.permute(0, 3, 1, 2).contiguous()
    raise ValueError(f"{what} must be (N, H, W), (N, H, W, C) or (N, C, H, W) with C in (1, 3), got {tuple(t.shape)}")


def to_labels(y: Any, what: str = "labels") -> Tensor:
    """Convert integer labels (numpy, torch or list) to a flat int64 tensor."""
    t = torch.as_tensor(np.asarray(y)) if not isinstance(y, Tensor) else y
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"{what} must be integers, got {t.dtype}")
    return t.reshape(-1).to(torch.int64)


def channel_stats(x: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and population std of uint8 images ``(N, C, H, W)`` in [0, 1] units (float64 sums)."""
    channels = x.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for chunk in x.split(_CHUNK):
        c = chunk.to(torch.float64).div_(255.0)
        total += c.sum(dim=(0, 2, 3))
        total_sq += c.square().sum(dim=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.tolist(), std.tolist()
