"""Pictures of distilled sets: a grid with one row per class."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image

from lightning_distill.io import atomic_path


def viewable(images: Tensor, preprocessing: Any | None) -> Tensor:
    """Map model-input images back to [0, 1] for viewing (undo ZCA and normalisation, then clip)."""
    x = images.detach().float().cpu()
    if preprocessing is not None:
        x = preprocessing.invert(x)
    else:
        # Unknown preprocessing: stretch each image to its own range.
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-8)
    return x.clamp(0, 1)


def image_grid(images: Tensor, ipc: int, preprocessing: Any | None = None, max_per_class: int = 10) -> Tensor:
    """A ``(3, H', W')`` grid: one row per class, at most ``max_per_class`` images of each."""
    x = viewable(images, preprocessing)
    n_cls = len(x) // ipc
    keep = min(ipc, max_per_class)
    x = x.view(n_cls, ipc, *x.shape[1:])[:, :keep].reshape(n_cls * keep, *x.shape[1:])
    return make_grid(x, nrow=keep, padding=1, pad_value=1.0)


def save_grid_png(grid: Tensor, path: str | os.PathLike) -> Path:
    """Write a grid to PNG atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        save_image(grid, tmp, format="png")
    return Path(path)


def upscale(grid: Tensor, min_side: int = 256) -> Tensor:
    """Nearest-neighbour upscaling so that tiny grids (1 image per class of 28 px) are visible."""
    factor = max(1, min_side // max(grid.shape[-2:]))
    return torch.nn.functional.interpolate(grid[None], scale_factor=factor, mode="nearest")[0] if factor > 1 else grid
